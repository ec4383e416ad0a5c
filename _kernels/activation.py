"""Triton SiLU-and-mul for the gated MLP (reference: layers.activation.act_and_mul with silu)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + INTER + cols, mask=mask).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # silu rounded first, as torch's F.silu
    tl.store(out_ptr + row * out_stride + cols, (act * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    """silu(gate) * up where x holds gate then up along the last axis."""
    num_rows, width = x.shape
    inter = width // 2
    assert x.stride(1) == 1
    out = torch.empty((num_rows, inter), dtype=x.dtype, device=x.device)
    if num_rows:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(num_rows, triton.cdiv(inter, block))](
            x, out, x.stride(0), out.stride(0), INTER=inter, BLOCK=block, num_warps=4)
    return out
