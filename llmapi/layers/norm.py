"""Normalization layers, fused with the residual add on CUDA: RMSNorm (Llama) and LayerNorm (GPT-2)."""

import torch
import torch.nn.functional as F
from torch import nn

from llmapi.layers.dispatch import use_triton


class RMSNorm(nn.Module):
    """x / rms(x) * weight; the statistic in float32, the scale in the model dtype (as transformers does)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))  # [H]
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, quant_scale: torch.Tensor | None = None):
        """norm(x) [T, H]; with a residual [T, H], (norm(x + residual), x + residual), fused on CUDA.

        On CUDA the residual tensor is updated in place: callers rebind it to the returned one. `quant_scale`
        (the next FP8 linear's static input scale, see fused_input_scale) makes the Triton kernel write the
        norm as that linear's E4M3 input (an Fp8Input); the torch path ignores it.
        """
        if use_triton(x):
            from llmapi._kernels.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual, quant_scale=quant_scale)
        if residual is not None:
            x = x + residual  # the model dtype's rounding of the sum, as transformers adds the residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(nn.Module):
    """(x - mean) / std * weight + bias, in the input dtype like torch.nn.LayerNorm (GPT-2, StarCoder2, OPT...);
    the same interface as RMSNorm (fused residual add, E4M3 output on CUDA)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))  # [H]
        self.bias = nn.Parameter(torch.zeros(hidden_size))  # [H]
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, quant_scale: torch.Tensor | None = None):
        """norm(x) [T, H]; with a residual [T, H], (norm(x + residual), x + residual), fused on CUDA.

        As RMSNorm.forward: on CUDA the residual tensor is updated in place (callers rebind it to the returned
        one), and `quant_scale` makes the Triton kernel write the norm as the next FP8 linear's E4M3 input (an
        Fp8Input); the torch path ignores it.
        """
        if use_triton(x):
            from llmapi._kernels.layer_norm import layer_norm

            return layer_norm(x, self.weight, self.bias, self.eps, residual, quant_scale=quant_scale)
        if residual is not None:
            x = x + residual  # the model dtype's rounding of the sum, as transformers adds the residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
