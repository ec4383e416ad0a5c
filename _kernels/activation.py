"""Triton SiLU-and-mul for the gated MLP, optionally fused with an FP8 linear's static input quantization
(reference: layers.activation.act_and_mul with silu, then fp8_linear.quantize_fp8)."""

import torch
import triton
import triton.language as tl

from .fp8_linear import FP8_DTYPE, Fp8Input
from .kv_write import fp8_codes


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, qs_ptr, x_stride, out_stride, INTER: tl.constexpr, BLOCK: tl.constexpr,
                         QUANT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    dtype = x_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + INTER + cols, mask=mask).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # silu rounded first, as torch's F.silu
    y = (act * up).to(dtype)
    if QUANT:  # E4M3 codes of the product at the static scale *qs_ptr
        y = fp8_codes(y.to(tl.float32), tl.load(qs_ptr))
    tl.store(out_ptr + row * out_stride + cols, y, mask=mask)


def silu_and_mul(x: torch.Tensor, quant_scale: torch.Tensor | None = None):  # [T, 2I] -> [T, I]
    """silu(gate) * up where x holds gate then up along the last axis. With `quant_scale` ([1] float32) the
    result is an Fp8Input: the E4M3 codes an FP8 linear with that static input scale would make of it."""
    num_rows, width = x.shape
    inter = width // 2
    assert x.stride(1) == 1
    out = torch.empty((num_rows, inter), dtype=x.dtype if quant_scale is None else FP8_DTYPE, device=x.device)
    if num_rows:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(num_rows, triton.cdiv(inter, block))](
            x, out, out if quant_scale is None else quant_scale, x.stride(0), out.stride(0), INTER=inter,
            BLOCK=block, QUANT=quant_scale is not None, num_warps=4)
    return out if quant_scale is None else Fp8Input(out, quant_scale, x.dtype)
