"""Triton LayerNorm with weight and bias, optionally fused with the residual add and with an FP8 linear's static
input quantization (reference: layers.norm.LayerNorm's torch path, F.layer_norm, then fp8_linear.quantize_fp8)."""

import torch
import triton
import triton.language as tl

from .common import _TL
from .fp8_linear import FP8_DTYPE, Fp8Input
from .kv_write import fp8_codes


@triton.jit
def _layer_norm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, qs_ptr, x_stride, res_stride, out_stride, eps,
                       H: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, QUANT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(dtype)  # the sum is rounded to the model dtype, as in the unfused model
        tl.store(res_ptr + row * res_stride + cols, x, mask=mask)
        x = x.to(tl.float32)
    # Mean and (biased) variance in float32, as torch's layer_norm computes them for every input dtype;
    # two passes over the row held in registers, not a running (Welford) update.
    mean = tl.sum(x, axis=0) / H
    centered = tl.where(mask, x - mean, 0.0)
    inv_std = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask).to(tl.float32)
    y = (centered * inv_std * w + b).to(dtype)  # one rounding to the input dtype, as torch's output
    if QUANT:  # E4M3 codes of the norm's output at the static scale *qs_ptr
        y = fp8_codes(y.to(tl.float32), tl.load(qs_ptr))
    tl.store(out_ptr + row * out_stride + cols, y, mask=mask)


def layer_norm(
    x: torch.Tensor,  # [T, H], last axis contiguous
    weight: torch.Tensor,  # [H]
    bias: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H]; updated in place to x + residual
    quant_scale: torch.Tensor | None = None,  # [1] float32: return the output as E4M3 codes at this scale
):
    """(x - mean) / sqrt(var + eps) * weight + bias in x's dtype (or of x + residual, returning (out, residual));
    one program per row. With `quant_scale` the output is an Fp8Input: the codes an FP8 linear with that static
    input scale would make of it, written instead of the output itself."""
    num_rows, hidden = x.shape
    assert x.stride(1) == 1 and weight.is_contiguous() and bias.is_contiguous()
    assert residual is None or residual.stride(1) == 1
    assert x.dtype in _TL, x.dtype
    out = torch.empty(x.shape, dtype=x.dtype if quant_scale is None else FP8_DTYPE, device=x.device)
    if num_rows:
        block = triton.next_power_of_2(hidden)
        _layer_norm_kernel[(num_rows,)](
            x, x if residual is None else residual, weight, bias, out, out if quant_scale is None else quant_scale,
            x.stride(0), 0 if residual is None else residual.stride(0), out.stride(0), eps,
            H=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None, QUANT=quant_scale is not None,
            num_warps=min(16, max(1, block // 256)),
        )
    if quant_scale is not None:
        out = Fp8Input(out, quant_scale, x.dtype)
    return out if residual is None else (out, residual)
