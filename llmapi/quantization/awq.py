"""INT4 AWQ: activation-aware per-input-channel scales, then error-compensating rounding, both on calibration data.

For a linear y = x W^T, channels where |x| is large matter most. With s = mean|x|^a per input channel
(normalized so that sqrt(max(s) * min(s)) = 1), the weight is quantized as Q(W * s) and the activation
scaled by 1/s, so that (x / s) Q(W * s)^T ~ x W^T with less rounding error on the salient channels; the
exponent a is chosen on a grid in [0, 1) to minimise the output error over every calibration token. That
error needs no samples: with H = mean over tokens of x^T x ([K, K], ActivationStats.input_hessian), the mean
squared output error of a weight error D [N, K] is tr(D H D^T). a = 0 gives s = 1: plain round-to-nearest.

Quantization is asymmetric group-wise int4, as AutoAWQ's default: per group of `group_size` inputs a scale
and an integer zero point, w = (q - z) * scale with codes q in [-8, 7] (the engine's `weights_zero_point`, the
GPTQ layout). The codes are then chosen column by column with GPTQ's error feedback
(llmapi.quantization.error_feedback): each column's rounding error is spread over the columns not yet rounded, weighted by the inverse of H, so the
output error tr(D H D^T) ends lower than rounding every weight to its nearest code. The engine stores 1/s as
`prequant_scaling_factor` [K] beside the packed int4 weight, its `weights_scaling_factor` and zero points.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from llmapi._kernels.weight_only import pack_int4
from llmapi.quantization.error_feedback import error_feedback_round, output_error

ALPHA_GRID = 20
"""Exponents a = 0, 1/20, ..., 19/20 are tried."""
QMIN, QMAX = -8, 7
"""The int4 codes."""


def group_params(w: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) [N] float32 of one group of columns w [N, g]: the range [min, max] (stretched to hold 0)
    maps onto the 16 codes, with an integer zero point z so that w = (q - z) * scale. The scale is rounded to
    `dtype`, the engine's, so that codes are chosen for the scale the engine holds."""
    hi = w.amax(dim=1).clamp(min=0)
    lo = w.amin(dim=1).clamp(max=0)
    scale = ((hi - lo) / (QMAX - QMIN)).to(dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: codes z, exact
    zero = (QMIN - torch.round(lo / scale)).clamp(QMIN, QMAX)  # lo / scale + z = QMIN, rounded
    return scale, zero


def quantize_asym(weight: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric int4 of weight [N, K]: (codes int8 [N, K], scale [N, G], zero point [N, G],
    float32; scales rounded to `dtype`)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)  # [N, G, g]
    scale, zero = group_params(w.reshape(-1, group_size), dtype)
    scale, zero = scale.reshape(n, -1), zero.reshape(n, -1)  # [N, G]
    q = (torch.round(w / scale[..., None]) + zero[..., None]).clamp_(QMIN, QMAX)
    return q.reshape(n, k).to(torch.int8), scale, zero


def dequantize_asym(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 [N, K] that codes q [N, K] with scale, zero [N, G] stand for."""
    n, k = q.shape
    w = (q.float().reshape(n, -1, group_size) - zero[..., None].float()) * scale[..., None].float()
    return w.reshape(n, k)


class AwqSearch(NamedTuple):
    scales: torch.Tensor
    """[K] float32 s: the weight is quantized as W * s, the activation multiplied by 1/s."""
    alpha: float
    """The chosen exponent a."""
    error: float
    """Output error tr(D H D^T) of round-to-nearest at alpha, D = Q(W s) / s - W."""
    rtn_error: float
    """The same at a = 0 (plain round-to-nearest), which the search can only improve on."""


def _scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:  # [K] -> [K]
    s = x_mean.pow(alpha).clamp(min=1e-4)  # a channel that never fires must not get a zero scale
    return s / (s.max() * s.min()).sqrt()  # centred around 1 so neither the weight nor x drifts in range


def awq_search(weight: torch.Tensor, x_abs_mean: torch.Tensor, hessian: torch.Tensor, group_size: int,
               grid: int = ALPHA_GRID) -> AwqSearch:
    """Search AWQ scales for weight [N, K] from its inputs' mean |x| [K] and H [K, K] (float32 throughout)."""
    w, hessian = weight.float(), hessian.float().to(weight.device)
    x_mean = x_abs_mean.float().to(weight.device)
    best = rtn = None
    for i in range(grid):
        alpha = i / grid
        s = _scales(x_mean, alpha)
        delta = dequantize_asym(*quantize_asym(w * s, group_size), group_size) / s - w
        err = output_error(delta, hessian)
        if i == 0:
            rtn = err
        if best is None or err < best[2]:
            best = (s, alpha, err)
    return AwqSearch(best[0], best[1], best[2], rtn)


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 of weight [N, K] with GPTQ's error feedback under H [K, K]; returns (codes int8
    [N, K], scale [N, G], zero point [N, G]) as quantize_asym. Each group's scale and zero point come from its
    columns as updated when the group is reached."""
    n, k = weight.shape
    codes = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, k // group_size, device=weight.device)
    zeros = torch.empty_like(scales)

    def round_column(w: torch.Tensor, j: int) -> torch.Tensor:
        g = j // group_size
        if j % group_size == 0:
            scales[:, g], zeros[:, g] = group_params(w[:, j:j + group_size], dtype)
        q = (torch.round(w[:, j] / scales[:, g]) + zeros[:, g]).clamp_(QMIN, QMAX)
        codes[:, j] = q.to(torch.int8)
        return (q - zeros[:, g]) * scales[:, g]

    error_feedback_round(weight, hessian, round_column)
    return codes, scales, zeros


class AwqWeights(NamedTuple):
    """One linear's engine tensors (names relative to the linear) and the search's outcome."""

    weight: torch.Tensor
    """Packed int4 codes [N, K/2]."""
    weights_scaling_factor: torch.Tensor
    """[N, K/group] in the weight's dtype."""
    weights_zero_point: torch.Tensor
    """[N, K/group], integer values in [-8, 7] in the weight's dtype: w = (q - z) * scale."""
    prequant_scaling_factor: torch.Tensor
    """[K] 1/s in the weight's dtype, multiplied into the activation."""
    alpha: float


def awq_quantize(weight: torch.Tensor, x_abs_mean: torch.Tensor | None, hessian: torch.Tensor | None,
                 group_size: int) -> AwqWeights:
    """AWQ of weight [N, K] from calibration (mean |x| [K], H [K, K]); both None (dummy weights): s = 1 and
    round-to-nearest. Runs on the GPU when there is one."""
    device = "cuda" if torch.cuda.is_available() else weight.device
    w = weight.to(device)
    if hessian is None:
        s, alpha = torch.ones(weight.shape[1], device=device), 0.0
    else:
        hessian = hessian.to(device)
        search = awq_search(w, x_abs_mean.to(device), hessian, group_size)
        s, alpha = search.scales, search.alpha
    prequant = (1.0 / s).to(weight.dtype)  # [K]
    s = 1.0 / prequant.float()  # the scales the engine will apply, rounded to its dtype, so W * s matches them
    ws = w.float() * s
    if hessian is None:
        q, scale, zero = quantize_asym(ws, group_size, weight.dtype)
    else:
        # x / s meets W * s: the Hessian of the scaled inputs is diag(1/s) H diag(1/s).
        q, scale, zero = gptq_round(ws, hessian / s[:, None] / s[None, :], group_size, weight.dtype)
    dev, dtype = weight.device, weight.dtype
    return AwqWeights(pack_int4(q).to(dev), scale.to(dtype).to(dev), zero.to(dtype).to(dev), prequant.to(dev),
                      alpha)
