"""INT4 AWQ: asymmetric rounding against a written-out reference, the scale search and GPTQ rounding on random
data (errors checked on the tokens themselves), the AWQ linear against its reference, a tiny Llama end to end."""

import pytest
import torch
from tiny_models import logits_rel_error
from tiny_models import PagedDriver, make_tiny_llama

from llmapi._kernels.weight_only import dequantize_ref, quantize_weight_ref, unpack_int4
from llmapi import LLM, QuantConfig
from llmapi.distributed.mapping import Mapping
from llmapi.distributed.sharding import build_rank_model
from llmapi.models import convert_hf
from llmapi.quantization.apply import quantized_linears
from llmapi.quantization.awq import awq_quantize, awq_search, dequantize_asym, gptq_round, quantize_asym
from llmapi.quantization.calibration import ActivationStats
from llmapi.quantization.config import resolve_quant
from llmapi.quantization.weight_only import AWQ_TENSORS, WeightOnlyLinear, quantize_weights


def _data(seed, n=96, k=256, s=512, outliers=8):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05  # [N, K]
    x = torch.randn(s, k, generator=g)  # [S, K]
    x[:, torch.randperm(k, generator=g)[:outliers]] *= 20  # a few salient channels, as in real activations
    return w, x


def _stats(x):
    """(mean |x| [K], H = mean x^T x [K, K]) as calibration gives them."""
    return x.abs().mean(0), x.T @ x / x.shape[0]


def _asym_rtn(w, group):
    """Plain asymmetric int4 round-to-nearest, written out: per group the range [min(w, 0), max(w, 0)] spans the
    16 codes -8..7, the zero point is the integer code of 0."""
    out = torch.empty_like(w)
    for row in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            block = w[row, start:start + group]
            lo, hi = min(float(block.min()), 0.0), max(float(block.max()), 0.0)
            scale = (hi - lo) / 15
            zero = -8 - round(lo / scale)
            codes = torch.clamp(torch.round(block / scale) + zero, -8, 7)
            out[row, start:start + group] = (codes - zero) * scale
    return out


def _output_mse(x, w_hat, w):
    """Mean over tokens of the squared output error, summed over output channels, computed on the tokens."""
    return float((x @ (w_hat - w).T).pow(2).mean(0).sum())


def test_asymmetric_round_to_nearest():
    w, _ = _data(0, n=8)
    q, scale, zero = quantize_asym(w, 64)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    assert torch.equal(zero, zero.round()) and scale.shape == zero.shape == (8, 4)
    w_hat = dequantize_asym(q, scale, zero, 64)
    torch.testing.assert_close(w_hat, _asym_rtn(w, 64), rtol=0, atol=1e-6)
    step = scale.repeat_interleave(64, dim=1)
    assert bool(((w_hat - w).abs() <= step / 2 + 1e-6).all())  # every weight within half a step of its own
    # An all-zero group (scale 1, every code the zero point) stays exactly zero.
    assert torch.equal(dequantize_asym(*quantize_asym(torch.zeros(4, 64), 64), 64), torch.zeros(4, 64))


@pytest.mark.parametrize("seed,group,outliers", [(0, 128, 8), (1, 64, 8), (2, 64, 0), (3, 128, 0)])
def test_awq_search_is_never_worse_than_rtn(seed, group, outliers):
    w, x = _data(seed, outliers=outliers)
    result = awq_search(w, *_stats(x), group)
    assert result.scales.shape == (256,) and bool((result.scales > 0).all())
    # The a = 0 grid point is plain round-to-nearest; its error, computed from H, is the error on the tokens.
    assert result.rtn_error == pytest.approx(_output_mse(x, _asym_rtn(w, group), w), rel=1e-4)
    assert result.error <= result.rtn_error
    # The error reported is the error of the scales returned.
    w_hat = _asym_rtn(w * result.scales, group) / result.scales
    assert _output_mse(x, w_hat, w) == pytest.approx(result.error, rel=1e-4)
    if outliers:
        # Measured: the error falls to about 0.45 of RTN's on such data (alpha 0.3).
        assert result.error < 0.6 * result.rtn_error and result.alpha > 0


@pytest.mark.parametrize("group", [64, 128])
def test_gptq_rounding_lowers_the_output_error(group):
    w, x = _data(5, outliers=8)
    _, hessian = _stats(x)
    q, scale, zero = gptq_round(w, hessian, group)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7 and torch.equal(zero, zero.round())
    rtn = _output_mse(x, _asym_rtn(w, group), w)
    # Measured: 0.78 (groups 64 and 128) of round-to-nearest's error on these tokens.
    assert _output_mse(x, dequantize_asym(q, scale, zero, group), w) < 0.85 * rtn
    # Uncorrelated inputs (H diagonal): no error has anywhere to go, GPTQ rounds to nearest.
    q_diag, scale_diag, zero_diag = gptq_round(w, torch.diag(torch.rand(256) + 0.5), group)
    q_rtn, scale_rtn, zero_rtn = quantize_asym(w, group)
    assert torch.equal(q_diag, q_rtn) and torch.equal(scale_diag, scale_rtn) and torch.equal(zero_diag, zero_rtn)


def test_dummy_weights_round_to_nearest():
    w, _ = _data(4)
    only_zero = awq_search(w, *_stats(_data(4)[1]), 64, grid=1)
    assert only_zero.alpha == 0.0 and torch.equal(only_zero.scales, torch.ones(256))
    awq = awq_quantize(w, None, None, 64)  # no calibration (dummy weights): s = 1, round-to-nearest
    assert torch.equal(awq.prequant_scaling_factor, torch.ones(256))
    q, scale, zero = quantize_asym(w, 64)
    assert torch.equal(unpack_int4(awq.weight), q) and torch.equal(awq.weights_scaling_factor, scale)
    assert torch.equal(awq.weights_zero_point, zero)


def test_awq_linear_equals_its_reference():
    w, x = _data(5)
    bias = torch.randn(96)
    quant = QuantConfig("W4A16_AWQ", group_size=64)
    awq = awq_quantize(w, *_stats(x), 64)
    assert awq.alpha > 0 and not torch.equal(awq.prequant_scaling_factor, torch.ones(256))
    linear = WeightOnlyLinear(torch.nn.Linear(256, 96), quant)
    with torch.no_grad():
        for name in AWQ_TENSORS:
            getattr(linear, name).copy_(getattr(awq, name))
        linear.bias.copy_(bias)
    w_hat = (unpack_int4(awq.weight).float().reshape(96, 4, 64) - awq.weights_zero_point[..., None]) \
        * awq.weights_scaling_factor[..., None]  # [N, G, g]
    expected = (x * awq.prequant_scaling_factor) @ w_hat.reshape(96, 256).T + bias  # [S, N]
    torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-5)
    # It approximates the float linear far better than symmetric and asymmetric round-to-nearest do.
    err = float((expected - bias - x @ w.T).pow(2).mean(0).sum())
    q_sym, scale_sym = quantize_weight_ref(w, 4, 64)
    assert err < 0.5 * _output_mse(x, _asym_rtn(w, 64), w)
    assert err < 0.5 * _output_mse(x, dequantize_ref(q_sym, scale_sym, 4, 64), w)
    assert QuantConfig("W4A16", group_size=64).pre_quant_scale is False and quant.pre_quant_scale is True


def test_awq_engine_weights_from_calibration():
    """Wiring: quantize_weights takes each linear's calibration statistics (random here) and the model loads them."""
    hf = make_tiny_llama(seed=3)
    cfg, weights = convert_hf({**hf.config.to_dict(), "architectures": ["LlamaForCausalLM"]}, hf.state_dict(),
                              torch.float32)
    g = torch.Generator().manual_seed(0)
    stats = ActivationStats()
    for name in weights:
        if name.endswith(".weight") and name.count(".") == 5 and "layernorm" not in name:
            x = torch.randn(512, weights[name].shape[1], generator=g)  # [S, K]: H of full rank
            x[:, :4] *= 10
            linear = name.removesuffix(".weight")
            stats.input_abs_mean[linear], stats.input_hessian[linear] = _stats(x)
    assert len(stats.input_hessian) == 4 * cfg["num_hidden_layers"]
    quant = QuantConfig("W4A16_AWQ", group_size=64)
    qweights = quantize_weights(weights, quant, stats, quantized_linears(cfg))
    name = "transformer.layers.0.mlp.gate_up"
    expected = awq_quantize(weights[name + ".weight"], stats.input_abs_mean[name], stats.input_hessian[name], 64)
    for key in AWQ_TENSORS:
        assert torch.equal(qweights[f"{name}.{key}"], getattr(expected, key)), key
    with pytest.raises(ValueError, match="hessians=True"):
        quantize_weights(weights, quant, ActivationStats(), quantized_linears(cfg))

    cfg = {**cfg, "quantization": quant.to_dict()}
    model = build_rank_model(cfg, Mapping(1, 1), "cpu", torch.float32)
    model.load_weights(qweights)
    float_model = build_rank_model({**cfg, "quantization": None}, Mapping(1, 1), "cpu", torch.float32)
    float_model.load_weights(weights)
    prompt = {0: [5, 9, 17, 33, 4, 100, 7, 250]}
    got = PagedDriver(model.eval(), cfg).step(prompt)[0]
    ref = PagedDriver(float_model.eval(), cfg).step(prompt)[0]
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.45, rel  # int4 group 64's bound on this model (test_quant_weight_only)


def test_awq_quant_config():
    assert resolve_quant("int4_awq") == QuantConfig("W4A16_AWQ", group_size=128)
    assert QuantConfig("W4A16_AWQ").group_size == 128  # AWQ is group-wise: None means the default 128
    section = QuantConfig("W4A16_AWQ", group_size=64).to_dict()
    # The calibration settings change AWQ's weights, so they are part of the section and the cache key.
    assert section == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 64,
                       "calibration_dataset": None, "calibration_samples": 64, "calibration_max_seq_len": 512,
                       "calibration_dataset_sha256": None}
    assert QuantConfig.from_dict(section) == QuantConfig("W4A16_AWQ", group_size=64)
    with pytest.raises(ValueError, match="group_size=32"):
        QuantConfig("W4A16_AWQ", group_size=32)
    assert QuantConfig("W4A16_GPTQ", group_size=32).group_size == 32  # a GPTQ checkpoint's own group size
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig("W4A16_GPTQ", group_size=-1)


def test_awq_end_to_end(tiny_llama_dir):
    """LLM(quant=AWQ) calibrates on the default texts with the calibration module, then matches the float model."""
    quant = QuantConfig("W4A16_AWQ", group_size=64)  # the tiny model has 64 hidden features: 128 cannot tile them
    ref = LLM(str(tiny_llama_dir), device="cpu")
    llm = LLM(str(tiny_llama_dir), device="cpu", quant=quant)
    assert llm.engine_info.config["quantization"] == quant.to_dict()
    from safetensors import safe_open
    with safe_open(str(llm.engine_info.path / "rank0.safetensors"), "pt") as f:
        pre = f.get_tensor("transformer.layers.1.attention.qkv.prequant_scaling_factor")
        zero = f.get_tensor("transformer.layers.1.attention.qkv.weights_zero_point")
        rows = f.get_slice("transformer.layers.1.attention.qkv.weight").get_shape()[0]
    assert pre.shape == (64,) and not torch.equal(pre, torch.ones(64))
    assert zero.shape == (rows, 1) and torch.equal(zero, zero.round()) and bool((zero.abs() <= 8).all())
    for x in (ref, llm):
        x.shutdown()
    assert logits_rel_error(ref.engine_info.path, llm.engine_info.path) < 0.45
