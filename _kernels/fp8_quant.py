"""Triton quantization of activations to E4M3 in one pass: static (one scale) or per token (each row's amax).

Reference: fp8_linear.quantize_fp8 / quantize_fp8_per_token, which take four elementwise passes in torch
(to float32, divide, clamp, cast); here each row is read once (twice per token: its amax, then its codes) and
written once as one byte per value, with the same float32 division and round-to-nearest-even: bit-identical.
"""

import torch
import triton
import triton.language as tl
from triton import knobs

from .kv_write import round_to_e4m3


@triton.jit
def _quant_kernel(x_ptr, s_ptr, q_ptr, K, stride_x, stride_q, PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr,
                  ROUND: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    if PER_TOKEN:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        m = tl.max(amax, axis=0)
        scale = tl.where(m > 0, tl.math.div_rn(m, 448.0), 1.0)  # fp8_scale: amax / 448, or 1 for a zero row
        tl.store(s_ptr + row, scale)
    else:
        scale = tl.load(s_ptr)
    for k0 in range(0, K, BLOCK):
        mask = k0 + cols < K
        x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
        if ROUND:  # Triton's interpreter casts to E4M3 wrongly where rounding carries into the exponent
            y = round_to_e4m3(y)
        tl.store(q_ptr + row.to(tl.int64) * stride_q + k0 + cols, y.to(tl.float8e4nv), mask=mask)


def quantize_fp8_rows(x: torch.Tensor, scale: torch.Tensor | None, block: int = 1024,
                      out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] (last axis contiguous) -> (E4M3 [T, K], float32 scale): with `scale` ([1] float32, static) every
    value is divided by it; without, each row by its own amax / 448 (returned as [T, 1]). The codes go into `out`
    ([T, K] E4M3, last axis contiguous) when given."""
    t, k = x.shape
    assert x.stride(1) == 1
    if out is None:
        q = torch.empty(t, k, dtype=torch.float8_e4m3fn, device=x.device)
    else:
        assert out.shape == (t, k) and out.dtype == torch.float8_e4m3fn and out.stride(1) == 1
        q = out
    per_token = scale is None
    out_scale = torch.empty(t, 1, dtype=torch.float32, device=x.device) if per_token else scale.float()
    if t:
        _quant_kernel[(t,)](x, out_scale, q, k, x.stride(0), q.stride(0), PER_TOKEN=per_token,
                            BLOCK=min(block, triton.next_power_of_2(k)), ROUND=knobs.runtime.interpret, num_warps=4)
    return q, out_scale
