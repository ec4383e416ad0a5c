"""Triton LayerNorm (+ residual, + E4M3 output) against the layer's torch path (F.layer_norm) and a float64
formula; the LayerNorm layer's RMSNorm-like interface on both paths."""

# Bounds are the attention tests' per-dtype ones: Triton's interpreter truncates float32 -> bfloat16
# (the GPU rounds to nearest), which costs up to one bfloat16 step per element there.

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DEVICE, REL_ERROR, rel_error

import llmapi.layers.dispatch as dispatch
from llmapi._kernels.fp8_linear import Fp8Input, quantize_fp8
from llmapi.layers.norm import LayerNorm

triton = pytest.importorskip("triton")

from llmapi._kernels.layer_norm import layer_norm  # noqa: E402

interpreted = pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU these kernels run compiled: pytest -m gpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# A scale that saturates the outliers, one that puts most values among E4M3's subnormals, one in between.
SCALES = [0.004, 0.05, 30.0]
# Rows of mean 3000 and std 3: the float32 mean alone is off by up to half a float32 step at 3000 (1.2e-4), 4e-5
# of the std, which F.layer_norm shares (measured: 4.5e-5 from float64, the kernel 3.9e-5). A one-pass
# E[x^2] - E[x]^2 would lose the variance to cancellation: errors near 0.1.
FAR_MEAN_BOUND = 1e-4


def layer_norm_f64(x, weight, bias, eps):
    """The published definition in float64: (x - E[x]) / sqrt(Var[x] + eps) * weight + bias, biased variance."""
    x, weight, bias = x.double(), weight.double(), bias.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _inputs(rows, hidden, dtype, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (offset + 3 * torch.randn(rows, hidden, generator=g)).to(dtype)
    res = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype)
    b = (0.5 * torch.randn(hidden, generator=g)).to(dtype)
    return x, res, w, b


def check_layer_norm(rows, hidden, dtype, seed, offset=0.0, bound=None):
    bound = bound or REL_ERROR[dtype]
    x, res, w, b = _inputs(rows, hidden, dtype, seed, offset)
    ref = F.layer_norm(x, (hidden,), w, b, 1e-5)  # the torch path, in the input dtype
    out = layer_norm(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), 1e-5).cpu()
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_error(out, ref) < bound
    assert rel_error(out, layer_norm_f64(x, w, b, 1e-5)) < bound
    # With the residual add: the sum written back to the residual, the norm of the sum returned.
    fused, new_res = layer_norm(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), 1e-5, residual=res.clone().to(DEVICE))
    if DEVICE == "cuda" or dtype == torch.float32:
        assert torch.equal(new_res.cpu(), x + res)  # one rounding of the sum, as the unfused model does
    else:  # the interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest
        assert rel_error(new_res.cpu(), x + res) < REL_ERROR[dtype]
    assert rel_error(fused.cpu(), F.layer_norm(x + res, (hidden,), w, b, 1e-5)) < bound


def _same_codes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit on a GPU; Triton's interpreter drops the sign of a zero (-0 codes read +0), so on CPU the
    codes' values (-0 == +0) are compared."""
    a, b = a.cpu(), b.cpu()
    if DEVICE == "cuda":
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a.float(), b.float())


def _codes_match(codes: torch.Tensor, unfused: torch.Tensor, scale: torch.Tensor) -> None:
    """The fused kernel's codes are quantize_fp8's of the unfused output, bit for bit, but where the unfused output
    lies within 1e-6 of a rounding boundary between the two codes: the fused and unfused compilations may order a
    row's sums and fused multiply-adds differently, which moves a float32 output by a few ulps of the O(1) terms
    it is made of (the 16-bit outputs round that away). At most a few such codes, each next to the other."""
    want = quantize_fp8(unfused, scale)
    if _same_codes(codes, want):
        return
    a, b = codes.cpu().float(), want.cpu().float()
    differ = a != b
    assert unfused.dtype == torch.float32 and int(differ.sum()) <= 8, f"{int(differ.sum())} codes differ"
    value = unfused.float().cpu()[differ]
    boundary = (a[differ] + b[differ]) / 2 * scale.cpu()  # where the output's code changes
    assert ((value - boundary).abs() <= 1e-6).all(), (value, boundary, a[differ], b[differ])


def check_quantized_output(rows, hidden, dtype, scale, seed):
    """E4M3 output: the codes quantize_fp8 makes of the unfused kernel's output, with and without the residual."""
    x, res, w, b = (t.to(DEVICE) for t in _inputs(rows, hidden, dtype, seed))
    x[0, : hidden // 4] *= 40  # outliers
    s = torch.tensor([scale], device=DEVICE)
    out = layer_norm(x, w, b, 1e-5, quant_scale=s)
    assert isinstance(out, Fp8Input) and out.dtype == dtype and out.shape == x.shape
    assert out.q.dtype == torch.float8_e4m3fn
    _codes_match(out.q, layer_norm(x, w, b, 1e-5), s)
    q, new_res = layer_norm(x, w, b, 1e-5, residual=res.clone(), quant_scale=s)
    want, want_res = layer_norm(x, w, b, 1e-5, residual=res.clone())
    assert torch.equal(new_res, want_res)
    _codes_match(q.q, want, s)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [40, 64])
def test_layer_norm_interpreted(dtype, hidden):
    check_layer_norm(3, hidden, dtype, seed=hidden)


@interpreted
def test_layer_norm_interpreted_far_from_zero_mean():
    check_layer_norm(4, 96, torch.float32, seed=5, offset=3000.0, bound=FAR_MEAN_BOUND)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", SCALES)
def test_layer_norm_quantized_output_interpreted(dtype, scale):
    check_quantized_output(5, 96, dtype, scale, seed=int(scale * 1000))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_layer_interface(monkeypatch, dtype):
    """LayerNorm(x), LayerNorm(x, residual) and quant_scale on the torch path (equal to torch.nn.LayerNorm) and
    on the Triton path (the interpreter on CPU), which also updates the residual in place."""
    x, res, w, b = _inputs(6, 48, dtype, seed=9)
    ln, hf_ln = LayerNorm(48, 1e-5).to(dtype), torch.nn.LayerNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        ln.weight.copy_(w), ln.bias.copy_(b)
        hf_ln.weight.copy_(w), hf_ln.bias.copy_(b)
    with torch.no_grad():
        torch.testing.assert_close(ln(x), hf_ln(x), rtol=0, atol=0)
        normed, new_res = ln(x, res)
        torch.testing.assert_close(new_res, x + res, rtol=0, atol=0)
        torch.testing.assert_close(normed, hf_ln(x + res), rtol=0, atol=0)
        s = torch.tensor([0.05])
        torch.testing.assert_close(ln(x, quant_scale=s), hf_ln(x), rtol=0, atol=0)  # the torch path ignores it

        monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
        ln = ln.to(DEVICE)
        x, res = x.to(DEVICE), res.to(DEVICE)
        assert rel_error(ln(x).cpu(), hf_ln(x.cpu())) < REL_ERROR[dtype]
        residual = res.clone()
        normed, new_res = ln(x, residual)
        assert new_res is residual  # updated in place, as RMSNorm's kernel does
        assert rel_error(new_res.cpu(), x.cpu() + res.cpu()) < REL_ERROR[dtype]
        assert rel_error(normed.cpu(), hf_ln(x.cpu() + res.cpu())) < REL_ERROR[dtype]
        out = ln(x, quant_scale=torch.tensor([0.05], device=DEVICE))
        assert isinstance(out, Fp8Input) and _same_codes(out.q, quantize_fp8(ln(x), out.scale))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_gpu(dtype):
    check_layer_norm(333, 4096, dtype, seed=3)
    check_layer_norm(7, 6144, dtype, seed=4)  # StarCoder2-15B
    check_layer_norm(5, 768, dtype, seed=6)  # GPT-2
    check_layer_norm(9, 2560, torch.float32, seed=7, offset=3000.0, bound=FAR_MEAN_BOUND)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", SCALES)
def test_layer_norm_quantized_output_gpu(dtype, scale):
    check_quantized_output(200, 4096, dtype, scale, seed=int(scale * 1000) + 1)


@interpreted
def test_tiny_gpt2_through_kernels_matches_transformers(monkeypatch):
    """GPT-2's LayerNorms (with the residual add fused) and attention through the Triton kernels (the
    interpreter), prefill then decode, give transformers' logits."""
    from tiny_models import PagedDriver, make_tiny_gpt2, to_engine_model

    import llmapi._kernels.layer_norm as kernel

    calls = []
    real = kernel.layer_norm
    monkeypatch.setattr(kernel, "layer_norm", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
    hf = make_tiny_gpt2()
    model, cfg = to_engine_model(hf)
    driver = PagedDriver(model, cfg)
    a, b = [5, 9, 11, 3, 8, 21, 7], [4, 17, 2]
    with torch.no_grad():
        ref_a, ref_b = hf(torch.tensor([a])).logits[0], hf(torch.tensor([b])).logits[0]  # [L, V]
        ref_a2 = hf(torch.tensor([a + [30]])).logits[0, -1]
    first = driver.step({0: a, 1: b})
    torch.testing.assert_close(first[0], ref_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first[1], ref_b, rtol=1e-4, atol=1e-4)
    second = driver.step({0: [30]})
    torch.testing.assert_close(second[0][0], ref_a2, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2 * (2 * cfg["num_hidden_layers"] + 1)  # every norm of both steps ran the kernel
