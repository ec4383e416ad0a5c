"""INT8 W8A8 GEMM (SmoothQuant): int32-exact plain-torch reference (the CPU path) and the torch._int_mm path (CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX = 127
"""Symmetric int8: codes -127..127 (-128 is never produced)."""
_INT_MM_MIN_ROWS = 32  # _int_mm wants more than 16 rows of x
_INT_MM_MULTIPLE = 8  # ... and K, N multiples of 8


def int8_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 127 in float32; a zero amax gets scale 1 (its values quantize to 0 exactly)."""
    amax = amax.float()
    return torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(x / scale) clamped to +-127, as int8 (scale broadcasts: [1] per tensor, [T, 1] per row)."""
    return torch.round(x.float() / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def quantize_int8_weight(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 [N, K], float32 scale [N] per output channel or [1] per tensor)."""
    amax = weight.float().abs().amax(dim=1) if per_channel else weight.float().abs().amax().reshape(1)
    scale = int8_scale(amax)  # [N] or [1]
    return quantize_int8(weight, scale[:, None] if per_channel else scale), scale


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (int8 [T, K], float32 scale [T, 1]): each row's own amax / 127, computed now."""
    scale = int8_scale(x.float().abs().amax(dim=1, keepdim=True))  # [T, 1]
    return quantize_int8(x, scale), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # [N, K] -> [N, K] float32
    return q.float() * (scale[:, None] if scale.numel() > 1 else scale)


def int8_gemm_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [M, K] int8, [N, K] int8 -> [M, N] int32
    """a @ b.T accumulated exactly in int32 (|sum| <= 127^2 K fits for K < 133,000)."""
    return a.to(torch.int32) @ b.to(torch.int32).T


def _quantize_input(x: torch.Tensor, act_scale: torch.Tensor | None, smoother: torch.Tensor | None):
    """(int8 x, its scale [1] static or [T, 1] per token): x first multiplied by the smoother [K] when given."""
    if smoother is not None:
        x = x.float() * smoother.float()  # [T, K]
    if act_scale is None:
        return quantize_int8_per_token(x)
    return quantize_int8(x, act_scale.float()), act_scale.float()


def _finish(acc: torch.Tensor, xs, w_scale, bias, dtype) -> torch.Tensor:  # acc: [T, N] int32
    y = acc.float() * xs * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def int8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    act_scale: torch.Tensor | None, smoother: torch.Tensor | None = None) -> torch.Tensor:
    """SmoothQuant linear [T, K] -> [T, N]: x (times smoother) quantized to int8 with act_scale [1] (or per token
    when None), an int32-exact int8 GEMM with qweight [N, K], then scaled by both scales; + bias, in x's dtype."""
    xq, xs = _quantize_input(x, act_scale, smoother)
    return _finish(int8_gemm_ref(xq.cpu(), qweight.cpu()).to(x.device), xs, w_scale, bias, x.dtype)


def int8_linear_int_mm(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                       act_scale: torch.Tensor | None, smoother: torch.Tensor | None = None) -> torch.Tensor:
    """int8_linear_ref through torch._int_mm (CUDA): int8 x int8 -> int32, then the scales; same result.

    _int_mm takes the weight as a column-major [K, N] (qweight [N, K] transposed, no copy), needs more than 16
    rows (x is padded with zero rows) and K, N multiples of 8 (others, in no real model, take the reference).
    """
    tokens, k = x.shape
    n = qweight.shape[0]
    if k % _INT_MM_MULTIPLE or n % _INT_MM_MULTIPLE:
        return int8_linear_ref(x, qweight, w_scale, bias, act_scale, smoother)
    rows = max(_INT_MM_MIN_ROWS, -(-tokens // _INT_MM_MULTIPLE) * _INT_MM_MULTIPLE)
    xq, xs = _quantize_input(x, act_scale, smoother)  # [T, K] int8, [1] or [T, 1]
    if rows > tokens:
        xq = F.pad(xq, (0, 0, 0, rows - tokens))
    acc = torch._int_mm(xq, qweight.t())[:tokens]  # [T, N] int32
    return _finish(acc, xs, w_scale, bias, x.dtype)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                act_scale: torch.Tensor | None, smoother: torch.Tensor | None = None) -> torch.Tensor:
    """The SmoothQuant linear: _int_mm on CUDA, the int32-exact reference elsewhere."""
    if x.is_cuda:
        return int8_linear_int_mm(x, qweight, w_scale, bias, act_scale, smoother)
    return int8_linear_ref(x, qweight, w_scale, bias, act_scale, smoother)
