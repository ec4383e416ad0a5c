"""Quantization of encoder-decoder models: weight-only int8, FP8 (calibrated on the model's encoder and teacher-forced
decoder) and SmoothQuant swap every encoder and decoder linear, cross-attention's included; the quantized engine's
prompt logprobs stay near the float engine's (CPU: FP8 runs emulated)."""

import importlib.util

import pytest
import torch
from safetensors import safe_open
from tiny_tokenizer import make_tiny_tokenizer, save_tiny_tokenizer

import encdec_models as em
from family_parity import one_thread
from llmapi import LLM, SamplingParams
from llmapi._kernels.fp8_linear import FP8_DTYPE
from llmapi.quantization.calibration import calibration_texts

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gensim") is None,
                                reason="needs gensim (the test extra installs it): the calibration text")


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bart-quant")
    hf = em.bart(seed=2)
    hf.save_pretrained(path)
    save_tiny_tokenizer(path, em.VOCAB)
    return path, hf


def _prompt_logprobs(path, quant):
    requests = [(enc, [2] + dec) for enc, dec in zip(em.inputs(4, em.VOCAB, seed=3), em.inputs(4, em.VOCAB, seed=4))]
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    with one_thread(), LLM(str(path), dtype="float32", device="cpu", quant=quant, tokens_per_block=4) as llm:
        outs = llm.generate([{"encoder_prompt": e, "decoder_prompt": d} for e, d in requests], params, use_tqdm=False)
        engine = llm.engine_info.path
    values = torch.tensor([entry[token].logprob for out, (_, dec) in zip(outs, requests)
                           for entry, token in zip(out.prompt_logprobs[1:], dec[1:])])
    return values, engine


@pytest.mark.parametrize("quant,bound", [("int8_weight_only", 0.05), ("fp8", 0.25), ("smoothquant", 0.25)])
def test_quantized_linears_stay_near_float(bart_dir, quant, bound):
    path, _ = bart_dir
    ref, _ = _prompt_logprobs(path, None)
    got, engine = _prompt_logprobs(path, quant)
    rel = float((got - ref).abs().mean() / ref.abs().mean())
    assert 0 < rel < bound, rel  # quantized (not the float engine), and close to it
    with safe_open(str(engine / "rank0.safetensors"), "pt") as f:
        for linear in ("encoder.layers.0.attention.qkv", "decoder.layers.1.cross_attention.kv",
                       "decoder.layers.0.cross_attention.q", "encoder.layers.1.mlp.proj"):
            weight = f.get_tensor(f"{linear}.weight")
            assert weight.dtype == {"int8_weight_only": torch.int8, "fp8": FP8_DTYPE, "smoothquant": torch.int8}[quant]


def test_fp8_activation_scale_is_the_calibration_amax(bart_dir):
    """Hand check: the encoder's first qkv input amax over the calibration texts (transformers' BART on the same
    ids), / 448, is the engine's static activation scale."""
    path, hf = bart_dir
    _, engine = _prompt_logprobs(path, "fp8")
    with safe_open(str(engine / "rank0.safetensors"), "pt") as f:
        scale = float(f.get_tensor("encoder.layers.0.attention.qkv.activation_scaling_factor"))
    tokenizer = make_tiny_tokenizer(em.VOCAB)
    seen = []
    handle = hf.model.encoder.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][0]))
    with torch.no_grad():
        for text in calibration_texts():
            ids = tokenizer(text)["input_ids"][:hf.config.max_position_embeddings]
            if ids:
                hf.model.encoder(torch.tensor([ids]))
    handle.remove()
    assert scale == pytest.approx(float(torch.cat(seen).abs().max()) / 448, rel=1e-5)


def test_kv_cache_quantization_with_the_default_calibration_text(bart_dir):
    """The quantized KV cache (once refused for encoder-decoder models) converts on the default calibration text:
    float8 caches, a (K, V) scale pair for each decoder layer's self- and cross-attention. Its accuracy checks
    against transformers are in test_encdec_kv_quant."""
    path, _ = bart_dir
    with one_thread(), LLM(str(path), dtype="float32", device="cpu", quant="fp8_kv_cache", tokens_per_block=4) as llm:
        assert {c.dtype for c in llm._local.kv_caches} == {torch.float8_e4m3fn}
        out = llm.generate([[5, 9, 17, 33, 4]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
        engine = llm.engine_info.path
    assert len(out.token_ids) == 4
    with safe_open(str(engine / "rank0.safetensors"), "pt") as f:
        names = {n for n in f.keys() if n.endswith("kv_cache_scaling_factor")}
        assert names == {f"decoder.layers.{i}.{a}.kv_cache_scaling_factor"
                         for i in range(2) for a in ("attention", "cross_attention")}
        assert all(float(f.get_tensor(n).min()) > 0 for n in names)
