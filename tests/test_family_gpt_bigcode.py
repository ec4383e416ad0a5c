"""GPTBigCode family (GPTBigCodeForCausalLM: SantaCoder, StarCoder) against transformers: greedy tokens with chunked
prefill and prefix reuse for multi-query and multi-head attention and for the original bigcode/santacoder layout
(GPT2LMHeadCustomModel), TP=2 (the one KV head replicated) and PP=2 equal to one rank, every quantization mode,
and the converter's errors."""

import json
import re

import pytest
import torch
from family_parity import check_multi_rank, check_parity, vocab_size
from safetensors.torch import load_file
from tiny_models import (QUANT_MODE_BOUNDS, PagedDriver, check_quant_mode, make_tiny_gpt2, make_tiny_gpt_bigcode,
                         save_santacoder_checkpoint, write_word_calibration)
from tiny_tokenizer import save_tiny_tokenizer

from llmapi import UnsupportedModelError
from llmapi.models import convert_hf, get_model_class
from llmapi.models.gpt_bigcode import read_santacoder

# Variant -> (make the transformers reference model into a directory, whether the engine reads the original
# SantaCoder layout written from it). Seeds chosen so that greedy outputs differ across prompts.
VARIANTS = {
    "mqa": (lambda path: make_tiny_gpt_bigcode(path, seed=2), False),  # StarCoder, gpt_bigcode-santacoder
    "mha": (lambda path: make_tiny_gpt_bigcode(path, seed=2, multi_query=False), False),  # per-head q, k, v rows
    # bigcode/santacoder (attn.q_attn + attn.kv_attn); its remote-code config names gelu_fast
    "santacoder_multiquery": (lambda path: make_tiny_gpt_bigcode(path, seed=2, activation_function="gelu_fast"),
                              True),
    "santacoder_multihead": (lambda path: make_tiny_gpt2(path, seed=1), True),  # GPT-2's blocks
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Variant -> (the transformers model's HF directory, the directory the engine reads), each with the tiny
    word-level tokenizer. For the SantaCoder variants the second is the same weights in SantaCoder's layout."""
    dirs = {}
    for name, (make, santacoder) in VARIANTS.items():
        ref = tmp_path_factory.mktemp(f"tiny-bigcode-{name}")
        model = make(ref)
        save_tiny_tokenizer(ref, vocab_size=model.config.vocab_size)
        src = ref
        if santacoder:
            src = tmp_path_factory.mktemp(f"tiny-santacoder-{name}")
            save_santacoder_checkpoint(model, src)
            save_tiny_tokenizer(src, vocab_size=model.config.vocab_size)
        dirs[name] = (ref, src)
    return dirs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_parity_with_chunked_prefill_and_prefix_reuse(variant, model_dirs):
    ref, src = model_dirs[variant]
    stats = check_parity(src, vocab=vocab_size(ref), ref_dir=ref)
    assert max(stats["chunks"]) >= 4 and stats["prefix_hit_tokens"] > 0  # the 60-token prompt: 4 chunks of 16


@pytest.mark.parametrize("variant", ["mqa", "mha"])
def test_two_ranks_equal_one_rank(variant, model_dirs):
    """TP=2 splits the 4 query heads 2 and 2; the multi-query model's one K/V head is replicated on both ranks."""
    check_multi_rank(model_dirs[variant][1], vocab=vocab_size(model_dirs[variant][0]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, model_dirs):
    """Prefill and two decode steps over the paged cache give transformers' logits (the converted rows of every
    linear, whatever the layout: a mistake shows here even where greedy tokens would not)."""
    from transformers import AutoModelForCausalLM

    ref, src = model_dirs[variant]
    hf = AutoModelForCausalLM.from_pretrained(str(ref), dtype=torch.float32).eval()
    weights = load_file(str(src / "model.safetensors"))
    cfg, w = convert_hf(json.loads((src / "config.json").read_text()), weights, torch.float32)
    model = get_model_class(cfg["architecture"])(cfg, "cpu", torch.float32)
    model.load_weights(w)
    prompt, decoded = [5, 9, 17, 33, 4, 100, 7, 250, 11, 3], [42, 7]
    driver = PagedDriver(model.eval(), cfg)
    got = torch.cat([driver.step({0: prompt})[0]] + [driver.step({0: [t]})[0] for t in decoded])
    with torch.no_grad():
        want = hf(torch.tensor([prompt + decoded])).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    return write_word_calibration(tmp_path_factory.mktemp("bigcode-calibration"), vocab_size=288)


@pytest.mark.parametrize("mode", list(QUANT_MODE_BOUNDS))
def test_quantization_modes(mode, model_dirs, calibration):
    """Every mode converts and runs for the multi-query model (StarCoder's shape); its logits (through the engine's
    cache) stay within the Llama tests' bound. Measured: int8_weight_only 0.010, int4_weight_only (per channel)
    0.17, int4_awq 0.11, fp8 0.060, fp8_per_token 0.065, smoothquant 0.015, int8 KV cache 0.012, fp8 KV cache 0.028."""
    rel = check_quant_mode(model_dirs["mqa"][1], mode, calibration)
    assert 0 < rel < QUANT_MODE_BOUNDS[mode], (mode, rel)


def test_santacoder_reader_gives_transformers_tensors(model_dirs):
    """The SantaCoder layout read back is the transformers GPTBigCode state dict, tensor for tensor."""
    from transformers import AutoModelForCausalLM

    ref, src = model_dirs["santacoder_multiquery"]
    want = AutoModelForCausalLM.from_pretrained(str(ref)).state_dict()
    config, sd = read_santacoder(json.loads((src / "config.json").read_text()),
                                 load_file(str(src / "model.safetensors")))
    assert config["multi_query"] is True and config["model_type"] == "gpt_bigcode"
    got = {k: sd[k] for k in sd if not re.search(r"\.attn\.(masked_)?bias$", k)}  # the saved causal masks
    assert got.keys() == {k for k in want if k != "lm_head.weight"}  # the head is tied
    for k, v in got.items():
        assert torch.equal(v, want[k]), k


def _santacoder(model_dirs):
    src = model_dirs["santacoder_multiquery"][1]
    return json.loads((src / "config.json").read_text()), load_file(str(src / "model.safetensors"))


def test_santacoder_errors(model_dirs):
    config, sd = _santacoder(model_dirs)
    with pytest.raises(UnsupportedModelError, match="attention_head_type 'grouped' is not supported"):
        convert_hf({**config, "attention_head_type": "grouped"}, sd, torch.float32)
    with pytest.raises(UnsupportedModelError, match="attention scaling"):
        convert_hf({**config, "scale_attn_by_inverse_layer_idx": True}, sd, torch.float32)
    no_kv = {k: v for k, v in sd.items() if k != "transformer.h.1.attn.kv_attn.weight"}
    with pytest.raises(UnsupportedModelError, match="has transformer.h.1.attn.q_attn.weight without "
                                                    "transformer.h.1.attn.kv_attn.weight"):
        convert_hf(config, no_kv, torch.float32)
    bad_kv = {**sd, "transformer.h.0.attn.kv_attn.weight": torch.zeros(32, 32)}
    with pytest.raises(UnsupportedModelError, match="do not stack"):
        convert_hf(config, bad_kv, torch.float32)
    bad_q = {**sd, "transformer.h.0.attn.q_attn.weight": torch.zeros(64, 60)}
    with pytest.raises(UnsupportedModelError, match=r"attn.c_attn.weight' has shape \(92, 64\), the config implies "
                                                    r"\(96, 64\)"):
        convert_hf(config, bad_q, torch.float32)
    # A multi-query config over multi-head tensors: the c_attn that layout does not define is left as saved.
    multihead = load_file(str(model_dirs["santacoder_multihead"][1] / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match=r"'h.0.attn.c_attn.weight' has shape \(64, 192\), the config "
                                                    r"implies \(96, 64\)"):
        convert_hf(config, multihead, torch.float32)


@pytest.mark.parametrize("overrides,match", [
    (dict(n_head=5), "hidden_size 64 is not divisible by num_attention_heads 5"),
    (dict(n_layer=0), "'num_hidden_layers' must be a positive integer"),
    (dict(multi_query="yes"), "'multi_query' must be true or false"),
    (dict(scale_attn_weights=False), "attention scaling other than 1/sqrt"),
    (dict(add_cross_attention=True), "cross-attention"),
    (dict(activation_function="gelu_magic"), "activation 'gelu_magic' is not supported"),
])
def test_bad_configs_are_refused(overrides, match):
    hf = make_tiny_gpt_bigcode(n_layer=1)
    with pytest.raises(UnsupportedModelError, match=match):
        convert_hf({**hf.config.to_dict(), "architectures": ["GPTBigCodeForCausalLM"], **overrides},
                   hf.state_dict(), torch.float32)


def test_bad_checkpoints_are_refused():
    hf = make_tiny_gpt_bigcode(n_layer=1)
    config, sd = {**hf.config.to_dict(), "architectures": ["GPTBigCodeForCausalLM"]}, hf.state_dict()
    with pytest.raises(UnsupportedModelError, match="lacks tensor 'h.0.attn.c_attn.bias'"):
        convert_hf(config, {k: v for k, v in sd.items() if k != "transformer.h.0.attn.c_attn.bias"}, torch.float32)
    # A multi-head c_attn under a multi-query config: the shape names the mismatch.
    mha = make_tiny_gpt_bigcode(n_layer=1, multi_query=False).state_dict()
    with pytest.raises(UnsupportedModelError, match=r"c_attn.weight' has shape \(192, 64\), the config implies "
                                                    r"\(96, 64\)"):
        convert_hf(config, mha, torch.float32)
    with pytest.raises(UnsupportedModelError, match="does not know: h.0.attn.extra"):
        convert_hf(config, {**sd, "transformer.h.0.attn.extra": torch.zeros(1)}, torch.float32)
