"""Weight-only quantization applied from outside: quantize the engine's linear weights, swap in WeightOnlyLinear.

Per quantized linear the engine holds `weight` (int8 [N, K], or int4 packed two per byte [N, K/2]),
`weights_scaling_factor` ([N] or [N, K/group]), for GPTQ and AWQ `weights_zero_point` (shaped as the scale,
integer values in the model dtype, in the signed code domain: w = (q - zero_point) * scale), and for AWQ
`prequant_scaling_factor` ([K], multiplied into the activation: y = (x * prequant) @ dequant(W).T).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llmapi._kernels.weight_only import quantize_weight_ref, weight_only_linear_ref
from llmapi.layers.dispatch import use_triton
from llmapi.quantization.calibration import ActivationStats
from llmapi.quantization.config import GROUP_SIZES, QuantConfig
from llmapi.quantization.linear import ShardableLinear

AWQ_TENSORS = ("weight", "weights_scaling_factor", "weights_zero_point", "prequant_scaling_factor")


class WeightOnlyLinear(ShardableLinear):
    """A linear with int8 (or packed int4) weights, float scales, optional zero points (GPTQ) and per-input-channel
    activation scales (AWQ). On CUDA a few rows (gemv_preferred) run the Triton GEMV (_kernels/weight_only_gemv.py),
    int4 per channel at 4-128 rows the fused matmul (_kernels/weight_only_matmul.py), more a Triton dequantization
    (_kernels/weight_only_dequant.py) then a matmul; on CPU the reference dequantizes, then multiplies."""

    def __init__(self, linear: nn.Linear, quant: QuantConfig):
        super().__init__()
        self.bits, self.group_size = quant.bits, quant.group_size
        w = linear.weight  # [N, K], float (meta while the model is being built)
        n, k = w.shape
        if quant.group_size is not None and k % quant.group_size:
            raise ValueError(f"group_size={quant.group_size} does not divide a linear's {k} input features")
        cols = k if self.bits == 8 else k // 2
        self.weight = nn.Parameter(torch.empty(n, cols, dtype=torch.int8, device=w.device), requires_grad=False)
        scale_shape = (n,) if quant.group_size is None else (n, k // quant.group_size)
        self.weights_scaling_factor = nn.Parameter(torch.empty(scale_shape, dtype=w.dtype, device=w.device),
                                                   requires_grad=False)
        self.weights_zero_point = self.prequant_scaling_factor = None
        if quant.has_zero_point:
            self.weights_zero_point = nn.Parameter(torch.empty(scale_shape, dtype=w.dtype, device=w.device),
                                                   requires_grad=False)
        if quant.pre_quant_scale:
            self.prequant_scaling_factor = nn.Parameter(torch.empty(k, dtype=w.dtype, device=w.device),
                                                        requires_grad=False)
        self.bias = linear.bias

    def product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # [T, K] -> [T, N]
        if not use_triton(x):
            return weight_only_linear_ref(x, self.weight, self.weights_scaling_factor, bias, self.bits,
                                          self.group_size, self.weights_zero_point, self.prequant_scaling_factor)
        from llmapi._kernels.weight_only_dequant import dequantize_weight
        from llmapi._kernels.weight_only_gemv import gemv_preferred, gemv_supported, weight_only_gemv
        from llmapi._kernels.weight_only_matmul import matmul_preferred, matmul_supported, weight_only_matmul

        if self.prequant_scaling_factor is not None:  # AWQ: y = (x * prequant) @ dequant(W).T
            x = x * self.prequant_scaling_factor.to(x.dtype)
        rows, k = x.shape
        args = (self.weight, self.weights_scaling_factor, bias, self.bits, self.group_size,
                self.weights_zero_point)
        if x.stride(-1) == 1 and matmul_preferred(rows, self.bits, self.group_size) and matmul_supported(
                k, self.bits, self.group_size):
            # Tens of rows (batched decode, short prefill): weights read as stored, tensor-core dots.
            return weight_only_matmul(x, *args)
        if x.stride(-1) == 1 and gemv_preferred(rows, self.group_size) and gemv_supported(rows, k, self.bits,
                                                                                         self.group_size):
            # A few rows: the weights are read as stored (4 or 8 bits), dequantized in registers.
            return weight_only_gemv(x, *args)
        # More rows (prefill): one Triton pass writes the weight in the model dtype, then one cuBLAS matmul.
        w = dequantize_weight(self.weight, self.weights_scaling_factor, self.bits, self.group_size,
                              self.weights_zero_point)
        return F.linear(x, w.to(x.dtype), bias)


def quantize_weights(weights: Mapping[str, torch.Tensor], quant: QuantConfig | None,
                     stats: ActivationStats | None, linears: Collection[str]) -> dict[str, torch.Tensor]:
    """Engine weights with the `weight` of each of `linears` (engine names, "transformer.layers.0.mlp.proj")
    quantized and its `weights_scaling_factor` added.

    AWQ (llmapi.quantization.awq) works from each linear's calibration statistics (`stats` collected with
    hessians=True); without them (dummy weights) its activation scales are 1 and its rounding to nearest. GPTQ
    weights come quantized from their checkpoint; here (dummy weights only) they are rounded symmetrically,
    zero points 0.
    """
    if quant is None:
        return dict(weights)
    out = {}
    for name in list(weights):
        tensor = weights[name]
        if not name.endswith(".weight") or name.removesuffix(".weight") not in linears:
            out[name] = tensor
            continue
        if quant.group_size is not None and tensor.shape[1] % quant.group_size:
            fits = [g for g in GROUP_SIZES if tensor.shape[1] % g == 0]
            hint = f"; group_size={fits[0]} does" if fits else ""
            raise ValueError(f"group_size={quant.group_size} does not divide the {tensor.shape[1]} input "
                             f"features of {name}{hint} (QuantConfig({quant.quant_algo!r}, group_size=...))")
        base = name.removesuffix("weight")
        if quant.pre_quant_scale:
            from llmapi.quantization.awq import awq_quantize

            linear = base.removesuffix(".")
            if stats is not None and linear not in stats.input_hessian:
                raise ValueError(f"AWQ needs calibration with hessians=True: none for {linear}")
            awq = awq_quantize(tensor, None if stats is None else stats.input_abs_mean[linear],
                               None if stats is None else stats.input_hessian[linear], quant.group_size)
            out.update({base + key: getattr(awq, key) for key in AWQ_TENSORS})
            continue
        q, scale = quantize_weight_ref(tensor, quant.bits, quant.group_size)
        out[name] = q
        out[base + "weights_scaling_factor"] = scale
        if quant.has_zero_point:
            out[base + "weights_zero_point"] = torch.zeros_like(scale)
    return out
