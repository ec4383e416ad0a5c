"""Triton rotary embedding (rotate-half style), applied to q and k in place (reference: layers.rotary.apply_rotary)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(x_ptr, stride_t, stride_h, t, c, s, num_heads,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < num_heads) & (j < HALF)
    p1 = x_ptr + t * stride_t + h * stride_h + j  # [BLOCK_H, BLOCK_HALF] first halves
    x1 = tl.load(p1, mask=mask).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    # Each product is rounded to the model dtype before the sum, as the reference computes it.
    x1c = (x1 * c).to(dtype).to(tl.float32)
    x2s = (x2 * s).to(dtype).to(tl.float32)
    x2c = (x2 * c).to(dtype).to(tl.float32)
    x1s = (x1 * s).to(dtype).to(tl.float32)
    tl.store(p1, (x1c - x2s).to(dtype), mask=mask)
    tl.store(p1 + HALF, (x2c + x1s).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_stride_t, q_stride_h, k_stride_t, k_stride_h, cs_stride_t,
                   NH: tl.constexpr, NKV: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    # cos/sin repeat their first half (cat(freqs, freqs)): the first half is all a head needs.
    c = tl.load(cos_ptr + t * cs_stride_t + j, mask=j < HALF).to(tl.float32)  # [1, BLOCK_HALF]
    s = tl.load(sin_ptr + t * cs_stride_t + j, mask=j < HALF).to(tl.float32)
    _rotate(q_ptr, q_stride_t, q_stride_h, t, c, s, NH, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate(k_ptr, k_stride_t, k_stride_h, t, c, s, NKV, HALF, BLOCK_KH, BLOCK_HALF)


def rotary_qk_(
    q: torch.Tensor,  # [T, nh, hd], last axis contiguous; rotated in place
    k: torch.Tensor,  # [T, nkv, hd], last axis contiguous; rotated in place
    cos: torch.Tensor,  # [T, hd] in the model dtype (as the reference gets it)
    sin: torch.Tensor,  # [T, hd]
) -> None:
    """q, k <- apply_rotary(q, cos, sin), apply_rotary(k, cos, sin): one program per token for both."""
    num_tokens, nh, hd = q.shape
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and sin.stride() == cos.stride()
    if num_tokens == 0:
        return
    half = hd // 2
    _rotary_kernel[(num_tokens,)](
        q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        NH=nh, NKV=k.shape[1], HALF=half, BLOCK_QH=triton.next_power_of_2(nh),
        BLOCK_KH=triton.next_power_of_2(k.shape[1]), BLOCK_HALF=triton.next_power_of_2(half),
    )
