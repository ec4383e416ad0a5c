"""Quantized KV cache (INT8, FP8 E4M3) in plain torch: the cache dtypes, quantize on write, dequantize on read."""

# One scale per layer for K and one for V (per tensor): kv_scale [2] = (K scale, V scale), and a cached
# code c stands for c * scale. The Triton kernels quantize with the same float32 operations (x times the
# correctly rounded 1/scale, then round-half-even or the E4M3 cast), so their cache bytes equal these.

import torch

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
CACHE_DTYPES = {"INT8": torch.int8, "FP8": torch.float8_e4m3fn}
"""kv_cache_quant_algo -> the dtype the paged cache is allocated in."""
CODE_MAX = {torch.int8: INT8_MAX, torch.float8_e4m3fn: FP8_MAX}
"""The largest code of each quantized cache dtype: a calibrated scale is amax / CODE_MAX."""


def is_quantized(cache: torch.Tensor) -> bool:
    return cache.dtype in CODE_MAX


def as_bytes(cache: torch.Tensor) -> torch.Tensor:
    """The same storage as a uint8 view: CPU indexing ops lack float8 kernels, and moving codes is a byte copy."""
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


def quantize_kv_ref(x: torch.Tensor, scale: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """Codes of x (any float dtype, any shape) in `cache_dtype` for a scalar `scale` tensor, saturating."""
    inv = 1.0 / scale.float()  # correctly rounded float32 reciprocal, as the kernels compute it
    y = x.float() * inv
    limit = CODE_MAX[cache_dtype]
    if cache_dtype == torch.int8:
        return torch.round(y).clamp_(-limit, limit).to(torch.int8)  # round half to even
    return y.clamp(-limit, limit).to(cache_dtype)  # E4M3 cast rounds to nearest even; clamp first: no NaN


def dequantize_kv_ref(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values `codes` stand for, in `dtype` (computed in float32)."""
    return (codes.float() * scale.float()).to(dtype)


def kv_scales_from_amax(k_amax: float, v_amax: float, cache_dtype: torch.dtype) -> torch.Tensor:
    """[2] float32 (K, V) scales that map each calibrated max |x| to the largest code; an all-zero tensor gets 1."""
    limit = CODE_MAX[cache_dtype]
    return torch.tensor([a / limit if a > 0 else 1.0 for a in (float(k_amax), float(v_amax))], dtype=torch.float32)
