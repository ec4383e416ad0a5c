"""Weight-only int8/int4 quantization: reference error bounds, the quantized linear, and an end-to-end tiny Llama."""

import pytest
import torch
from tiny_models import check_cached_engine_generates, logits_rel_error

from llmapi._kernels.weight_only import (dequantize_ref, pack_int4, quantize_weight_ref, unpack_int4,
                                  weight_only_linear_ref)
from llmapi import LLM, QuantConfig
from llmapi.engine import cache
from llmapi.quantization.weight_only import WeightOnlyLinear

MODES = {"int8-channel": (8, None), "int4-group64": (4, 64), "int4-group128": (4, 128), "int4-channel": (4, None),
         "int8-group128": (8, 128)}


def _weight(n=48, k=256, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05  # [N, K]
    w[3] = 0.0  # an all-zero row must survive (no division by zero)
    w[5, 7] = 1.5  # an outlier widens its row's (or group's) scale
    return w


@pytest.mark.parametrize("mode", list(MODES))
def test_quantize_dequantize_error_bound(mode):
    bits, group = MODES[mode]
    w = _weight()
    q, scale = quantize_weight_ref(w, bits, group)
    n, k = w.shape
    assert q.dtype == torch.int8 and q.shape == (n, k if bits == 8 else k // 2)
    assert scale.shape == ((n,) if group is None else (n, k // group))
    # Hand-computed scales: max |w| of the row (or group) over the largest code, 127 or 7.
    qmax = 127 if bits == 8 else 7
    blocks = w.reshape(n, -1, group or k)  # [N, G, g]
    expected = blocks.abs().amax(-1) / qmax  # [N, G]
    expected[3] = 1.0  # the zero row's scale is 1 by design
    torch.testing.assert_close(scale.reshape(n, -1), expected, rtol=0, atol=0)
    err = (dequantize_ref(q, scale, bits, group) - w).abs().reshape(n, -1, group or k)  # [N, G, g]
    bound = expected[..., None] / 2 * (1 + 1e-6)
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(err[3].max()) == 0.0
    codes = unpack_int4(q) if bits == 4 else q
    assert int(codes.abs().max()) == qmax  # each row's largest element hits the top code


def test_int4_packing_round_trips_every_code():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # [3, 32], every int4 value at even and odd columns
    codes = torch.cat([codes, codes.flip(1)])  # [6, 32]
    packed = pack_int4(codes)
    assert packed.shape == (6, 16)
    assert torch.equal(unpack_int4(packed), codes)
    # Low nibble = even column: codes (1, -1) pack to 0xF1.
    assert int(pack_int4(torch.tensor([[1, -1]], dtype=torch.int8))[0, 0]) == 0xF1 - 256


@pytest.mark.parametrize("mode", list(MODES))
def test_weight_only_linear_equals_dequantized_matmul(mode):
    bits, group = MODES[mode]
    w, bias = _weight(), torch.randn(48)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))  # [T, K]
    quant = QuantConfig(quant_algo="W8A16" if bits == 8 else "W4A16", group_size=group)
    linear = WeightOnlyLinear(torch.nn.Linear(256, 48), quant)
    q, scale = quantize_weight_ref(w, bits, group)
    with torch.no_grad():
        linear.weight.copy_(q)
        linear.weights_scaling_factor.copy_(scale)
        linear.bias.copy_(bias)
    expected = x @ dequantize_ref(q, scale, bits, group).T + bias  # [T, N], the plain-torch reference
    torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight_only_linear_ref(x, q, scale, bias, bits, group), expected, rtol=1e-5, atol=1e-5)
    # And close to the float linear: |x| |w - dq| is bounded by sum |x| * scale / 2 per output.
    per_out = scale.reshape(48, -1).repeat_interleave((group or 256), dim=1) / 2  # [N, K]
    bound = x.abs() @ per_out.T  # [T, N]
    assert bool(((expected - (x @ w.T + bias)).abs() <= bound * (1 + 1e-5) + 1e-6).all())


@pytest.mark.parametrize("quant,bound", [("int8_weight_only", 0.03), (QuantConfig("W4A16", group_size=64), 0.45)])
def test_quantized_tiny_llama_end_to_end(tiny_llama_dir, tmp_path, quant, bound):
    # A cache of its own: other tests may have built this model in this mode in the session's cache already.
    ref = LLM(str(tiny_llama_dir), device="cpu", cache_dir=str(tmp_path))
    builds = cache.stats.builds
    llm = LLM(str(tiny_llama_dir), device="cpu", quant=quant, cache_dir=str(tmp_path))
    assert llm.engine_built and cache.stats.builds == builds + 1
    assert llm.engine_info.path != ref.engine_info.path  # its own cache key
    section = llm.engine_info.config["quantization"]
    expected_algo = "W8A16" if quant == "int8_weight_only" else "W4A16"
    assert section == {"quant_algo": expected_algo, "kv_cache_quant_algo": None,
                       "group_size": None if quant == "int8_weight_only" else 64}
    assert ref.engine_info.config["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}

    from safetensors import safe_open
    with safe_open(str(llm.engine_info.path / "rank0.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("transformer.layers.0.mlp.gate_up.weight").dtype == torch.int8
        assert f.get_tensor("transformer.vocab_embedding.weight").dtype == torch.float32
    for linear in ("attention.qkv", "attention.dense", "mlp.gate_up", "mlp.proj"):
        assert f"transformer.layers.1.{linear}.weights_scaling_factor" in names
    assert not any("scaling_factor" in n for n in names if "embedding" in n or "lm_head" in n or "norm" in n)

    check_cached_engine_generates(tiny_llama_dir, llm, builds + 1, device="cpu", quant=quant,
                                  cache_dir=str(tmp_path))  # converts nothing
    for x in (ref, llm):
        x.shutdown()
    rel = logits_rel_error(ref.engine_info.path, llm.engine_info.path)
    # Relative logits error measured on this tiny model (std-0.1 Gaussian weights, 3 layers): int8 per channel
    # 0.0195, int4 group 64 0.326. Per linear, rounding noise is ~amax / qmax / sqrt(12) of a weight's std:
    # ~0.8% for int8 (amax ~3.5 std over 64-128 inputs), ~10% for int4 (~2.4 std per group of 64).
    assert rel < bound, rel


def test_quant_errors():
    with pytest.raises(ValueError, match="unknown.*int8_weight_only"):
        LLM("unused", quant="int3_magic")
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig("W4A16", group_size=32)
    with pytest.raises(ValueError, match="quant_algo.*not supported yet"):
        QuantConfig("INT8")
    with pytest.raises(ValueError, match="quant_algo"):
        QuantConfig("W9A16")


def test_group_that_does_not_divide_the_features(tiny_llama_dir):
    # The tiny Llama has 64 hidden features: group 128 cannot tile them, and the error names the size that can.
    with pytest.raises(ValueError, match="group_size=128 does not divide the 64 input features of "
                                         "transformer.layers.0.attention.qkv.weight; group_size=64 does"):
        LLM(str(tiny_llama_dir), device="cpu", quant="int4_awq")
