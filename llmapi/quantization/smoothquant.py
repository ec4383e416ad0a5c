"""SmoothQuant INT8 W8A8: smoothing factors from calibration, folding them into the weights, and the int8 linear."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from llmapi._kernels.int8_linear import int8_linear, int8_scale, quantize_int8_weight
from llmapi.models.gpt import LinearSpec
from llmapi.quantization.config import SMOOTHQUANT_ALGOS, QuantConfig
from llmapi.quantization.linear import QuantizedLinear

_EPS = 1e-5  # floor of every max |.|: a dead channel must not make s zero or infinite


def smoothing_factors(input_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] = max|X_j|^alpha / max|W_:,j|^(1 - alpha) for input_amax [K] and weight [N, K] (float32).

    Dividing input channel j by s_j and multiplying weight column j by s_j leaves X W^T unchanged while moving
    activation outliers into the weights (alpha 1: all of them, 0: none; the paper's default is 0.5).
    """
    x_amax = input_amax.float().clamp(min=_EPS)  # [K]
    w_amax = weight.float().abs().amax(dim=0).clamp(min=_EPS)  # [K]
    return (x_amax.pow(alpha) / w_amax.pow(1.0 - alpha)).clamp(min=_EPS)


def smooth_weights(weights: Mapping[str, torch.Tensor], input_amax: Mapping[str, torch.Tensor], alpha: float,
                   linears: Mapping[str, LinearSpec]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Float engine weights with SmoothQuant applied; the model computes the same function (exact in real numbers).

    linears: each quantized linear's declaration by its engine name (llmapi.quantization.apply.quantized_linears):
    a linear whose `norm` is named has its input divided by s inside that norm's weight (and bias);
    the others (norm None: attention output, activation, a post-norm residual stream) keep a multiply of their input.
    Returns (weights, smoothed_amax): every linear with calibration stats has its weight columns scaled by s; its
    preceding norm's weight (and bias) divided by s, or else a `prequant_scaling_factor` 1/s [K] (float32) added.
    smoothed_amax: linear name -> max |x / s| per channel [K], the range its int8 activations must cover.
    """
    out = dict(weights)
    smoothed_amax = {}
    for name, amax in input_amax.items():  # "transformer.layers.{i}.attention.qkv"
        layer = name.split(".")[:3]
        w = weights[f"{name}.weight"]  # [N, K]
        s = smoothing_factors(amax, w, alpha)  # [K]
        out[f"{name}.weight"] = (w.float() * s).to(w.dtype)
        norm = linears[name].norm
        if norm is None:
            out[f"{name}.prequant_scaling_factor"] = 1.0 / s
        else:
            for kind in ("weight", "bias"):
                key = ".".join(layer + [norm, kind])
                if key in weights:
                    out[key] = (weights[key].float() / s).to(weights[key].dtype)
        smoothed_amax[name] = amax.float() / s
    return out, smoothed_amax


class SmoothQuantLinear(QuantizedLinear):
    """int8 weight [N, K], float32 weight scale ([N] per channel or [1]), a static activation scale [1] unless
    activations are quantized per token at run time, and for dense/proj the smoothing multiply [K]."""

    def __init__(self, linear: nn.Linear, quant: QuantConfig, prequant: bool):
        super().__init__()
        per_channel, per_token = SMOOTHQUANT_ALGOS[quant.quant_algo]
        w = linear.weight  # [N, K], float (meta while the model is being built)
        n, k = w.shape

        def param(*shape, dtype=torch.float32):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=w.device), requires_grad=False)

        self.weight = param(n, k, dtype=torch.int8)
        self.weights_scaling_factor = param(n if per_channel else 1)
        self.activation_scaling_factor = None if per_token else param(1)
        self.prequant_scaling_factor = param(k) if prequant else None
        self.bias = linear.bias

    def product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # [T, K] -> [T, N]
        return int8_linear(x, self.weight, self.weights_scaling_factor, bias, self.activation_scaling_factor,
                           self.prequant_scaling_factor)


def quantize_smoothquant_linear(weight: torch.Tensor, smoothed_amax: torch.Tensor | None, quant: QuantConfig
                                ) -> dict[str, torch.Tensor]:
    """One (already smoothed) linear's int8 tensors, named relative to the linear: `weight`,
    `weights_scaling_factor`, and with static activations `activation_scaling_factor` = max |x / s| / 127
    (smoothed_amax [K]; None: amax 1)."""
    per_channel, per_token = SMOOTHQUANT_ALGOS[quant.quant_algo]
    q, w_scale = quantize_int8_weight(weight, per_channel)
    out = {"weight": q, "weights_scaling_factor": w_scale}
    if not per_token:
        amax = torch.ones(1) if smoothed_amax is None else smoothed_amax.float().max().reshape(1)
        out["activation_scaling_factor"] = int8_scale(amax)
    return out
