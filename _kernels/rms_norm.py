"""Triton RMSNorm, optionally fused with the residual add and with an FP8 linear's static input quantization
(reference: layers.norm.RMSNorm's torch path, then fp8_linear.quantize_fp8)."""

import torch
import triton
import triton.language as tl

from .common import _TL
from .fp8_linear import FP8_DTYPE, Fp8Input
from .kv_write import fp8_codes


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, qs_ptr, x_stride, res_stride, out_stride, eps,
                     H: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, NORM_TY: tl.constexpr,
                     QUANT: tl.constexpr):
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
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    normed = (x * inv_rms).to(dtype).to(tl.float32)  # rounded before the scale, as the reference does
    w = tl.load(w_ptr + cols, mask=mask).to(tl.float32)
    y = (w * normed).to(NORM_TY)
    if QUANT:  # E4M3 codes of the norm's output at the static scale *qs_ptr
        y = fp8_codes(y.to(tl.float32), tl.load(qs_ptr))
    tl.store(out_ptr + row * out_stride + cols, y, mask=mask)


def rms_norm(
    x: torch.Tensor,  # [T, H], last axis contiguous
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H]; updated in place to x + residual
    quant_scale: torch.Tensor | None = None,  # [1] float32: return the output as E4M3 codes at this scale
):
    """weight * norm(x) (or of x + residual, returning (out, residual)); one program per row. With
    `quant_scale` the output is an Fp8Input: the codes an FP8 linear with that static input scale would make
    of it, written instead of the output itself."""
    num_rows, hidden = x.shape
    assert x.stride(1) == 1 and weight.is_contiguous() and (residual is None or residual.stride(1) == 1)
    dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=dtype if quant_scale is None else FP8_DTYPE, device=x.device)
    if num_rows:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(num_rows,)](
            x, x if residual is None else residual, weight, out, out if quant_scale is None else quant_scale,
            x.stride(0), 0 if residual is None else residual.stride(0), out.stride(0), eps,
            H=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None, NORM_TY=_TL[dtype],
            QUANT=quant_scale is not None, num_warps=min(16, max(1, block // 256)),
        )
    if quant_scale is not None:
        out = Fp8Input(out, quant_scale, dtype)
    return out if residual is None else (out, residual)
