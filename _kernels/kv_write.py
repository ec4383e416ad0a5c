"""Triton KV-cache write: scatter this step's K and V into their paged-cache slots (reference: write_kv_ref)."""

import torch
import triton
import triton.language as tl
from triton import knobs

from .kv_quant import is_quantized

KV_QUANT = {torch.int8: 1, torch.float8_e4m3fn: 2}
"""The KV_QUANT constexpr of the kernels, by cache dtype; a float cache is 0."""


def kv_quant_args(k_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(scale pointer, KV_QUANT) for a launch; a float cache passes the cache itself, never read as a scale."""
    if not is_quantized(k_cache):
        return k_cache, 0
    if kv_scale is None or kv_scale.numel() != 2:
        raise ValueError("a quantized KV cache needs kv_scale, its [2] (K, V) scales")
    return kv_scale, KV_QUANT[k_cache.dtype]


@triton.jit
def load_kv_scales(scale_ptr, KV_QUANT: tl.constexpr):
    """(K scale, V scale) as float32; (1, 1) for a float cache."""
    if KV_QUANT == 0:
        return 1.0, 1.0
    return tl.load(scale_ptr).to(tl.float32), tl.load(scale_ptr + 1).to(tl.float32)


@triton.jit
def _round_half_even(y):
    """y rounded to an integer, ties to even, for |y| <= 2**22: adding 1.5 * 2**23 leaves no fraction bits."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def to_cache(x, scale, out_ty: tl.constexpr, KV_QUANT: tl.constexpr):
    """float32 x as stored in a cache of `out_ty`: for a quantized cache the codes of x / scale (saturating),
    computed as quantize_kv_ref does: x times the correctly rounded 1 / scale, then round half to even onto
    the int8 or E4M3 grid."""
    if KV_QUANT == 0:
        return x.to(out_ty)
    y = x * tl.math.div_rn(1.0, scale)
    if KV_QUANT == 1:
        return _round_half_even(tl.clamp(y, -127.0, 127.0)).to(tl.int8)
    return round_to_e4m3(tl.clamp(y, -448.0, 448.0)).to(out_ty)


@triton.jit
def round_to_e4m3(y):
    """float32 y (|y| <= 448) rounded to nearest even on the E4M3 grid, still float32: its cast to fp8 is exact.

    Rounded here rather than by the cast: Triton's interpreter rounds float32 -> fp8 wrongly where the
    mantissa carries into the exponent. Subnormals share the smallest normal binade's step 2**-9. The result
    keeps y's sign, zero included, as torch's cast (a negative y that rounds to 0 gives the -0 code; the
    interpreter drops the sign of a zero, a -0 code reads as 0 all the same).
    """
    bits = y.to(tl.int32, bitcast=True)
    exponent = tl.maximum((bits >> 23) & 0xFF, 127 - 6)
    step = ((exponent - 3) << 23).to(tl.float32, bitcast=True)  # 2**(e - 3): E4M3 has 3 mantissa bits
    inv_step = ((257 - exponent) << 23).to(tl.float32, bitcast=True)  # 1 / step, exact (no division)
    rounded = _round_half_even(y * inv_step) * step  # +0 where a negative y rounds to 0
    return (rounded.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def fp8_codes(y, scale):
    """E4M3 codes of float32 y at a static scale, as fp8_linear.quantize_fp8 gives them: y / scale (IEEE
    division), saturated to +-448, rounded to nearest even."""
    return round_to_e4m3(tl.clamp(tl.math.div_rn(y, scale), -448.0, 448.0)).to(tl.float8e4nv)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, scale_ptr,
                     k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                     NKV: tl.constexpr, HD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                     KV_QUANT: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # negative: a padding token, nothing to write
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < NKV) & (d < HD)
        dst = slot * (NKV * HD) + h * HD + d  # [BLOCK_H, BLOCK_D]: the cache is [slots, nkv, hd]
        k = tl.load(k_ptr + t * k_stride_t + h * k_stride_h + d, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + t * v_stride_t + h * v_stride_h + d, mask=mask).to(tl.float32)
        k_scale, v_scale = load_kv_scales(scale_ptr, KV_QUANT)
        tl.store(k_cache_ptr + dst, to_cache(k, k_scale, k_cache_ptr.dtype.element_ty, KV_QUANT), mask=mask)
        tl.store(v_cache_ptr + dst, to_cache(v, v_scale, v_cache_ptr.dtype.element_ty, KV_QUANT), mask=mask)


def write_kv(
    k: torch.Tensor,  # [T, nkv, hd], last axis contiguous (e.g. a view into the qkv output)
    v: torch.Tensor,  # [T, nkv, hd]
    k_cache: torch.Tensor,  # [num_blocks, block, nkv, hd] contiguous
    v_cache: torch.Tensor,  # [num_blocks, block, nkv, hd] contiguous
    slot_mapping: torch.Tensor,  # [T] int: block * block_size + offset; negative = skip
    kv_scale: torch.Tensor | None = None,  # [2] (K, V) scales of an int8 / fp8 cache
) -> None:
    """In-place scatter of K/V into the cache, as write_kv_ref; one program per token, no host sync."""
    num_tokens, nkv, hd = k.shape
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    scale_ptr, kv_quant = kv_quant_args(k_cache, kv_scale)
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, scale_ptr, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NKV=nkv, HD=hd, BLOCK_H=triton.next_power_of_2(nkv), BLOCK_D=triton.next_power_of_2(hd), KV_QUANT=kv_quant,
    )


@triton.jit
def _round_to_bf16(x):
    """float32 x rounded to nearest even on the bfloat16 grid, still float32 (its cast to bfloat16 is exact): what
    the cast does on a GPU, where Triton's interpreter truncates."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _gather_kv_kernel(src_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, out_k_ptr, out_v_ptr, k_scale, v_scale,
                      k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                      NKV: tl.constexpr, HD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                      KV_QUANT: tl.constexpr, ROUND_BF16: tl.constexpr):
    t = tl.program_id(0)
    src = tl.load(src_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NKV) & (d < HD)
    cached = src >= 0  # a cache slot; -1 - j: this step's key j
    row = tl.where(cached, 0, -1 - src)
    at = tl.where(cached, src, 0) * (NKV * HD) + h * HD + d  # [BLOCK_H, BLOCK_D]: the cache is [slots, nkv, hd]
    k = tl.load(k_cache_ptr + at, mask=mask & cached).to(tl.float32)
    v = tl.load(v_cache_ptr + at, mask=mask & cached).to(tl.float32)
    if KV_QUANT != 0:
        k = k * k_scale
        v = v * v_scale
    fresh_k = tl.load(k_ptr + row * k_stride_t + h * k_stride_h + d, mask=mask & ~cached).to(tl.float32)
    fresh_v = tl.load(v_ptr + row * v_stride_t + h * v_stride_h + d, mask=mask & ~cached).to(tl.float32)
    k = tl.where(cached, k, fresh_k)
    v = tl.where(cached, v, fresh_v)
    if ROUND_BF16:
        k = _round_to_bf16(k)
        v = _round_to_bf16(v)
    dst = t.to(tl.int64) * (NKV * HD) + h * HD + d
    tl.store(out_k_ptr + dst, k.to(out_k_ptr.dtype.element_ty), mask=mask)
    tl.store(out_v_ptr + dst, v.to(out_v_ptr.dtype.element_ty), mask=mask)


def gather_kv(
    k: torch.Tensor,  # [T, nkv, hd], last axis contiguous: this step's keys
    v: torch.Tensor,  # [T, nkv, hd]: this step's values
    k_cache: torch.Tensor,  # [num_blocks, block, nkv, hd] contiguous
    v_cache: torch.Tensor,  # [num_blocks, block, nkv, hd] contiguous
    src: torch.Tensor,  # [N] int64: a cache slot, or -1 - j for this step's key j
    kv_scales: tuple[float, float] | None = None,  # (K, V) scales of an int8 / fp8 cache
) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, nkv, hd], [N, nkv, hd]) in k's dtype: row i is the cache's slot src[i] (its codes times the scale for
    a quantized cache, rounded once to k's dtype) or this step's key and value -1 - src[i]; one program per row
    (what flash_prefill copies out of the cache and beside the step's keys, in one pass)."""
    n = src.shape[0]
    _, nkv, hd = k.shape
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    quant = KV_QUANT.get(k_cache.dtype, 0)
    if quant and kv_scales is None:
        raise ValueError("a quantized KV cache needs kv_scales, its (K, V) scales")
    out_k = torch.empty((n, nkv, hd), dtype=k.dtype, device=k.device)
    out_v = torch.empty((n, nkv, hd), dtype=v.dtype, device=v.device)
    if n:
        k_scale, v_scale = kv_scales if quant else (1.0, 1.0)
        _gather_kv_kernel[(n,)](
            src, k, v, k_cache, v_cache, out_k, out_v, float(k_scale), float(v_scale), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), NKV=nkv, HD=hd, BLOCK_H=triton.next_power_of_2(nkv),
            BLOCK_D=triton.next_power_of_2(hd), KV_QUANT=quant,
            ROUND_BF16=bool(knobs.runtime.interpret) and k.dtype == torch.bfloat16,
        )
    return out_k, out_v
