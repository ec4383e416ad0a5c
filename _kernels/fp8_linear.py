"""FP8 (E4M3) W8A8 GEMM: quantize/dequantize references (the CPU path) and the torch._scaled_mm path (sm_89+)."""

from __future__ import annotations

from typing import NamedTuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
"""Largest finite E4M3 magnitude: a scale maps a tensor's amax here."""
FP8_MIN_CAPABILITY = (8, 9)
"""CUDA compute capability with FP8 tensor cores (Ada sm_89, Hopper sm_90)."""
_ROWWISE_MIN_CAPABILITY = (9, 0)  # _scaled_mm's row-wise (per-token x per-channel) scaling needs Hopper
_MM_MULTIPLE = 16  # _scaled_mm wants K and N multiples of 16
FAST_ACCUM = True
"""_scaled_mm's use_fast_accum: Hopper's FP8 tensor cores accumulate the whole K without cuBLAS's periodic
promotion to float32, as vLLM's CUTLASS FP8 kernels (FastAccum) and torchao's float8 inference do. The extra
error (about 14-bit accumulation) is far below the inputs' E4M3 rounding (2^-4)."""


class Fp8Input(NamedTuple):
    """A linear's input already quantized by the kernel that produced it (a fused RMSNorm or SiLU-and-mul):
    the E4M3 codes quantize_fp8 gives at the linear's static input scale."""

    q: torch.Tensor  # [T, K] E4M3
    scale: torch.Tensor  # [1] float32
    dtype: torch.dtype  # the activation's own dtype (the model dtype), which the linear's output takes

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def is_cuda(self) -> bool:
        return self.q.is_cuda


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 in float32; a zero amax gets scale 1 (its values quantize to 0 exactly, no division by 0)."""
    amax = amax.float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to +-448, rounded to E4M3 (scale broadcasts: [1] per tensor, [T, 1] per row)."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8_weight(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (E4M3 [N, K], float32 scale [N] per output channel or [1] per tensor)."""
    amax = weight.float().abs().amax(dim=1) if per_channel else weight.float().abs().amax().reshape(1)
    scale = fp8_scale(amax)  # [N] or [1]
    return quantize_fp8(weight, scale[:, None] if per_channel else scale), scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (E4M3 [T, K], float32 scale [T, 1]): each row's own amax / 448, computed now."""
    scale = fp8_scale(x.float().abs().amax(dim=1, keepdim=True))  # [T, 1]
    return quantize_fp8(x, scale), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # [N, K] -> [N, K] float32
    """The float32 values (q, scale) stand for; scale [N] (per row) or [1]."""
    return q.float() * (scale[:, None] if scale.numel() > 1 else scale)


def _quantize_input(x, act_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 x, its scale: [1] static per tensor, or [T, 1] per token when act_scale is None); an Fp8Input
    comes quantized (at act_scale)."""
    if isinstance(x, Fp8Input):
        return x.q, x.scale.float()
    if act_scale is None:
        return quantize_fp8_per_token(x)
    return quantize_fp8(x, act_scale.float()), act_scale.float()


def _quantize_input_cuda(x: torch.Tensor, act_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """_quantize_input in one Triton pass (fp8_quant.py, bit-identical) for CUDA tensors where Triton is installed;
    torch's four elementwise passes otherwise."""
    if not x.is_cuda or isinstance(x, Fp8Input):
        return _quantize_input(x, act_scale)
    try:
        from llmapi._kernels.fp8_quant import quantize_fp8_rows
    except ImportError:
        return _quantize_input(x, act_scale)
    return quantize_fp8_rows(x if x.stride(1) == 1 else x.contiguous(),
                             None if act_scale is None else act_scale.float())


def _rowwise_supported(device: torch.device) -> bool:
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= _ROWWISE_MIN_CAPABILITY


def fp8_linear_ref(x, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   act_scale: torch.Tensor | None) -> torch.Tensor:  # [T, K] -> [T, N]
    """Emulated FP8 linear: x quantized to E4M3 (static act_scale [1], or per token when None; an Fp8Input
    is already), the E4M3 operands multiplied exactly and summed in float32, then scaled by both scales;
    + bias, in x's dtype."""
    xq, xs = _quantize_input(x, act_scale)  # [T, K] E4M3, [1] or [T, 1]
    acc = xq.float() @ qweight.float().T  # [T, N]
    y = acc * xs * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_linear_scaled_mm(x, qweight: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None, act_scale: torch.Tensor | None) -> torch.Tensor:  # [T, K] -> [T, N]
    """fp8_linear_ref through torch._scaled_mm (CUDA sm_89+; torch 2.13 also has it on CPU); same arguments.

    _scaled_mm takes the weight as a column-major [K, N] (qweight [N, K] row-major, transposed: no copy) and
    wants K and N multiples of 16 (any number of rows): another K or N (no real model has one) takes the
    emulated path instead.
    """
    k = x.shape[1]
    n = qweight.shape[0]
    if k % _MM_MULTIPLE or n % _MM_MULTIPLE:
        return fp8_linear_ref(x, qweight, w_scale, bias, act_scale)
    xq, xs = _quantize_input_cuda(x, act_scale)  # [T, K] E4M3, [1] or [T, 1]
    ws = w_scale.float()
    if xs.numel() == 1 and ws.numel() == 1:
        y = torch._scaled_mm(xq, qweight.t(), scale_a=xs, scale_b=ws, out_dtype=x.dtype,
                             use_fast_accum=FAST_ACCUM)  # [T, N]
    elif x.dtype == torch.bfloat16 and _rowwise_supported(xq.device):
        # Row-wise scaling: scale_a [T, 1], scale_b [1, N], float32, fused into the GEMM (bfloat16 output only).
        xs = xs.expand(xq.shape[0], 1).contiguous()
        y = torch._scaled_mm(xq, qweight.t(), scale_a=xs, scale_b=ws.reshape(1, -1).expand(1, n).contiguous(),
                             out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM)
    else:  # unit scales in the GEMM, the row and column scales applied to its float32 result
        one = torch.ones((), dtype=torch.float32, device=xq.device)
        y = torch._scaled_mm(xq, qweight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                             use_fast_accum=FAST_ACCUM)
        y = y * xs * ws.reshape(1, -1)
    if bias is not None:
        y = y.float() + bias.float()
    return y.to(x.dtype)


def fp8_linear(x, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               act_scale: torch.Tensor | None) -> torch.Tensor:  # [T, K] -> [T, N]
    """The FP8 linear: _scaled_mm on CUDA, the emulation elsewhere; x [T, K] or an Fp8Input."""
    if x.is_cuda:
        return fp8_linear_scaled_mm(x, qweight, w_scale, bias, act_scale)
    return fp8_linear_ref(x, qweight, w_scale, bias, act_scale)
