"""Quantized KV cache (FP8 E4M3, INT8) of encoder-decoder models: each decoder layer's self-attention cache and
cross-attention cache hold codes, with their own calibrated (K, V) scales. Checked against transformers' models
(tiny T5 and BART): the engine's scales are amax / 448 (/ 127) of the K/V transformers computes on the calibration
feed; greedy logprobs through the quantized caches equal transformers' with the same quantization applied to its
K/V, and stay within the cache's precision of the float cache's; dummy-weight engines (llmapi bench) get the
decoder-only defaults."""

import json
import random

import pytest
import torch
from safetensors import safe_open
from tiny_tokenizer import make_tiny_tokenizer, save_tiny_tokenizer

import encdec_models as em
from family_parity import one_thread
from kernel_cases import DEVICE
from llmapi import LLM, QuantConfig, SamplingParams
from llmapi.distributed.mapping import Mapping
from llmapi.distributed.sharding import build_rank_model, load_rank_model
from llmapi.engine import read_engine
from llmapi.layers.attention import AttentionMetadata
from llmapi.layers.encdec_attention import CrossMetadata
from llmapi.models.encdec import start_step
from llmapi.quantization.calibration import calibration_texts

SELF = "decoder.layers.{}.attention.kv_cache_scaling_factor"
CROSS = "decoder.layers.{}.cross_attention.kv_cache_scaling_factor"
CODE_MAX = {"FP8": 448.0, "INT8": 127.0}
CACHE_DTYPE = {"FP8": torch.float8_e4m3fn, "INT8": torch.int8}
NEW_TOKENS = 4


MODELS = {
    # The 2-layer T5s at the parity tests' std 0.5 (T5's unscaled attention is sharp at that width, but a 2-layer
    # model's float32 stays token exact there); the BART family and FSMT at the builders' 0.3.
    "t5": lambda: em.t5("t5", seed=1), "t5v1.1": lambda: em.t5("t5v1.1"), "mt5": lambda: em.t5("mt5"),
    "byt5": lambda: em.t5("byt5"), "bart": lambda: em.bart(seed=2), "mbart": lambda: em.bart(mbart=True),
    "fsmt": lambda: em.fsmt(),
}


def _calibration_lines() -> list[str]:
    """Text of the tiny word-level tokenizer: its sentences, then every filler word in a shuffled order, 20 a line
    (English news would be <unk> to it)."""
    vocab = make_tiny_tokenizer(em.VOCAB).get_vocab()
    words = sorted((w for w in vocab if w.startswith("w")), key=lambda w: vocab[w])
    random.Random(0).shuffle(words)
    sentences = ["the quick brown fox jumps over the lazy dog", "once upon a time there was a small language model"]
    return sentences + [" ".join(words[i:i + 20]) for i in range(0, len(words), 20)]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """The calibration text file every engine here converts with."""
    path = tmp_path_factory.mktemp("encdec-kv-calibration") / "calibration.txt"
    path.write_text("\n".join(_calibration_lines()) + "\n")
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory, calibration):
    """name -> (directory with the model and the tiny tokenizer, transformers model, calibration file), each
    model saved once for the module."""
    made = {}

    class Saved:
        def __getitem__(self, name):
            if name not in made:
                hf = MODELS[name]()
                path = tmp_path_factory.mktemp(name.replace(".", "_"))
                hf.save_pretrained(path)
                save_tiny_tokenizer(path, em.VOCAB)
                made[name] = (path, hf, calibration)
            return made[name]
    return Saved()


def _quant(algo: str | None, calibration, weights: str | None = None) -> QuantConfig | None:
    if algo is None and weights is None:
        return None
    return QuantConfig(quant_algo=weights, kv_cache_quant_algo=algo, calibration_dataset=str(calibration))


def _requests(hf) -> list[list[int]]:
    vocab = getattr(hf.config, "src_vocab_size", hf.config.vocab_size)  # FSMT: the source vocabulary
    return em.inputs(6, vocab, seed=7, lengths=(3, 20))


@pytest.fixture(scope="module")
def runs(saved):
    """(name, algo) -> (tokens, logprobs of the top 2 per step, engine dir, the cache tensors' dtypes): greedy
    runs of the 6 requests, algo None for the float cache; each engine converted once."""
    done = {}

    def get(name, algo):
        if (name, algo) not in done:
            path, hf, calibration = saved[name]
            params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
            with one_thread(), LLM(str(path), dtype="float32", device="cpu", tokens_per_block=4,
                                   quant=_quant(algo, calibration)) as llm:
                outs = llm.generate(_requests(hf), params, use_tqdm=False)
                dtypes = {c.dtype for c in llm._local.kv_caches}
                engine = llm.engine_info.path
                config = llm.engine_info.config
            tokens = [list(o.outputs[0].token_ids) for o in outs]
            logprobs = [[{t: e.logprob for t, e in step.items()} for step in o.outputs[0].logprobs] for o in outs]
            done[name, algo] = tokens, logprobs, engine, dtypes, config
        return done[name, algo]
    return get


# --- plain-torch references on transformers' modules ------------------------------------------------------------

def _kv_projections(hf):
    """(layer, "self" / "cross", K projection, V projection) of every decoder layer of transformers' model."""
    out = []
    if hf.config.model_type in ("t5", "mt5"):
        for i, block in enumerate(hf.decoder.block):
            out += [(i, "self", block.layer[0].SelfAttention.k, block.layer[0].SelfAttention.v),
                    (i, "cross", block.layer[1].EncDecAttention.k, block.layer[1].EncDecAttention.v)]
    else:  # BART, mBART, FSMT
        for i, layer in enumerate(hf.model.decoder.layers):
            out += [(i, "self", layer.self_attn.k_proj, layer.self_attn.v_proj),
                    (i, "cross", layer.encoder_attn.k_proj, layer.encoder_attn.v_proj)]
    return out


def _codes(x: torch.Tensor, scale: float, algo: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = x * (1 / scale) (float32 reciprocal), the cache's codes of y as float32 (int8 rounded half to even and
    clamped to +-127, or E4M3 clamped to +-448 first), and the code on the other side of y's rounding boundary."""
    def code(v):
        return torch.round(v).clamp(-127, 127) if algo == "INT8" else v.clamp(-448, 448).to(torch.float8_e4m3fn).float()

    y = x.float() * (1.0 / torch.tensor(scale, dtype=torch.float32))
    codes = code(y)
    return y, codes, code(2 * y - codes)


def _fake_quant(x: torch.Tensor, scale: float, algo: str, flip: torch.Tensor | None = None) -> torch.Tensor:
    """What a cached value reads back as: its code times the scale; where `flip` is set, the code on the other side
    of the rounding boundary instead (see _near_ties)."""
    _, codes, other = _codes(x, scale, algo)
    if flip is not None:
        codes = torch.where(flip, other, codes)
    return (codes * torch.tensor(scale, dtype=torch.float32)).to(x.dtype)


TIE = 2e-4
"""A K/V value this close to a rounding boundary (a fraction of the step between the two codes beside it) may round
either way in the engine: its K/V and transformers' differ by float32 reordering (a code of 100 moves by ~1e-4 at
a relative 1e-6), and one int8 code flipped moves a tiny model's logprobs by ~1e-3."""
MAX_TIES = 10


def _near_ties(x: torch.Tensor, scale: float, algo: str) -> torch.Tensor:
    """Where x * (1 / scale) lies within TIE of the midpoint between its code and the code on the other side."""
    y, codes, other = _codes(x, scale, algo)
    step = (other - codes).abs()
    return (step > 0) & ((y - (codes + other) / 2).abs() < TIE * step)


def _noise(x: torch.Tensor, scale: float, algo: str, g: torch.Generator) -> torch.Tensor:
    """x held to the cache's range (+-127 or +-448 times the scale: values past the calibrated amax saturate) plus
    uniform noise as wide as its rounding error: half an int8 step (scale / 2); for E4M3 half a unit in the last
    place, 2**-4 of |x| (3 mantissa bits), and at least half the subnormal step scale * 2**-10."""
    x = x.clamp(-CODE_MAX[algo] * scale, CODE_MAX[algo] * scale)
    half = torch.full_like(x, scale / 2) if algo == "INT8" else torch.clamp(x.abs() / 16, min=scale * 2 ** -10)
    return x + (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1) * half


def _hf_logprobs(hf, requests, tokens, start, change=None, prompts=None) -> list[torch.Tensor]:
    """Teacher-forced log p(token) of each generated token, transformers' model without a cache; `change(layer,
    kind, "k" / "v", tensor)` replaces what each decoder K/V projection gives (the values a cache would hold).
    Each decoder prompt is [start], or the request's own from `prompts`."""
    handles = []
    if change is not None:
        for layer, kind, k_proj, v_proj in _kv_projections(hf):
            for which, proj in (("k", k_proj), ("v", v_proj)):
                handles.append(proj.register_forward_hook(
                    lambda m, a, out, layer=layer, kind=kind, which=which: change(layer, kind, which, out)))
    out = []
    try:
        with torch.no_grad():
            for enc, toks, dec in zip(requests, tokens, prompts or [[start]] * len(requests)):
                logits = hf(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([dec + toks[:-1]]),
                            use_cache=False).logits[0, len(dec) - 1:].float()
                out.append(logits.log_softmax(-1).gather(1, torch.tensor(toks)[:, None])[:, 0])
    finally:
        for handle in handles:
            handle.remove()
    return out


def _tie_resolved_error(hf, request, toks, start, scales, algo, ours: torch.Tensor, enough: float,
                        prompt: list[int] | None = None) -> float:
    """The largest |logprob difference| over one request's tokens between `ours` and transformers' with every
    decoder K/V fake-quantized with the engine's scales: the smallest over the ways of rounding the values that lie
    within TIE of a rounding boundary (_near_ties), each either way, when the plain rounding alone is not under
    `enough`. A wrong scale moves every value, so no choice of those few comes close. `prompt`: the request's
    decoder prompt, [start] if not given."""
    prompts = None if prompt is None else [prompt]
    ties = []

    def find(layer, kind, which, out):
        scale = scales[layer, kind][0 if which == "k" else 1]
        ties.append(_near_ties(out, scale, algo))
        return _fake_quant(out, scale, algo)

    best = float((_hf_logprobs(hf, [request], [toks], start, find, prompts)[0] - ours).abs().max())
    spots = [(call, int(i)) for call, mask in enumerate(ties) for i in mask.flatten().nonzero()[:, 0]]
    if best < enough or not spots:
        return best
    assert len(spots) <= MAX_TIES, f"{len(spots)} K/V values within {TIE} of a rounding boundary"
    for choice in range(1, 2 ** len(spots)):
        chosen = [spot for b, spot in enumerate(spots) if choice >> b & 1]
        calls = iter(range(len(ties)))

        def flipped(layer, kind, which, out):
            call = next(calls)
            flip = torch.zeros(out.numel(), dtype=torch.bool)
            flip[[i for c, i in chosen if c == call]] = True
            return _fake_quant(out, scales[layer, kind][0 if which == "k" else 1], algo, flip.view(out.shape))

        changed = _hf_logprobs(hf, [request], [toks], start, flipped, prompts)[0]
        best = min(best, float((changed - ours).abs().max()))
    return best


def _chosen(logprobs, tokens) -> list[torch.Tensor]:
    """Each request's logprobs of its generated tokens (from the runs' top-2 dictionaries)."""
    return [torch.tensor([step[t] for step, t in zip(steps, toks)]) for steps, toks in zip(logprobs, tokens)]


def _engine_scales(engine, num_layers) -> dict:
    """(layer, "self" / "cross") -> [K scale, V scale] from the engine's weights file."""
    with safe_open(str(engine / "rank0.safetensors"), "pt") as f:
        return {(i, kind): f.get_tensor(name.format(i)).tolist()
                for i in range(num_layers) for kind, name in (("self", SELF), ("cross", CROSS))}


def _calibration_amax(hf, calibration) -> dict:
    """(layer, "self" / "cross") -> [max |k|, max |v|] that transformers' model computes over the feed conversion
    calibrates on: each calibration text's ids (the engine's tokenizer, cut to the position limit) as the encoder
    input, and the decoder start token then the same ids (all in the vocabulary) as the teacher-forced decoder
    input."""
    tokenizer = make_tiny_tokenizer(em.VOCAB)
    start = hf.config.decoder_start_token_id
    amax = {}

    def record(layer, kind, which, out):
        old = amax.setdefault((layer, kind), [0.0, 0.0])
        slot = 0 if which == "k" else 1
        old[slot] = max(old[slot], float(out.abs().max()))
        return out

    handles = [proj.register_forward_hook(lambda m, a, out, layer=layer, kind=kind, which=which:
                                          record(layer, kind, which, out))
               for layer, kind, k_proj, v_proj in _kv_projections(hf) for which, proj in (("k", k_proj), ("v", v_proj))]
    try:
        with torch.no_grad():
            for text in calibration_texts(str(calibration)):
                ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
                assert len(ids) < 128  # within every position limit: nothing cut
                hf(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([[start] + ids[:-1]]),
                   use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return amax


# --- tests ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["t5", "bart"])
@pytest.mark.parametrize("algo", ["FP8", "INT8"])
def test_caches_hold_codes_with_calibrated_scales(saved, runs, name, algo):
    """The runner's caches are int8 / float8 tensors; the engine records the algorithm; every decoder layer has
    self- and cross-attention scales, each amax / 448 (/ 127) of the K/V transformers computes on the calibration
    feed."""
    path, hf, calibration = saved[name]
    _, _, engine, dtypes, config = runs(name, algo)
    assert dtypes == {CACHE_DTYPE[algo]}
    assert config["quantization"] == _quant(algo, calibration).to_dict()
    assert config["quantization"]["kv_cache_quant_algo"] == algo and config["quantization"]["quant_algo"] is None
    layers = config["num_hidden_layers"]
    scales = _engine_scales(engine, layers)
    amax = _calibration_amax(hf, calibration)
    assert set(amax) == set(scales) == {(i, kind) for i in range(layers) for kind in ("self", "cross")}
    for key, (k_scale, v_scale) in scales.items():
        assert [k_scale, v_scale] == pytest.approx([a / CODE_MAX[algo] for a in amax[key]], rel=1e-5), key
    with safe_open(str(engine / "rank0.safetensors"), "pt") as f:
        assert not any("encoder" in n and "kv_cache_scaling_factor" in n for n in f.keys())  # no cache, no scale
        assert f.get_tensor("decoder.layers.0.attention.qkv.weight").dtype == torch.float32  # weights stay float


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("algo", ["FP8", "INT8"])
def test_logprobs_equal_transformers_with_quantized_kv(saved, runs, name, algo):
    """Greedy logprobs through the quantized caches (prefill, then decode steps reading both caches) equal
    transformers' teacher-forced logprobs of the same tokens when every decoder K/V it computes is replaced by what
    its cache would read back with the engine's scales: the codes are written and read with the right scale in
    every layer, self and cross, within the float32 reordering the float cache shows against transformers' plain
    model (or 2e-5). Without the quantization the difference is far larger (the check can fail)."""
    path, hf, _ = saved[name]
    tokens, logprobs, engine, _, config = runs(name, algo)
    f_tokens, f_logprobs, *_ = runs(name, None)
    scales = _engine_scales(engine, config["num_hidden_layers"])
    requests, start = _requests(hf), hf.config.decoder_start_token_id
    ours = _chosen(logprobs, tokens)
    plain = _hf_logprobs(hf, requests, tokens, start)
    reordering = max(float((a - b).abs().max())
                     for a, b in zip(_chosen(f_logprobs, f_tokens), _hf_logprobs(hf, requests, f_tokens, start)))
    bound = max(2e-5, reordering)
    err = max(_tie_resolved_error(hf, request, toks, start, scales, algo, mine, bound)
              for request, toks, mine in zip(requests, tokens, ours))
    err_float = max(float((a - b).abs().max()) for a, b in zip(ours, plain))
    assert err < bound, (err, reordering)  # measured: 2e-7 to 2.2e-5, the float cache's to 1.4e-4
    assert err_float > 10 * err, (err, err_float)


@pytest.mark.parametrize("name", ["t5", "bart"])
@pytest.mark.parametrize("algo", ["FP8", "INT8"])
def test_quantized_cache_stays_near_float_cache(saved, runs, name, algo):
    """The first generated tokens' logprobs through the quantized caches are within the cache's precision of the
    float cache's. The bound comes from that precision: 3x the largest logprob change that transformers' model
    shows when every decoder K/V it computes is held to the cache's range and given uniform noise as wide as its
    rounding error (half an int8 step amax / 127; for E4M3 2**-4 of each value), over 3 draws. (One rounding is a
    single draw, and the same token at the same position rounds the same way in every request: measured, its
    largest change is 0.3-1.6x the noise's, 0.08-0.35 in logprob.) Tokens agree until a step whose float top-2 gap
    is within the bound."""
    path, hf, _ = saved[name]
    q_tokens, q_logprobs, engine, _, config = runs(name, algo)
    f_tokens, f_logprobs, *_ = runs(name, None)
    scales = _engine_scales(engine, config["num_hidden_layers"])
    requests, start = _requests(hf), hf.config.decoder_start_token_id
    plain = _hf_logprobs(hf, requests, f_tokens, start)
    noise_change = 0.0
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        noisy = _hf_logprobs(hf, requests, f_tokens, start, lambda layer, kind, which, out: _noise(
            out, scales[layer, kind][0 if which == "k" else 1], algo, g))
        noise_change = max(noise_change, max(float((a - b).abs().max()) for a, b in zip(noisy, plain)))
    bound = 3 * noise_change
    changes = []
    for qt, ql, ft, fl in zip(q_tokens, q_logprobs, f_tokens, f_logprobs):
        for i in range(NEW_TOKENS):
            if qt[i] != ft[i]:
                top = sorted(fl[i].values(), reverse=True)
                assert top[0] - top[1] < bound, f"token {i} differs where float's top-2 gap is {top[0] - top[1]}"
                break
            changes.append(abs(ql[i][qt[i]] - fl[i][ft[i]]))
    assert len(changes) >= len(requests)  # at least the first token of each request (in practice nearly all)
    assert 0 < max(changes) < bound, (max(changes), bound)  # quantized (not the float cache), and near it


def _hf_generate_quantized(hf, enc, dec, scales, algo, every=False, **kwargs) -> list:
    """transformers' generate (its own KV cache, float) with every decoder K/V replaced, as it is computed, by what
    the quantized cache would read back: the continuation of decoder prompt `dec` (`every`: of each sequence
    generate returns, best first)."""
    handles = [proj.register_forward_hook(
        lambda m, a, out, key=(layer, kind), slot=slot: _fake_quant(out, scales[key][slot], algo))
        for layer, kind, k_proj, v_proj in _kv_projections(hf) for slot, proj in enumerate((k_proj, v_proj))]
    try:
        with torch.no_grad():
            gen = hf.generate(torch.tensor([enc]), attention_mask=torch.ones(1, len(enc), dtype=torch.long),
                              decoder_input_ids=torch.tensor([dec]), do_sample=False, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return [row[len(dec):].tolist() for row in gen] if every else gen[0, len(dec):].tolist()


def _prompts(hf, count, seed) -> list[tuple[list[int], list[int]]]:
    """Encoder inputs of 3 to 40 tokens, each with a decoder prompt: the start token alone for half of them, else
    the start and 1 to 13 tokens (decoder prompts that run in chunks)."""
    rng, start = random.Random(seed), hf.config.decoder_start_token_id
    return [([rng.randrange(3, hf.config.vocab_size) for _ in range(rng.randrange(3, 41))],
             [start] + ([rng.randrange(3, hf.config.vocab_size) for _ in range(rng.randrange(1, 14))] if i % 2 else []))
            for i in range(count)]


@pytest.mark.parametrize("name", ["t5", "bart"])
@pytest.mark.parametrize("algo", ["FP8", "INT8"])
def test_greedy_beams_preemption_and_graphs_equal_transformers(saved, runs, name, algo, monkeypatch):
    """Through the quantized caches, token for token what transformers generates with its K/V quantized the same
    way: greedy with decoder prompts in chunks and preemption forced by a small cache (recomputed requests write
    their cross codes again), decode steps through the decode-graph path (its CPU stand-in), and beam search (forked
    beams copy self-attention codes and share the cross blocks). A K/V value at a rounding boundary may round the
    other way in the engine than in transformers (float32 reordering), which can change which beam wins: where the
    best beams differ, ours must be one of transformers' beams, with the logprobs transformers gives it under one
    rounding of the values within TIE of a boundary, and that in one request at most."""
    from llmapi.runtime.cuda_graph import GRAPHS_ON_CPU_ENV

    path, hf, _ = saved[name]
    *_, engine, _, config = runs(name, algo)
    scales = _engine_scales(engine, config["num_hidden_layers"])
    quant = config["quantization"]
    requests = _prompts(hf, 8, seed=11)
    prompts = [{"encoder_prompt": e, "decoder_prompt": d} for e, d in requests]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = [_hf_generate_quantized(hf, e, d, scales, algo, max_new_tokens=8, eos_token_id=None, num_beams=1)
            for e, d in requests]
    with one_thread(), LLM(str(path), dtype="float32", device="cpu", tokens_per_block=4, max_num_tokens=48,
                           kv_cache_config={"max_tokens": 24 * 4}, quant=QuantConfig.from_dict(quant)) as llm:
        assert llm.engine_info.path == engine  # the same engine (a cache hit): the same scales
        got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
        assert llm.get_stats()["num_preemptions"] > 0
    assert got == want
    monkeypatch.setenv(GRAPHS_ON_CPU_ENV, "1")
    beams = SamplingParams(use_beam_search=True, best_of=3, n=1, max_tokens=8, temperature=0, logprobs=1)
    with one_thread(), LLM(str(path), dtype="float32", device="cpu", tokens_per_block=4, max_batch_size=8,
                           quant=QuantConfig.from_dict(quant)) as llm:
        got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
        assert 0 < llm._runner.stats.graph_steps < llm._runner.stats.steps
        beamed = [o.outputs[0] for o in llm.generate(prompts[:4], beams, use_tqdm=False)]
        assert llm.get_stats()["num_free_blocks"] == llm.num_kv_blocks
    assert got == want
    tied = 0
    for (e, d), best in zip(requests[:4], beamed):
        theirs = _hf_generate_quantized(hf, e, d, scales, algo, every=True, max_new_tokens=8, num_beams=3,
                                        num_return_sequences=3, early_stopping=False, length_penalty=1.0)
        mine = list(best.token_ids)
        if mine == theirs[0]:
            continue
        tied += 1
        assert mine in theirs, (mine, theirs)
        logprobs = torch.tensor([step[t].logprob for step, t in zip(best.logprobs, mine)])
        err = _tie_resolved_error(hf, e, mine, d[0], scales, algo, logprobs, 1e-4, prompt=d)
        assert err < 1e-4, (mine, theirs, err)
    assert tied <= 1


def _engine_model(engine):
    """The engine's model (its scales included), loaded on the CPU in float32, and its config."""
    cfg, _ = read_engine(engine)
    model = build_rank_model(cfg, Mapping(1, 1), "cpu", torch.float32)
    load_rank_model(model, engine, 0, False, cfg, torch.float32, "cpu")
    return model.eval(), cfg


def _prefill_then_decode(model, cfg, rows, cache_dtype, block=4):
    """Logits of each row's last decoder prompt token (one step: encoders, cross K/V, packed decoder prefill),
    then of one decode step on the greedy token (decode attention over both caches); and the caches."""
    ids, positions, attn, num_blocks = start_step(rows, block)
    caches = [torch.zeros(2, num_blocks, block, cfg["num_key_value_heads"], cfg["head_dim"]).to(cache_dtype)
              for _ in range(cfg["num_hidden_layers"])]
    with torch.no_grad():
        hidden = model(ids, positions, attn, caches)
        first = model.compute_logits(hidden[attn.query_start_loc[1:].long() - 1])  # [R, V]
        lens = [len(dec) for _, dec in rows]  # none a multiple of `block`: the next position is in the last block
        step = AttentionMetadata.build([1] * len(rows), [n + 1 for n in lens], attn.block_tables, block)
        none = torch.zeros(0, dtype=torch.int32)
        step.cross = CrossMetadata(
            encoder_ids=none, encoder_positions=none, encoder_start_loc=torch.zeros(1, dtype=torch.int32),
            encoder_max_len=0, encoder_slot_mapping=none.long(), cross_lens=attn.cross.cross_lens,
            cross_block_tables=attn.cross.cross_block_tables, max_cross_len=attn.cross.max_cross_len)
        hidden = model(first.argmax(-1).int(), torch.tensor(lens, dtype=torch.int32), step, caches)
        second = model.compute_logits(hidden)  # [R, V]
    return first, second, caches


@pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU the kernels run compiled: the GPU test below")
@pytest.mark.parametrize("name", ["t5", "bart"])
@pytest.mark.parametrize("algo", ["FP8", "INT8"])
def test_triton_kernels_read_and_write_both_caches(saved, runs, name, algo, monkeypatch):
    """The Triton path (the kernels under Triton's interpreter on CPU: KV write, packed prefill attention with T5's
    bias over the self cache and non-causal over the cross cache, split-K decode attention) gives the torch
    references' logits and cache codes for the engine's quantized caches."""
    pytest.importorskip("triton")
    import llmapi.layers.dispatch as dispatch

    path, hf, _ = saved[name]
    *_, engine, _, _ = runs(name, algo)
    model, cfg = _engine_model(engine)
    requests = _requests(hf)[:3]
    rows = [(enc, [hf.config.decoder_start_token_id] + enc[:n]) for enc, n in zip(requests, (2, 4, 6))]
    ref = _prefill_then_decode(model, cfg, rows, CACHE_DTYPE[algo])
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
    got = _prefill_then_decode(model, cfg, rows, CACHE_DTYPE[algo])
    for a, b in zip(got[:2], ref[:2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(got[2], ref[2]):  # each layer's cache: self and cross blocks
        assert a.dtype == b.dtype == CACHE_DTYPE[algo]
        a, b = a.float(), b.float()  # codes (an fp8 zero's sign aside)
        # Codes may part only on a rounding boundary, one code apart: the cross K/V come from encoder outputs that
        # the Triton encoder attention sums in another order (measured: 0-4 of 8704 codes).
        step = torch.ones_like(b) if algo == "INT8" else torch.clamp(b.abs() / 8, min=2 ** -9)
        assert ((a - b).abs() <= step).all()
        assert (a != b).float().mean() < 1e-3


def test_weight_modes_with_a_quantized_kv_cache(saved, runs, tmp_path):
    """KV-cache quantization combines with the weight modes (int8 weight-only, FP8): the linears are quantized,
    the caches hold codes, and the K/V scales are the KV-only engine's (calibration runs the float model). The
    engine saved with LLM.save loads (its manifest checked) and gives the same tokens."""
    for name, weights, algo, weight_dtype in (("bart", "W8A16", "INT8", torch.int8),
                                              ("t5", "FP8", "FP8", torch.float8_e4m3fn)):
        path, hf, calibration = saved[name]
        quant = _quant(algo, calibration, weights)
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        with one_thread(), LLM(str(path), dtype="float32", device="cpu", tokens_per_block=4, quant=quant) as llm:
            outs = llm.generate(_requests(hf), params, use_tqdm=False)
            assert {c.dtype for c in llm._local.kv_caches} == {CACHE_DTYPE[algo]}
            engine, config = llm.engine_info.path, llm.engine_info.config
            llm.save(str(tmp_path / name))
        assert config["quantization"] == quant.to_dict()
        assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outs)
        with one_thread(), LLM(str(tmp_path / name), device="cpu", tokens_per_block=4) as llm:
            assert not llm.engine_built and llm.engine_info.config["quantization"] == quant.to_dict()
            assert {c.dtype for c in llm._local.kv_caches} == {CACHE_DTYPE[algo]}
            again = llm.generate(_requests(hf), params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
        with safe_open(str(engine / "rank0.safetensors"), "pt") as f:
            assert f.get_tensor("decoder.layers.1.cross_attention.kv.weight").dtype == weight_dtype
            assert f.get_tensor("encoder.layers.0.attention.qkv.weight").dtype == weight_dtype
        layers = config["num_hidden_layers"]
        assert _engine_scales(engine, layers) == _engine_scales(runs(name, algo)[2], layers)


def test_unknown_kv_cache_algorithms_fail_clearly(saved, tmp_path):
    from llmapi.errors import CorruptEngineError
    from llmapi.quantization.kv_cache import kv_cache_dtype

    path, _, _ = saved["bart"]
    with pytest.raises(ValueError, match="kv_cache_quant_algo='FP16' is invalid"):
        LLM(str(path), device="cpu", quant=QuantConfig(quant_algo=None, kv_cache_quant_algo="FP16"))
    with pytest.raises(ValueError, match="unknown.*fp8_kv_cache.*int8_kv_cache"):
        LLM(str(path), device="cpu", quant="int4_kv_cache")
    with pytest.raises(CorruptEngineError, match="kv_cache_quant_algo='FP4'"):  # an engine config edited by hand
        kv_cache_dtype({"is_encoder_decoder": True, "quantization": {"kv_cache_quant_algo": "FP4"}}, torch.float32)


def _t5_large_config() -> dict:
    from llmapi.bench import resolve_bench_model

    return json.loads(open(f"{resolve_bench_model('t5-large')}/config.json").read())


@pytest.mark.parametrize("algo", ["FP8", "INT8"])
def test_t5_large_dummy_engine_gets_default_scales(algo):
    """llmapi bench --model t5-large --load-format dummy --kv-cache-dtype fp8|int8: the model built for the known
    config (on meta) holds a scale for each of its 24 decoder layers' self- and cross-attention, none in the
    encoder, and the dummy weights supply exactly those, with the decoder-only defaults (FP8 1.0; INT8 4 / 127)."""
    from llmapi.models import config_from_hf
    from llmapi.quantization.apply import quantize_engine_weights

    quant = QuantConfig(quant_algo=None, kv_cache_quant_algo=algo)
    cfg = {**config_from_hf(_t5_large_config(), torch.bfloat16), "quantization": quant.to_dict()}
    model = build_rank_model(cfg, Mapping(1, 1), "meta", torch.bfloat16)
    names = {n for n in model.state_dict() if n.endswith("kv_cache_scaling_factor")}
    assert names == {name.format(i) for i in range(24) for name in (SELF, CROSS)}
    float_weights = {n: t for n, t in model.state_dict().items() if n not in names}  # what dummy weights draw
    scales = {n: t for n, t in quantize_engine_weights(cfg, float_weights, quant).items() if n in names}
    assert set(scales) == names
    default = {"FP8": 1.0, "INT8": 4.0 / 127}[algo]
    for t in scales.values():
        assert t.dtype == torch.bfloat16 and t.tolist() == [torch.tensor(default).bfloat16().item()] * 2


def test_bench_runs_a_t5_large_shape_with_an_fp8_kv_cache(tmp_path):
    """The known config at a tiny scale through `llmapi bench --load-format dummy --kv-cache-dtype fp8` on the CPU
    (the bench passes the cache dtype on; conversion no longer refuses it)."""
    from llmapi.cli import main

    tiny = tmp_path / "t5-large-tiny"
    tiny.mkdir()
    (tiny / "config.json").write_text(json.dumps({**_t5_large_config(), "d_model": 64, "d_kv": 16, "d_ff": 128,
                                                  "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
                                                  "vocab_size": 256}))
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny), "--load-format", "dummy", "--device", "cpu", "--kv-cache-dtype",
                 "fp8", "--isl", "6", "--osl", "4", "--num-requests", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kv_cache_dtype"] == "fp8" and result["llmapi"]["output_tokens"] == 16
    # The same settings through LLM: float8 caches, every scale the dummy default 1.0.
    with LLM(str(tiny), load_format="dummy", device="cpu", quant="fp8_kv_cache", skip_tokenizer_init=True) as llm:
        assert {c.dtype for c in llm._local.kv_caches} == {torch.float8_e4m3fn}
        scales = {n: p.tolist() for n, p in llm._local.model.named_parameters() if "kv_cache_scaling_factor" in n}
    assert scales == {name.format(i): [1.0, 1.0] for i in range(2) for name in (SELF, CROSS)}


GPU_NEW_TOKENS = 24


def _gpu_models():
    # test_encdec_gpu's models: T5 does not scale its attention scores, a 4-layer one at std 0.2 keeps float32
    # within 1e-4 of float64 and bf16 within fp32's top 5.
    return {"t5": em.t5("t5", layers=4, std=0.2), "bart": em.bart(encoder_layers=3, decoder_layers=2)}


def _gpu_requests(hf):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, hf.config.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 64, 120, 33, 1, 90, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["t5", "bart"])
@pytest.mark.parametrize("algo", ["FP8", "INT8"])
def test_gpu_bf16_quantized_cache_agrees_with_cpu_fp32_by_top5_rule(calibration, tmp_path, name, algo):
    """On the GPU in bfloat16 with the quantized caches (Triton kernels, decode CUDA graphs): up to the first
    mismatch the greedy tokens equal the CPU's float32 run with a float cache; there our token is in fp32
    transformers' top 5."""
    hf = _gpu_models()[name]
    hf.save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path, em.VOCAB)
    requests = _gpu_requests(hf)
    params = SamplingParams(max_tokens=GPU_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with LLM(str(tmp_path), dtype="float32", device="cpu", tokens_per_block=16) as llm:
        want = [list(o.outputs[0].token_ids) for o in llm.generate(requests, params, use_tqdm=False)]
    with LLM(str(tmp_path), dtype="bfloat16", device="cuda", tokens_per_block=16,
             quant=_quant(algo, calibration)) as llm:
        outs = llm.generate(requests, params, use_tqdm=False)  # one batch: encoders, then graph decodes
        assert {c.dtype for c in llm._local.kv_caches} == {CACHE_DTYPE[algo]}
        assert llm._runner.stats.graph_steps > 0
    start = hf.config.decoder_start_token_id
    for enc, out, ref in zip(requests, outs, want):
        for i, (a, b) in enumerate(zip(out.outputs[0].token_ids, ref)):
            if a == b:
                continue
            with torch.no_grad():
                logits = hf(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([[start] + ref[:i]]),
                            use_cache=False).logits[0, -1]
            assert a in logits.topk(5).indices.tolist(), f"our token {a} at {i} is not in fp32's top 5"
            break


def test_tensor_parallel_two_ranks_equal_one(saved, runs):
    """Two tensor-parallel ranks (each with half the heads, in its own quantized caches, with the layer's whole
    scales) give one rank's tokens."""
    path, hf, _ = saved["bart"]
    *_, engine, _, config = runs("bart", "INT8")
    prompts = [{"encoder_prompt": e, "decoder_prompt": d} for e, d in _prompts(hf, 6, seed=7)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    quant = QuantConfig.from_dict(config["quantization"])
    with one_thread():
        with LLM(str(path), dtype="float32", device="cpu", tokens_per_block=4, quant=quant) as llm:
            one = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        with LLM(str(path), dtype="float32", device="cpu", tokens_per_block=4, quant=quant,
                 tensor_parallel_size=2) as llm:
            two = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    assert two == one
