"""Encoder-decoder models through LLM (the same executor, engine cache and SamplingParams as decoder-only models):
token-exact against transformers' generate (fp32) for tiny T5 / T5 v1.1 / mT5 / ByT5 / BART / mBART / FSMT models,
greedy with mixed encoder lengths, chunked decoder prefill and forced preemption, beam search, the prefix-cache
trap, memory after a mixed load with aborts, the API (encoder / decoder prompts, streaming, n, logprobs, stops,
generation-config defaults) and typed errors."""

import asyncio
import json
import random

import pytest
import torch
import transformers

import encdec_models as em
from family_parity import one_thread
from llmapi import LLM, SamplingParams
from llmapi.errors import RequestError, UnsupportedModelError

BLOCK = 4
MAX_TOKENS = 12
MODELS = {
    "t5": lambda: em.t5("t5"), "t5v1.1": lambda: em.t5("t5v1.1"), "mt5": lambda: em.t5("mt5"),
    "byt5": lambda: em.t5("byt5"), "bart": lambda: em.bart(), "mbart": lambda: em.bart(mbart=True),
    "bart-3-2": lambda: em.bart(encoder_layers=3, decoder_layers=2), "fsmt": lambda: em.fsmt(),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """name -> (directory, the transformers model): each model saved once for the module."""
    made = {}

    def get(name):
        if name not in made:
            hf = MODELS[name]()
            path = tmp_path_factory.mktemp(name.replace(".", "_"))
            hf.save_pretrained(path)
            made[name] = (path, hf)
        return made[name]
    return get


def _llm(path, **kwargs):
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("skip_tokenizer_init", True)
    kwargs.setdefault("tokens_per_block", BLOCK)
    return LLM(str(path), **kwargs)


def _vocabs(hf):
    cfg = hf.config
    if hasattr(cfg, "src_vocab_size"):
        return cfg.src_vocab_size, cfg.tgt_vocab_size
    return cfg.vocab_size, cfg.vocab_size


def _requests(hf, count=10, seed=0):
    """Encoder inputs of mixed lengths (3 to 40 tokens), each with a decoder prompt: the default (the decoder start
    alone) for half of them, else the start plus 1 to 13 tokens (so that decoder prompts too run in chunks)."""
    enc_vocab, dec_vocab = _vocabs(hf)
    rng = random.Random(seed)
    start = hf.config.decoder_start_token_id
    out = []
    for i in range(count):
        enc = [rng.randrange(3, enc_vocab) for _ in range(rng.randrange(3, 41))]
        dec = [start] + ([rng.randrange(3, dec_vocab) for _ in range(rng.randrange(1, 14))] if i % 2 else [])
        out.append((enc, dec))
    return out


def _hf_generate(hf, enc, dec, **kwargs):
    """transformers' continuation of decoder prompt `dec` for encoder input `enc` (fp32, one at a time)."""
    if isinstance(hf, transformers.FSMTForConditionalGeneration) and len(dec) > 1 and kwargs.get("num_beams", 1) == 1:
        # FSMT's cached forward has no causal mask over a multi-token decoder input (it builds the mask only with
        # use_cache=False), so generate() would prefill the decoder prompt bidirectionally: greedy by full
        # forwards instead.
        out, steps = list(dec), kwargs["max_new_tokens"]
        forced_eos = hf.generation_config.forced_eos_token_id
        with torch.inference_mode():
            for step in range(steps):
                logits = hf(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([out]),
                            use_cache=False).logits[0, -1]
                # transformers' ForcedEOSTokenLogitsProcessor: the last token allowed is the forced EOS.
                out.append(int(forced_eos) if step == steps - 1 and forced_eos is not None else int(logits.argmax()))
                if out[-1] == hf.config.eos_token_id:
                    break
        return out[len(dec):]
    with torch.inference_mode():
        gen = hf.generate(torch.tensor([enc]), attention_mask=torch.ones(1, len(enc), dtype=torch.long),
                          decoder_input_ids=torch.tensor([dec]), do_sample=False, **kwargs)
    return gen[0, len(dec):].tolist()


def _prompt(enc, dec):
    return {"encoder_prompt": enc, "decoder_prompt": dec}


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_equals_transformers(model_dirs, name):
    """10 requests in one batch: mixed encoder lengths, decoder prompts in several chunks (a 48-token step budget
    takes a 40-token encoder input and 8 decoder tokens), preemption forced by a cache of 24 blocks."""
    path, hf = model_dirs(name)
    requests = _requests(hf)
    with one_thread(), _llm(path, max_num_tokens=48, kv_cache_config={"max_tokens": 24 * BLOCK}) as llm:
        outs = llm.generate([_prompt(e, d) for e, d in requests],
                            SamplingParams(max_tokens=MAX_TOKENS, temperature=0), use_tqdm=False)
        stats = llm.get_stats()
        free = llm.get_stats()["num_free_blocks"]
        assert free == llm.num_kv_blocks
    assert stats["num_preemptions"] > 0, "the small cache should have forced preemptions"
    got = [list(o.outputs[0].token_ids) for o in outs]
    want = [_hf_generate(hf, e, d, max_new_tokens=MAX_TOKENS, num_beams=1) for e, d in requests]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"request {i} (encoder {len(requests[i][0])} tokens, decoder prompt {len(requests[i][1])}): " \
                       f"{g} != transformers' {w}"
    assert len({tuple(w) for w in want}) >= 3
    assert outs[3].encoder_prompt_token_ids == requests[3][0]
    assert outs[3].prompt_token_ids == requests[3][1]


@pytest.mark.parametrize("name", ["t5", "bart"])
@pytest.mark.parametrize("beams", [2, 4])
def test_beam_search_equals_transformers(model_dirs, name, beams):
    path, hf = model_dirs(name)
    requests = _requests(hf, count=4, seed=5)
    params = SamplingParams(use_beam_search=True, best_of=beams, n=1, max_tokens=MAX_TOKENS, temperature=0)
    with one_thread(), _llm(path) as llm:
        outs = llm.generate([_prompt(e, d) for e, d in requests], params, use_tqdm=False)
        assert llm.get_stats()["num_free_blocks"] == llm.num_kv_blocks
    for (e, d), out in zip(requests, outs):
        want = _hf_generate(hf, e, d, max_new_tokens=MAX_TOKENS, num_beams=beams, early_stopping=False,
                            length_penalty=1.0)
        assert list(out.outputs[0].token_ids) == want


def test_tensor_parallel_equals_one_rank(model_dirs):
    for name in ("t5", "bart"):
        path, hf = model_dirs(name)
        prompts = [_prompt(e, d) for e, d in _requests(hf, count=6, seed=7)]
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
        with one_thread():
            with _llm(path) as llm:
                one = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
            with _llm(path, tensor_parallel_size=2, max_num_tokens=48) as llm:
                two = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        assert two == one, name


def test_prefix_cache_keeps_sources_apart(model_dirs):
    """Different encoder inputs with one decoder prompt of 3 full blocks never share KV; the same pair twice does."""
    path, hf = model_dirs("t5")
    rng = random.Random(11)
    dec = [0] + [rng.randrange(3, em.VOCAB) for _ in range(3 * BLOCK)]
    encs = [[rng.randrange(3, em.VOCAB) for _ in range(n)] for n in (7, 13)]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    with one_thread(), _llm(path) as llm:
        alone = [list(llm.generate(_prompt(e, dec), params, use_tqdm=False).outputs[0].token_ids) for e in encs]
        hits = llm.get_stats()["num_prefix_hit_tokens"]
        assert hits == 0, "a decoder prompt under another encoder input must not hit the prefix cache"
        again = list(llm.generate(_prompt(encs[0], dec), params, use_tqdm=False).outputs[0].token_ids)
        assert llm.get_stats()["num_prefix_hit_tokens"] > hits, "the same encoder and decoder prompts should hit"
    assert alone[0] != alone[1]
    assert again == alone[0]
    assert alone == [_hf_generate(hf, e, dec, max_new_tokens=MAX_TOKENS) for e in encs]


def test_mixed_load_with_aborts_frees_every_block(model_dirs):
    path, hf = model_dirs("bart")
    rng = random.Random(3)
    enc_vocab, _ = _vocabs(hf)
    with one_thread(), _llm(path, kv_cache_config={"max_tokens": 160 * BLOCK}) as llm:
        outs = []
        for i in range(500):
            enc = [rng.randrange(3, enc_vocab) for _ in range(rng.randrange(1, 30))]
            kind = i % 5
            params = SamplingParams(max_tokens=rng.randrange(1, 8), temperature=0 if kind < 2 else 0.8, seed=i,
                                    n=2 if kind == 2 else 1, use_beam_search=kind == 3,
                                    best_of=2 if kind == 3 else None)
            outs.append(llm.generate_async(enc, params))
            if i % 7 == 0:
                outs[-1].abort()
        for out in outs:
            out.result(timeout=120)
        stats = llm.get_stats()
        assert stats["num_free_blocks"] == llm.num_kv_blocks, stats


def test_api_streaming_n_logprobs_stops(model_dirs):
    path, hf = model_dirs("t5")
    enc, dec = _requests(hf, count=1, seed=9)[0]
    want = _hf_generate(hf, enc, dec, max_new_tokens=MAX_TOKENS)
    with one_thread(), _llm(path) as llm:
        # A plain prompt is the encoder input; the decoder prompt is the decoder start.
        plain = llm.generate(enc, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), use_tqdm=False)
        assert list(plain.outputs[0].token_ids) == _hf_generate(hf, enc, [0], max_new_tokens=MAX_TOKENS)
        assert plain.prompt_token_ids == [0] and plain.encoder_prompt_token_ids == enc

        async def stream():
            out = llm.generate_async(_prompt(enc, dec), SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                                     streaming=True)
            seen = []
            async for part in out:
                seen.append(len(part.outputs[0].token_ids))
            return out, seen
        out, seen = asyncio.run(stream())
        assert list(out.outputs[0].token_ids) == want and len(seen) > 1

        logprobs = llm.generate(_prompt(enc, dec), SamplingParams(max_tokens=4, temperature=0, logprobs=2),
                                use_tqdm=False).outputs[0]
        assert len(logprobs.logprobs) == 4
        with torch.inference_mode():
            ref = hf(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([dec + want[:3]]),
                     use_cache=False).logits[0, len(dec) - 1:].log_softmax(-1)
        for i, (token, entry) in enumerate(zip(want[:4], logprobs.logprobs)):
            assert abs(entry[token].logprob - ref[i, token].item()) < 1e-3

        stop = want[2]
        stopped = llm.generate(_prompt(enc, dec), SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                 stop_token_ids=[stop]), use_tqdm=False)
        assert list(stopped.outputs[0].token_ids) == want[:want.index(stop) + 1]
        assert stopped.outputs[0].finish_reason == "stop"

        sampled = llm.generate(_prompt(enc, dec), SamplingParams(max_tokens=6, temperature=1.0, n=3, seed=4),
                               use_tqdm=False)
        assert len(sampled.outputs) == 3 and all(len(o.token_ids) == 6 for o in sampled.outputs
                                                 if o.finish_reason == "length")
        assert llm.get_stats()["num_free_blocks"] == llm.num_kv_blocks


def test_generation_config_defaults_equal_transformers(tmp_path):
    """A BART whose generation config asks for beams, forced BOS / EOS, min_length and no_repeat_ngram_size (as
    bart-large-cnn's does): generate() without params follows it as transformers' generate() does."""
    hf = em.bart(seed=4)
    gen = dict(num_beams=3, length_penalty=2.0, early_stopping=True, min_length=6, max_length=14,
               no_repeat_ngram_size=2, forced_bos_token_id=0, forced_eos_token_id=2, decoder_start_token_id=2)
    for key, value in gen.items():
        setattr(hf.generation_config, key, value)
    hf.save_pretrained(tmp_path)
    requests = _requests(hf, count=4, seed=12)
    with one_thread(), _llm(tmp_path) as llm:
        defaults = llm.get_default_sampling_params()
        assert defaults.use_beam_search and defaults.best_of == 3 and defaults.no_repeat_ngram_size == 2
        outs = llm.generate([e for e, _ in requests], use_tqdm=False)
    for (enc, _), out in zip(requests, outs):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([enc]), attention_mask=torch.ones(1, len(enc), dtype=torch.long))
        assert [2] + list(out.outputs[0].token_ids) == ref[0].tolist()


def test_typed_errors(model_dirs, tmp_path):
    path, hf = model_dirs("bart")
    with _llm(path, max_encoder_input_len=20) as llm:
        with pytest.raises(RequestError, match="max_encoder_input_len"):
            llm.generate(list(range(3, 30)), SamplingParams(max_tokens=2), use_tqdm=False)
        with pytest.raises(RequestError, match="encoder prompt"):
            llm.generate({"decoder_prompt": [2, 5]}, SamplingParams(max_tokens=2), use_tqdm=False)
        with pytest.raises(RequestError, match="encoder-decoder"):
            llm.chat([{"role": "user", "content": "hi"}])
        ok = llm.generate([5, 6, 7], SamplingParams(max_tokens=2), use_tqdm=False)  # the LLM still serves
        assert len(ok.outputs[0].token_ids) == 2
    with pytest.raises(ValueError, match="max_encoder_input_len"):
        _llm(path, max_encoder_input_len=10_000)
    with pytest.raises(UnsupportedModelError, match="pipeline"):
        _llm(path, pipeline_parallel_size=2)
    pegasus = tmp_path / "pegasus"
    pegasus.mkdir()
    (pegasus / "config.json").write_text(json.dumps({"architectures": ["PegasusForConditionalGeneration"],
                                                     "model_type": "pegasus", "is_encoder_decoder": True}))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder architecture 'PegasusForConditionalGeneration'"):
        _llm(pegasus, load_format="dummy")


def test_text_prompts_through_the_tokenizer(tmp_path):
    """ByT5's byte tokenizer (transformers', saved beside the model): text in, text out, as transformers."""
    from transformers import ByT5Tokenizer

    hf = em.t5("byt5", seed=3)
    tokenizer = ByT5Tokenizer()
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    texts = ["translate English to German: The house is wonderful.", "summarize: bytes in, bytes out"]
    with one_thread(), _llm(tmp_path, skip_tokenizer_init=False) as llm:
        outs = llm.generate(texts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), use_tqdm=False)
    for text, out in zip(texts, outs):
        enc = tokenizer(text).input_ids
        assert out.encoder_prompt == text and out.encoder_prompt_token_ids == enc
        want = _hf_generate(hf, enc, [0], max_new_tokens=MAX_TOKENS)
        assert list(out.outputs[0].token_ids) == want
        assert out.outputs[0].text == tokenizer.decode(want, skip_special_tokens=True)


def test_decoder_only_model_refuses_encoder_prompts(tmp_path):
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    with _llm(tmp_path) as llm:
        with pytest.raises(RequestError, match="decoder-only"):
            llm.generate({"encoder_prompt": [5, 6], "decoder_prompt": [1]}, SamplingParams(max_tokens=2))


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_decode_graph_path_equals_transformers(model_dirs, name, monkeypatch):
    """Decode steps through the decode-graph path (its CPU stand-in: the static, padded buffers with each row's
    cross blocks) give transformers' tokens; steps that start a request (its encoder) run eagerly."""
    from llmapi.runtime.cuda_graph import GRAPHS_ON_CPU_ENV

    monkeypatch.setenv(GRAPHS_ON_CPU_ENV, "1")
    path, hf = model_dirs(name)
    requests = _requests(hf, count=6, seed=13)
    with one_thread(), _llm(path, max_batch_size=8) as llm:
        outs = llm.generate([_prompt(e, d) for e, d in requests], SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                            use_tqdm=False)
        stats = llm._runner.stats
        assert 0 < stats.graph_steps < stats.steps
    for (enc, dec), out in zip(requests, outs):
        assert list(out.outputs[0].token_ids) == _hf_generate(hf, enc, dec, max_new_tokens=MAX_TOKENS)


def test_t5_sentencepiece_tokenizer(tmp_path):
    """A T5 SentencePiece (Unigram) tokenizer trained here, loaded through transformers: text prompts equal
    transformers' generate on the tokenizer's ids."""
    import io

    import sentencepiece as spm
    from transformers import T5Tokenizer

    texts = ["translate English to German: The house is wonderful.", "summarize: the quick brown fox jumps",
             "once upon a time there was a small language model", "a cache must never convert a model twice"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts * 20), model_writer=model, vocab_size=96,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "spiece.model").write_bytes(model.getvalue())
    tokenizer = T5Tokenizer.from_pretrained(tmp_path, extra_ids=0)
    tokenizer.save_pretrained(tmp_path)
    hf = em.t5("t5", seed=6)
    hf.save_pretrained(tmp_path)
    with one_thread(), _llm(tmp_path, skip_tokenizer_init=False) as llm:
        outs = llm.generate(texts[:2], SamplingParams(max_tokens=MAX_TOKENS, temperature=0), use_tqdm=False)
    for text, out in zip(texts, outs):
        enc = tokenizer(text).input_ids
        assert out.encoder_prompt_token_ids == enc and enc[-1] == 1  # T5 appends EOS
        want = _hf_generate(hf, enc, [0], max_new_tokens=MAX_TOKENS)
        assert list(out.outputs[0].token_ids) == want
        assert out.outputs[0].text == tokenizer.decode(want, skip_special_tokens=True)


def test_saved_engine_generates_the_same(model_dirs, tmp_path):
    """LLM.save writes the encoder-decoder engine (config.json says is_encoder_decoder, with encoder and decoder
    sections; encoder.* and decoder.* tensors); an LLM from the saved directory gives the same tokens."""
    path, hf = model_dirs("bart")
    prompts = [_prompt(e, d) for e, d in _requests(hf, count=3, seed=21)]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    with one_thread(), _llm(path) as llm:
        first = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.save(str(tmp_path / "engine"))
    config = json.loads((tmp_path / "engine" / "config.json").read_text())
    assert config["is_encoder_decoder"] and config["encoder"]["num_layers"] == 2
    assert config["decoder"]["num_layers"] == config["num_hidden_layers"] == 2
    with one_thread(), _llm(tmp_path / "engine") as llm:
        assert not llm.engine_built
        again = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    assert again == first
