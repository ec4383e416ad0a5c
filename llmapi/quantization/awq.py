"""INT4 AWQ: per-input-channel activation-aware scales found by a grid search on calibration inputs.

For a linear y = x W^T, channels where |x| is large matter most. With s = mean|x|^a per input channel
(normalized so that sqrt(max(s) * min(s)) = 1), the weight is quantized as Q(W * s) and the activation
scaled by 1/s, so that (x / s) Q(W * s)^T ~ x W^T with less rounding error on the salient channels; the
exponent a is chosen on a grid in [0, 1) to minimise the output error on the calibration samples. a = 0
gives s = 1: plain round-to-nearest. Quantization is symmetric group-wise int4 (no zero points); the engine
stores 1/s as `prequant_scaling_factor` [K] beside the int4 weight and its `weights_scaling_factor`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from llmapi._kernels.weight_only import dequantize_ref, quantize_weight_ref

ALPHA_GRID = 20
"""Exponents a = 0, 1/20, ..., 19/20 are tried."""


class AwqSearch(NamedTuple):
    scales: torch.Tensor
    """[K] float32 s: the weight is quantized as W * s, the activation multiplied by 1/s."""
    alpha: float
    """The chosen exponent a."""
    error: float
    """Mean squared output error || (x/s) Q(W s)^T - x W^T ||^2 / (S N) at alpha."""
    rtn_error: float
    """The same at a = 0 (plain round-to-nearest), which the search can only improve on."""


def _scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:  # [K] -> [K]
    s = x_mean.pow(alpha).clamp(min=1e-4)  # a channel that never fires must not get a zero scale
    return s / (s.max() * s.min()).sqrt()  # centred around 1 so neither the weight nor x drifts in range


def _output_error(w: torch.Tensor, x: torch.Tensor, s: torch.Tensor, group_size: int, ref: torch.Tensor) -> float:
    q, scale = quantize_weight_ref(w * s, 4, group_size)  # [N, K/2], [N, G]
    y = (x * (1.0 / s)) @ dequantize_ref(q, scale, 4, group_size).T  # [S, N], as the engine computes it
    return float((y - ref).pow(2).mean())


def awq_search(weight: torch.Tensor, x: torch.Tensor, group_size: int, grid: int = ALPHA_GRID) -> AwqSearch:
    """Search AWQ scales for weight [N, K] on calibration inputs x [S, K] (float32 arithmetic throughout)."""
    assert weight.shape[1] == x.shape[1], (weight.shape, x.shape)
    w, x = weight.float(), x.float().to(weight.device)
    ref = x @ w.T  # [S, N]
    x_mean = x.abs().mean(dim=0)  # [K]
    best = rtn = None
    for i in range(grid):
        alpha = i / grid
        s = _scales(x_mean, alpha)
        err = _output_error(w, x, s, group_size, ref)
        if i == 0:
            rtn = err
        if best is None or err < best[2]:
            best = (s, alpha, err)
    return AwqSearch(best[0], best[1], best[2], rtn)


def awq_quantize(weight: torch.Tensor, samples: torch.Tensor | None, group_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed int4 [N, K/2], scale [N, K/group], prequant 1/s [K]) of weight [N, K], all in the weight's dtype
    but the codes; samples [S, K] None (dummy weights) means s = 1. The search runs on the GPU when there is one."""
    if samples is None:
        s = torch.ones(weight.shape[1], device=weight.device)
    else:
        device = "cuda" if torch.cuda.is_available() else weight.device
        s = awq_search(weight.to(device), samples.to(device), group_size).scales.to(weight.device)
    prequant = (1.0 / s).to(weight.dtype)  # [K]
    s = 1.0 / prequant.float()  # the scales the engine will apply, rounded to its dtype, so W * s matches them
    q, scale = quantize_weight_ref((weight.float() * s).to(weight.dtype), 4, group_size)
    return q, scale, prequant
