"""RMSNorm and SiLU-and-mul writing an FP8 linear's E4M3 input: the same codes as the unfused kernel's output
quantized by quantize_fp8 (Triton's interpreter on CPU; compiled on a GPU), and a model run through them."""

import pytest
import torch
from kernel_cases import DEVICE

from llmapi._kernels.fp8_linear import Fp8Input, quantize_fp8

triton = pytest.importorskip("triton")

from llmapi._kernels.activation import silu_and_mul  # noqa: E402
from llmapi._kernels.rms_norm import rms_norm  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# A scale that saturates the outliers, one that puts most values among E4M3's subnormals, one in between.
SCALES = [0.004, 0.05, 30.0]


def _same_codes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit on a GPU; Triton's interpreter drops the sign of a zero (-0 codes read +0), so on CPU the
    codes' values (-0 == +0) are compared."""
    a, b = a.cpu(), b.cpu()
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if DEVICE == "cuda" else torch.equal(a.float(), b.float())


def _inputs(rows, hidden, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=g) * 3).to(dtype)
    x[0, : hidden // 4] *= 40  # outliers
    res = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype)
    return x.to(DEVICE), res.to(DEVICE), w.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", SCALES)
def test_rms_norm_quantized_output_equals_quantized_norm(dtype, scale):
    x, res, w = _inputs(5, 96, dtype, seed=int(scale * 1000))
    s = torch.tensor([scale], device=DEVICE)
    out = rms_norm(x, w, 1e-5, quant_scale=s)
    assert isinstance(out, Fp8Input) and out.dtype == dtype and out.shape == x.shape
    assert _same_codes(out.q, quantize_fp8(rms_norm(x, w, 1e-5), s))
    # With the residual add: the same residual update, and the codes of the norm of the sum.
    q, new_res = rms_norm(x, w, 1e-5, residual=res.clone(), quant_scale=s)
    want, want_res = rms_norm(x, w, 1e-5, residual=res.clone())
    assert torch.equal(new_res, want_res)
    assert _same_codes(q.q, quantize_fp8(want, s))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", SCALES)
def test_silu_and_mul_quantized_output_equals_quantized_product(dtype, scale):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 2 * 1100, generator=g) * 4).to(dtype).to(DEVICE)  # two column blocks, a masked tail
    s = torch.tensor([scale], device=DEVICE)
    out = silu_and_mul(x, s)
    assert isinstance(out, Fp8Input) and out.shape == (6, 1100) and out.dtype == dtype
    assert _same_codes(out.q, quantize_fp8(silu_and_mul(x), s))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", SCALES)
def test_attention_quantized_output_equals_quantized_attention(dtype, scale):
    _check_attention_quantized_output(dtype, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", SCALES)
def test_attention_quantized_output_equals_quantized_attention_gpu(dtype, scale):
    _check_attention_quantized_output(dtype, scale)


def _check_attention_quantized_output(dtype, scale):
    """Decode attention (one split, several: the merge kernel stores), packed attention, and a mixed step's
    decodes + prefill through the Attention layer: the E4M3 codes of the unfused output."""
    import dataclasses

    import llmapi.layers.dispatch as dispatch
    from kernel_cases import paged_case
    from test_layers_attention import make_case

    from llmapi._kernels.decode_attention import paged_decode_attention
    from llmapi._kernels.prefill_attention import paged_packed_attention
    from llmapi.layers.attention import Attention

    s = torch.tensor([scale], device=DEVICE)
    q, kc, vc, qsl, ctx, tables = paged_case([1] * 5, [9, 70, 1, 33, 130], 8, 2, 64, 16, dtype, seed=3)
    for splits in (1, 3):
        want = quantize_fp8(paged_decode_attention(q, kc, vc, ctx, tables, 0.125, splits), s)
        out = paged_decode_attention(q, kc, vc, ctx, tables, 0.125, splits, quant_scale=s)
        assert out.dtype == torch.float8_e4m3fn and _same_codes(out, want), splits
    q, kc, vc, qsl, ctx, tables = paged_case([4, 1, 19], [4, 30, 40], 8, 2, 64, 16, dtype, seed=4)
    want = quantize_fp8(paged_packed_attention(q, kc, vc, qsl, ctx, tables, 0.125), s)
    assert _same_codes(paged_packed_attention(q, kc, vc, qsl, ctx, tables, 0.125, quant_scale=s), want)

    q, k, v, k_cache, v_cache, attn, _, _ = make_case([1, 1, 6, 9], [7, 40, 11, 9], nh=8, nkv=2, hd=16)
    meta = dataclasses.replace(attn, **{f.name: getattr(attn, f.name).to(DEVICE) for f in dataclasses.fields(attn)
                                        if isinstance(getattr(attn, f.name), torch.Tensor)}, num_decodes=2)
    q, k, v = (t.to(DEVICE, dtype) for t in (q, k, v))
    old, dispatch.TRITON_ON_CPU = dispatch.TRITON_ON_CPU, True
    try:
        kv = torch.stack([k_cache, v_cache]).to(DEVICE, dtype)
        want = quantize_fp8(Attention(scale=0.25)(q, k, v, kv.clone(), meta), s)
        out = Attention(scale=0.25)(q, k, v, kv.clone(), meta, quant_scale=s)
    finally:
        dispatch.TRITON_ON_CPU = old
    assert isinstance(out, Fp8Input) and out.dtype == dtype and out.shape == q.shape
    assert _same_codes(out.q, want)


@pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU the fused kernels run compiled: the gpu test below")
def test_fp8_model_through_fused_kernels_equals_unfused(monkeypatch):
    _check_model_fused_equals_unfused(monkeypatch)


@pytest.mark.gpu
def test_fp8_model_through_fused_kernels_equals_unfused_gpu(monkeypatch):
    _check_model_fused_equals_unfused(monkeypatch)


def _check_model_fused_equals_unfused(monkeypatch):
    """A tiny Llama with static FP8 linears: the fused path (norms, attention and SiLU write E4M3) gives the very
    logits of the unfused one (each linear quantizing its input), prefill and decode, and it is the path taken."""
    import llmapi.layers.activation as activation
    import llmapi.layers.dispatch as dispatch
    import llmapi.models.gpt as gpt
    from test_quant_tensor_parallel import _stats
    from tiny_models import PagedDriver, make_tiny_llama, to_engine_model

    from llmapi.distributed.mapping import Mapping
    from llmapi.distributed.sharding import build_rank_model, shard_weights
    from llmapi.quantization.apply import quantize_engine_weights
    from llmapi.quantization.config import QuantConfig

    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
    float_model, cfg = to_engine_model(make_tiny_llama())
    quant = QuantConfig("FP8")
    weights = quantize_engine_weights(cfg, float_model.state_dict(), quant, _stats(cfg, float_model.state_dict()))
    cfg = dict(cfg, quantization=quant.to_dict())
    model = build_rank_model(cfg, Mapping(), DEVICE, torch.bfloat16)
    model.load_weights(shard_weights(model, weights))
    seen = []
    real = activation.fused_input_scale

    def spy(linear, x):
        scale = real(linear, x)
        seen.append(scale is not None)
        return scale

    prompts = {0: [5, 9, 11, 3, 8], 1: [4, 17, 2]}
    monkeypatch.setattr(gpt, "fused_input_scale", spy)
    decodes = {0: [7], 1: [12]}
    with torch.no_grad():
        driver = PagedDriver(model, cfg, dtype=torch.bfloat16, device=DEVICE)
        fused = [driver.step(prompts), driver.step(decodes)]
        # qkv, dense, gate_up and down of every layer, both steps
        assert len(seen) == 2 * 4 * cfg["num_hidden_layers"] and all(seen)
        monkeypatch.setattr(gpt, "fused_input_scale", lambda linear, x: None)
        driver = PagedDriver(model, cfg, dtype=torch.bfloat16, device=DEVICE)
        unfused = [driver.step(prompts), driver.step(decodes)]
    for a, b in zip(fused, unfused):
        for r in a:
            assert torch.equal(a[r], b[r])
