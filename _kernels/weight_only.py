"""Weight-only int8/int4 GEMM references: symmetric quantize, dequantize (optional zero points), dequantize-then-matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

QMAX = {8: 127, 4: 7}
"""Largest quantized magnitude per bit width: symmetric, so -qmax..qmax (int4's -8 is never produced)."""


def _check(bits: int, group_size: int | None, in_features: int) -> None:
    assert bits in QMAX, bits
    assert group_size is None or in_features % group_size == 0, (in_features, group_size)
    assert bits == 8 or in_features % 2 == 0, in_features


def pack_int4(q: torch.Tensor) -> torch.Tensor:  # [N, K] int8 in -8..7 -> [N, K/2] int8
    """Two int4 values per byte: even column in the low nibble, odd column in the high nibble."""
    low, high = q[:, 0::2], q[:, 1::2]
    return ((low & 0x0F) | (high << 4)).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:  # [N, K/2] int8 -> [N, K] int8 in -8..7
    low = (packed << 4) >> 4  # arithmetic shifts sign-extend the low nibble
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def quantize_weight_ref(weight: torch.Tensor, bits: int, group_size: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest of weight [N, K] (out, in features).

    Returns (qweight, scale): qweight int8 [N, K] (bits 8) or packed int8 [N, K/2] (bits 4); scale in the
    weight's dtype, [N] per output channel (group_size None) or [N, K / group_size] per group.
    Every element's dequantization error is at most scale / 2.
    """
    n, k = weight.shape
    _check(bits, group_size, k)
    qmax = QMAX[bits]
    w = weight.float().reshape(n, -1, group_size or k)  # [N, G, g]
    # A zero row/group gets scale 1 rather than 0: its values quantize to 0 exactly, with no division by 0.
    scale = w.abs().amax(dim=-1) / qmax  # [N, G]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(weight.dtype)
    q = torch.round(w / scale.float()[..., None]).clamp_(-qmax, qmax).to(torch.int8).reshape(n, k)  # [N, K]
    if group_size is None:
        scale = scale[:, 0]  # [N]
    return (pack_int4(q) if bits == 4 else q), scale


def dequantize_ref(qweight: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int | None = None,
                   dtype: torch.dtype | None = None, zero_point: torch.Tensor | None = None) -> torch.Tensor:  # -> [N, K]
    """The float weight [N, K] that (qweight, scale[, zero_point]) stand for, in `dtype` (default: the scale's).

    w = (q - zero_point) * scale, with zero_point (shaped as scale, integer values in a float dtype) in the
    same signed code domain as q; without zero points w = q * scale (symmetric).
    """
    q = unpack_int4(qweight) if bits == 4 else qweight  # [N, K] int8
    n, k = q.shape
    _check(bits, group_size, k)
    groups = q.float().reshape(n, -1, group_size or k)  # [N, G, g]
    if zero_point is not None:
        groups = groups - zero_point.float().reshape(n, -1, 1)  # integers: exact in float32
    w = groups * scale.float().reshape(n, -1, 1)  # [N, G, g]
    return w.reshape(n, k).to(dtype or scale.dtype)


def weight_only_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                           bits: int, group_size: int | None = None, zero_point: torch.Tensor | None = None,
                           prequant_scale: torch.Tensor | None = None) -> torch.Tensor:  # [T, K] -> [T, N]
    """(x * prequant_scale) @ dequantize(qweight, scale, zero_point).T + bias, in x's dtype.

    prequant_scale [K] is AWQ's per-input-channel 1/s: the weight was quantized as W * s.
    """
    if prequant_scale is not None:
        x = x * prequant_scale.to(x.dtype)
    return F.linear(x, dequantize_ref(qweight, scale, bits, group_size, x.dtype, zero_point), bias)
