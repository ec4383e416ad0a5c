"""Triton rotary embedding (rotate-half, of the whole head or of its first rotary_dim features) of q and k in
place, optionally fused with the KV-cache write."""

import torch
import triton
import triton.language as tl

from .kv_write import kv_quant_args, load_kv_scales, to_cache


@triton.jit
def _rotate(src, dst, src_stride_h, dst_stride_h, c, s, num_heads, enabled, dst_scale,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, KV_QUANT: tl.constexpr):
    """Rotate the heads of one token row at `src` and store them at `dst` (where `enabled`); a quantized
    `dst` (KV_QUANT, see kv_write.to_cache) gets the codes of the rotated values, rounded to the model dtype
    first as the reference quantizes them, over `dst_scale`."""
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < num_heads) & (j < HALF)
    x1 = tl.load(src + h * src_stride_h + j, mask=mask).to(tl.float32)  # [BLOCK_H, BLOCK_HALF] first halves
    x2 = tl.load(src + h * src_stride_h + HALF + j, mask=mask).to(tl.float32)
    dtype = src.dtype.element_ty
    # Each product is rounded to the model dtype before the sum, as the reference computes it.
    x1c = (x1 * c).to(dtype).to(tl.float32)
    x2s = (x2 * s).to(dtype).to(tl.float32)
    x2c = (x2 * c).to(dtype).to(tl.float32)
    x1s = (x1 * s).to(dtype).to(tl.float32)
    out_ty = dst.dtype.element_ty
    first = to_cache((x1c - x2s).to(dtype).to(tl.float32), dst_scale, out_ty, KV_QUANT)
    second = to_cache((x2c + x1s).to(dtype).to(tl.float32), dst_scale, out_ty, KV_QUANT)
    tl.store(dst + h * dst_stride_h + j, first, mask=mask & enabled)
    tl.store(dst + h * dst_stride_h + HALF + j, second, mask=mask & enabled)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, scale_ptr,
                   q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, cs_stride_t,
                   NH: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_PASS: tl.constexpr, WRITE_KV: tl.constexpr,
                   KV_QUANT: tl.constexpr):
    # HALF is half the rotary dim: 2 * HALF < HD (partial rotary) leaves the features from 2 * HALF on as they
    # are, which in place means untouched; only the fused KV write has to copy k's to the cache.
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    # cos/sin repeat their first half (cat(freqs, freqs)): the first half is all a head needs.
    c = tl.load(cos_ptr + t * cs_stride_t + j, mask=j < HALF).to(tl.float32)  # [1, BLOCK_HALF]
    s = tl.load(sin_ptr + t * cs_stride_t + j, mask=j < HALF).to(tl.float32)
    q_row = q_ptr + t * q_stride_t
    _rotate(q_row, q_row, q_stride_h, q_stride_h, c, s, NH, t >= 0, 1.0, HALF, BLOCK_QH, BLOCK_HALF, 0)
    k_row = k_ptr + t * k_stride_t
    if WRITE_KV:
        # Rotated k goes straight to its cache slot (k itself is not needed after); v is copied beside it.
        slot = tl.load(slot_ptr + t).to(tl.int64)
        ok = slot >= 0  # negative: a padding token
        row = tl.where(ok, slot, 0) * (NKV * HD)
        k_scale, v_scale = load_kv_scales(scale_ptr, KV_QUANT)
        _rotate(k_row, k_cache_ptr + row, k_stride_h, HD, c, s, NKV, ok, k_scale, HALF, BLOCK_KH, BLOCK_HALF,
                KV_QUANT)
        h = tl.arange(0, BLOCK_KH)[:, None]
        if 2 * HALF < HD:  # partial rotary: k's features past the rotary dim go to the cache unrotated
            p = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, :]
            pass_mask = (h < NKV) & (p < HD)
            k_pass = tl.load(k_row + h * k_stride_h + p, mask=pass_mask).to(tl.float32)
            k_pass = to_cache(k_pass, k_scale, k_cache_ptr.dtype.element_ty, KV_QUANT)
            tl.store(k_cache_ptr + row + h * HD + p, k_pass, mask=pass_mask & ok)
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < NKV) & (d < HD)
        v = tl.load(v_ptr + t * v_stride_t + h * v_stride_h + d, mask=mask).to(tl.float32)
        v = to_cache(v, v_scale, v_cache_ptr.dtype.element_ty, KV_QUANT)
        tl.store(v_cache_ptr + row + h * HD + d, v, mask=mask & ok)
    else:
        _rotate(k_row, k_row, k_stride_h, k_stride_h, c, s, NKV, t >= 0, 1.0, HALF, BLOCK_KH, BLOCK_HALF, 0)


def _launch(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, write_kv: bool, kv_scale=None) -> None:
    num_tokens, nh, hd = q.shape
    nkv = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and sin.stride() == cos.stride()
    rotary_dim = cos.shape[-1]  # hd, or fewer for partial rotary
    if rotary_dim % 2 or not 0 < rotary_dim <= hd or sin.shape != cos.shape:
        raise ValueError(f"rotary tables of shape {tuple(cos.shape)} / {tuple(sin.shape)} do not fit heads of {hd} "
                         "features (the rotary dim must be even and at most head_dim)")
    scale_ptr, kv_quant = kv_quant_args(k_cache, kv_scale) if write_kv else (q, 0)
    if num_tokens == 0:
        return
    half = rotary_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, v, cos, sin, k_cache, v_cache, slot_mapping, scale_ptr, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1),
        v.stride(0), v.stride(1), cos.stride(0), NH=nh, NKV=nkv, HD=hd, HALF=half,
        BLOCK_QH=triton.next_power_of_2(nh), BLOCK_KH=triton.next_power_of_2(nkv),
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_D=triton.next_power_of_2(hd),
        BLOCK_PASS=triton.next_power_of_2(max(hd - rotary_dim, 1)), WRITE_KV=write_kv, KV_QUANT=kv_quant,
    )


def rotary_qk_(
    q: torch.Tensor,  # [T, nh, hd], last axis contiguous; rotated in place
    k: torch.Tensor,  # [T, nkv, hd], last axis contiguous; rotated in place
    cos: torch.Tensor,  # [T, rd] in the model dtype (as the reference gets it); rd <= hd
    sin: torch.Tensor,  # [T, rd]
) -> None:
    """q, k <- apply_rotary(q, cos, sin), apply_rotary(k, cos, sin): one program per token for both. With
    rd < hd (partial rotary) only each head's first rd features are rotated; the rest are not touched."""
    _launch(q, k, k, cos, sin, q, q, q, write_kv=False)


def rotary_write_kv_(
    q: torch.Tensor,  # [T, nh, hd]; rotated in place
    k: torch.Tensor,  # [T, nkv, hd]; left as it is
    v: torch.Tensor,  # [T, nkv, hd]
    cos: torch.Tensor,  # [T, rd]; rd <= hd
    sin: torch.Tensor,  # [T, rd]
    k_cache: torch.Tensor,  # [num_blocks, block, nkv, hd] contiguous
    v_cache: torch.Tensor,  # [num_blocks, block, nkv, hd] contiguous
    slot_mapping: torch.Tensor,  # [T] int; negative = skip
    kv_scale: torch.Tensor | None = None,  # [2] (K, V) scales of an int8 / fp8 cache
) -> None:
    """q <- apply_rotary(q); the cache slots get apply_rotary(k) and v (write_kv_ref, quantized for a quantized
    cache): one launch. With rd < hd (partial rotary) k's features past rd reach the cache unrotated."""
    assert v.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    _launch(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, write_kv=True, kv_scale=kv_scale)
