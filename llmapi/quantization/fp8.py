"""FP8 W8A8 (E4M3): the quantized linear, its conversion from float weights, and the device capability check."""

from __future__ import annotations

import torch
from torch import nn

from llmapi._kernels.fp8_linear import (FP8_DTYPE, FP8_MIN_CAPABILITY, fp8_linear, fp8_scale, quantize_fp8,
                                        quantize_fp8_weight)
from llmapi.errors import UnsupportedDeviceError
from llmapi.quantization.config import FP8_ALGOS, QuantConfig
from llmapi.quantization.error_feedback import error_feedback_round
from llmapi.quantization.linear import QuantizedLinear


def _per_token(quant: QuantConfig) -> bool:
    return quant.quant_algo == "FP8_PER_CHANNEL_PER_TOKEN"


class Fp8Linear(QuantizedLinear):
    """E4M3 weight [N, K] with a float32 weight scale ([1] for "FP8", [N] for "FP8_PER_CHANNEL_PER_TOKEN") and,
    for "FP8", a static calibrated activation scale [1]; per-token mode scales each input row at run time."""

    def __init__(self, linear: nn.Linear, quant: QuantConfig):
        super().__init__()
        w = linear.weight  # [N, K], float (meta while the model is being built)
        n, k = w.shape
        per_token = _per_token(quant)
        self.weight = nn.Parameter(torch.empty(n, k, dtype=FP8_DTYPE, device=w.device), requires_grad=False)
        self.weights_scaling_factor = nn.Parameter(
            torch.empty(n if per_token else 1, dtype=torch.float32, device=w.device), requires_grad=False)
        self.activation_scaling_factor = None if per_token else nn.Parameter(
            torch.empty(1, dtype=torch.float32, device=w.device), requires_grad=False)
        self.bias = linear.bias

    @property
    def static_input_scale(self) -> torch.Tensor | None:
        """The static input scale ("FP8"), with which the kernel producing the input may quantize it as it
        writes it (layers.activation.fused_input_scale); None per token."""
        return self.activation_scaling_factor

    def product(self, x, bias: torch.Tensor | None) -> torch.Tensor:  # [T, K] (or an Fp8Input) -> [T, N]
        return fp8_linear(x, self.weight, self.weights_scaling_factor, bias, self.activation_scaling_factor)


def round_fp8_weight(weight: torch.Tensor, w_scale: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """E4M3 codes [N, K] of weight [N, K] at scale w_scale ([1] or [N]), chosen with GPTQ's error feedback under
    H [K, K] (llmapi.quantization.error_feedback) rather than each to its nearest; on the GPU when there is one."""
    device = "cuda" if torch.cuda.is_available() else weight.device
    w = weight.to(device).float()
    scale = w_scale.to(device).expand(w.shape[0])  # [N]
    codes = torch.empty(w.shape, dtype=FP8_DTYPE, device=device)

    def round_column(current: torch.Tensor, j: int) -> torch.Tensor:
        codes[:, j] = quantize_fp8(current[:, j], scale)
        return codes[:, j].float() * scale

    error_feedback_round(w, hessian.to(device), round_column)
    return codes.to(weight.device)


def quantize_fp8_linear(weight: torch.Tensor, input_amax: torch.Tensor | None, quant: QuantConfig,
                        hessian: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One linear's engine tensors (names relative to the linear): E4M3 `weight`, `weights_scaling_factor`, and
    for "FP8" `activation_scaling_factor` = max |x| / 448 from calibration (input_amax [K]; None: amax 1).
    hessian: the calibration's mean x^T x [K, K]; with it the weight codes come from GPTQ's error feedback,
    without it (dummy weights) each weight is rounded to its nearest code."""
    per_token = _per_token(quant)
    q, w_scale = quantize_fp8_weight(weight, per_channel=per_token)
    if hessian is not None:
        q = round_fp8_weight(weight, w_scale, hessian)
    out = {"weight": q, "weights_scaling_factor": w_scale}
    if not per_token:
        amax = torch.ones(1) if input_amax is None else input_amax.float().max().reshape(1)
        out["activation_scaling_factor"] = fp8_scale(amax)
    return out


def check_fp8_device(quant: QuantConfig | None, device) -> None:
    """UnsupportedDeviceError when an FP8 mode is asked on a CUDA device below sm_89; CPU runs it emulated."""
    if quant is None or quant.quant_algo not in FP8_ALGOS:
        return
    device = torch.device(device)
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_MIN_CAPABILITY:
        need = ".".join(map(str, FP8_MIN_CAPABILITY))
        raise UnsupportedDeviceError(
            f"quant_algo={quant.quant_algo!r} needs FP8 tensor cores (compute capability >= {need}, Ada or "
            f"Hopper), but {device} has compute capability {major}.{minor}; use int8 (e.g. quant='smoothquant' "
            "or 'int8_weight_only') on this GPU, or run FP8 emulated on CPU")
