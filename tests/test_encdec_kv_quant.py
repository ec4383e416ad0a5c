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
from llmapi import LLM, QuantConfig, SamplingParams
from llmapi.quantization.calibration import calibration_texts

SELF = "decoder.layers.{}.attention.kv_cache_scaling_factor"
CROSS = "decoder.layers.{}.cross_attention.kv_cache_scaling_factor"
CODE_MAX = {"FP8": 448.0, "INT8": 127.0}
CACHE_DTYPE = {"FP8": torch.float8_e4m3fn, "INT8": torch.int8}
NEW_TOKENS = 4


def _models():
    # The 2-layer T5 at the parity tests' std 0.5 (its unscaled attention is sharp at that width, but a 2-layer
    # model's float32 stays token exact there), BART at the builders' 0.3.
    return {"t5": em.t5("t5", seed=1), "bart": em.bart(seed=2)}


def _calibration_lines() -> list[str]:
    """Text of the tiny word-level tokenizer: its sentences, then every filler word in a shuffled order, 20 a line
    (English news would be <unk> to it)."""
    vocab = make_tiny_tokenizer(em.VOCAB).get_vocab()
    words = sorted((w for w in vocab if w.startswith("w")), key=lambda w: vocab[w])
    random.Random(0).shuffle(words)
    sentences = ["the quick brown fox jumps over the lazy dog", "once upon a time there was a small language model"]
    return sentences + [" ".join(words[i:i + 20]) for i in range(0, len(words), 20)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (directory with the model and the tiny tokenizer, transformers model, calibration file)."""
    root = tmp_path_factory.mktemp("encdec-kv")
    calibration = root / "calibration.txt"
    calibration.write_text("\n".join(_calibration_lines()) + "\n")
    out = {}
    for name, hf in _models().items():
        path = root / name
        hf.save_pretrained(path)
        save_tiny_tokenizer(path, em.VOCAB)
        out[name] = (path, hf, calibration)
    return out


def _quant(algo: str | None, calibration, weights: str | None = None) -> QuantConfig | None:
    if algo is None and weights is None:
        return None
    return QuantConfig(quant_algo=weights, kv_cache_quant_algo=algo, calibration_dataset=str(calibration))


def _requests(hf) -> list[list[int]]:
    return em.inputs(6, hf.config.vocab_size, seed=7, lengths=(3, 20))


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
    if hf.config.model_type == "bart":
        for i, layer in enumerate(hf.model.decoder.layers):
            out += [(i, "self", layer.self_attn.k_proj, layer.self_attn.v_proj),
                    (i, "cross", layer.encoder_attn.k_proj, layer.encoder_attn.v_proj)]
    else:  # T5
        for i, block in enumerate(hf.decoder.block):
            out += [(i, "self", block.layer[0].SelfAttention.k, block.layer[0].SelfAttention.v),
                    (i, "cross", block.layer[1].EncDecAttention.k, block.layer[1].EncDecAttention.v)]
    return out


def _fake_quant(x: torch.Tensor, scale: float, algo: str) -> torch.Tensor:
    """What a cached value reads back as: codes x * (1 / scale) (float32 reciprocal), int8 rounded half to even and
    clamped to +-127, or E4M3 (clamped to +-448 first), times the scale."""
    inv = 1.0 / torch.tensor(scale, dtype=torch.float32)
    y = x.float() * inv
    if algo == "INT8":
        codes = torch.round(y).clamp(-127, 127)
    else:
        codes = y.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return (codes * torch.tensor(scale, dtype=torch.float32)).to(x.dtype)


def _noise(x: torch.Tensor, scale: float, algo: str, g: torch.Generator) -> torch.Tensor:
    """x held to the cache's range (+-127 or +-448 times the scale: values past the calibrated amax saturate) plus
    uniform noise as wide as its rounding error: half an int8 step (scale / 2); for E4M3 half a unit in the last
    place, 2**-4 of |x| (3 mantissa bits), and at least half the subnormal step scale * 2**-10."""
    x = x.clamp(-CODE_MAX[algo] * scale, CODE_MAX[algo] * scale)
    half = torch.full_like(x, scale / 2) if algo == "INT8" else torch.clamp(x.abs() / 16, min=scale * 2 ** -10)
    return x + (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1) * half


def _hf_logprobs(hf, requests, tokens, start, change=None) -> list[torch.Tensor]:
    """Teacher-forced log p(token) of each generated token, transformers' model without a cache; `change(layer,
    kind, "k" / "v", tensor)` replaces what each decoder K/V projection gives (the values a cache would hold)."""
    handles = []
    if change is not None:
        for layer, kind, k_proj, v_proj in _kv_projections(hf):
            for which, proj in (("k", k_proj), ("v", v_proj)):
                handles.append(proj.register_forward_hook(
                    lambda m, a, out, layer=layer, kind=kind, which=which: change(layer, kind, which, out)))
    out = []
    try:
        with torch.no_grad():
            for enc, toks in zip(requests, tokens):
                logits = hf(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([[start] + toks[:-1]]),
                            use_cache=False).logits[0].float()
                out.append(logits.log_softmax(-1).gather(1, torch.tensor(toks)[:, None])[:, 0])
    finally:
        for handle in handles:
            handle.remove()
    return out


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


@pytest.mark.parametrize("name", ["t5", "bart"])
@pytest.mark.parametrize("algo", ["FP8", "INT8"])
def test_logprobs_equal_transformers_with_quantized_kv(saved, runs, name, algo):
    """Greedy logprobs through the quantized caches (prefill, then decode steps reading both caches) equal
    transformers' teacher-forced logprobs of the same tokens when every decoder K/V it computes is replaced by what
    its cache would read back with the engine's scales: the codes are written and read with the right scale in
    every layer, self and cross. Without the quantization the difference is far larger (the check can fail)."""
    path, hf, _ = saved[name]
    tokens, logprobs, engine, _, config = runs(name, algo)
    scales = _engine_scales(engine, config["num_hidden_layers"])
    requests, start = _requests(hf), hf.config.decoder_start_token_id
    ours = [torch.tensor([step[t] for step, t in zip(steps, toks)]) for steps, toks in zip(logprobs, tokens)]
    quantized = _hf_logprobs(hf, requests, tokens, start, lambda layer, kind, which, out: _fake_quant(
        out, scales[layer, kind][0 if which == "k" else 1], algo))
    plain = _hf_logprobs(hf, requests, tokens, start)
    err = max(float((a - b).abs().max()) for a, b in zip(ours, quantized))
    err_float = max(float((a - b).abs().max()) for a, b in zip(ours, plain))
    assert err < 2e-5, err  # float32 reordering only (measured <= 2.3e-6)
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
