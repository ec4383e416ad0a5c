"""Weight-only quantization applied from outside: quantize the engine's linear weights, swap in WeightOnlyLinear."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from _kernels.weight_only import quantize_weight_ref, weight_only_linear_ref
from llmapi.quantization.config import QuantConfig

# The families' shared linear names (see tensor_parallel.apply_tensor_parallel); embeddings, head, norms stay float.
_LINEAR_WEIGHT = re.compile(r"^transformer\.layers\.\d+\.(attention\.(qkv|dense)|mlp\.(gate_up|fc|proj))\.weight$")
_LINEARS = (("attention", "qkv"), ("attention", "dense"), ("mlp", "gate_up"), ("mlp", "fc"), ("mlp", "proj"))


class WeightOnlyLinear(nn.Module):
    """A linear with int8 (or packed int4) weights and float scales; CPU forward: dequantize, then matmul."""

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
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
        return weight_only_linear_ref(x, self.weight, self.weights_scaling_factor, self.bias,
                                      self.bits, self.group_size)


def apply_weight_only(model: nn.Module, quant: QuantConfig | None) -> None:
    """Swap every decoder layer's qkv, dense, gate_up/fc and proj for a WeightOnlyLinear (model on meta)."""
    if quant is None or quant.quant_algo is None:
        return
    for layer in model.transformer.layers:
        for block_name, linear_name in _LINEARS:
            block = getattr(layer, block_name)
            linear = getattr(block, linear_name, None)
            if linear is not None:
                setattr(block, linear_name, WeightOnlyLinear(linear, quant))


def is_quantized_linear_weight(name: str) -> bool:
    return _LINEAR_WEIGHT.match(name) is not None


def quantize_weights(weights: Mapping[str, torch.Tensor], quant: QuantConfig | None) -> dict[str, torch.Tensor]:
    """Engine weights with every linear's `weight` quantized and its `weights_scaling_factor` added."""
    if quant is None or quant.quant_algo is None:
        return dict(weights)
    out = {}
    for name in list(weights):
        tensor = weights[name]
        if not is_quantized_linear_weight(name):
            out[name] = tensor
            continue
        if quant.group_size is not None and tensor.shape[1] % quant.group_size:
            raise ValueError(f"group_size={quant.group_size} does not divide the {tensor.shape[1]} input "
                             f"features of {name}")
        q, scale = quantize_weight_ref(tensor, quant.bits, quant.group_size)
        out[name] = q
        out[name.removesuffix("weight") + "weights_scaling_factor"] = scale
    return out
