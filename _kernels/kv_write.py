"""Triton KV-cache write: scatter this step's K and V into their paged-cache slots (reference: write_kv_ref)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                     NKV: tl.constexpr, HD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # negative: a padding token, nothing to write
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < NKV) & (d < HD)
        dst = slot * (NKV * HD) + h * HD + d  # [BLOCK_H, BLOCK_D]: the cache is [slots, nkv, hd]
        k = tl.load(k_ptr + t * k_stride_t + h * k_stride_h + d, mask=mask)
        v = tl.load(v_ptr + t * v_stride_t + h * v_stride_h + d, mask=mask)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    k: torch.Tensor,  # [T, nkv, hd], last axis contiguous (e.g. a view into the qkv output)
    v: torch.Tensor,  # [T, nkv, hd]
    k_cache: torch.Tensor,  # [num_blocks, block, nkv, hd] contiguous
    v_cache: torch.Tensor,  # [num_blocks, block, nkv, hd] contiguous
    slot_mapping: torch.Tensor,  # [T] int: block * block_size + offset; negative = skip
) -> None:
    """In-place scatter of K/V into the cache, as write_kv_ref; one program per token, no host sync."""
    num_tokens, nkv, hd = k.shape
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NKV=nkv, HD=hd, BLOCK_H=triton.next_power_of_2(nkv), BLOCK_D=triton.next_power_of_2(hd),
    )
