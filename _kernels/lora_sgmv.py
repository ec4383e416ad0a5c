"""Triton batched LoRA (punica's SGMV shape): shrink x @ A^T and expand s @ B^T over the tokens grouped by slot.

Reference: lora.py (lora_shrink_ref, lora_expand_ref). The grid's last axis is the adapter slot and its first the
blocks of that slot's tokens (SlotOrder), so a program multiplies a block of tokens that share one A or B; the
grid depends on the token count and the number of slots only, never on how the tokens fall into slots, which is
what lets a decode CUDA graph replay it with other requests' adapters. The shrink keeps float32 (as vLLM's); the
expand adds into the base linear's output in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_args
from .lora import SlotOrder

BLOCK_M = 16  # tokens per program
BLOCK_R = 16  # rank per chunk
BLOCK_K = 64  # input features per chunk (shrink)
BLOCK_N = 64  # output features per program (expand)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, s_ptr, order_ptr, starts_ptr, counts_ptr, K, R, stride_xm, stride_as, stride_ar,
                   stride_sm, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_r, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    count = tl.load(counts_ptr + slot)
    if pid_m * BLOCK_M < count:
        start = tl.load(starts_ptr + slot)
        idx = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] this slot's tokens
        mask_m = idx < count
        rows = tl.load(order_ptr + start + idx, mask=mask_m, other=0).to(tl.int64)  # [BM] token indices
        cols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] rank
        mask_r = cols < R
        a_base = a_ptr + slot.to(tl.int64) * stride_as
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask_k = ks < K
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=mask_m[:, None] & mask_k[None, :],
                         other=0.0)  # [BM, BK]
            at = tl.load(a_base + cols[:, None] * stride_ar + ks[None, :], mask=mask_r[:, None] & mask_k[None, :],
                         other=0.0)  # [BR, BK]
            acc += tl.dot(xt.to(DOT_DTYPE), tl.trans(at.to(DOT_DTYPE)), input_precision=PRECISION)
        tl.store(s_ptr + rows[:, None] * stride_sm + cols[None, :], acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(s_ptr, b_ptr, y_ptr, order_ptr, starts_ptr, counts_ptr, N, R, stride_sm, stride_bs, stride_bn,
                   stride_ym, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m, pid_n, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    count = tl.load(counts_ptr + slot)
    if pid_m * BLOCK_M < count:
        start = tl.load(starts_ptr + slot)
        idx = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = idx < count
        rows = tl.load(order_ptr + start + idx, mask=mask_m, other=0).to(tl.int64)  # [BM]
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output features
        mask_n = cols < N
        b_base = b_ptr + slot.to(tl.int64) * stride_bs
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            mask_r = rs < R
            st = tl.load(s_ptr + rows[:, None] * stride_sm + rs[None, :], mask=mask_m[:, None] & mask_r[None, :],
                         other=0.0)  # [BM, BR] float32
            bt = tl.load(b_base + cols[:, None] * stride_bn + rs[None, :], mask=mask_n[:, None] & mask_r[None, :],
                         other=0.0)  # [BN, BR]
            acc += tl.dot(st.to(DOT_DTYPE), tl.trans(bt.to(DOT_DTYPE)), input_precision=PRECISION)
        ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, order: SlotOrder) -> torch.Tensor:  # [T, K], [S, R, K] -> [T, R]
    """s = x @ A[slot]^T (float32) for the tokens with a slot; the rows of the others are left unwritten."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    t, k = x.shape
    slots, r, _ = a.shape
    s = torch.empty(t, r, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(max(t, 1), BLOCK_M), triton.cdiv(r, BLOCK_R), slots)
    _shrink_kernel[grid](x, a, s, order.order, order.starts, order.counts, k, r, x.stride(0), a.stride(0),
                         a.stride(1), s.stride(0), **dot_args(a.dtype), BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R,
                         BLOCK_K=BLOCK_K)
    return s


def lora_expand(y: torch.Tensor, s: torch.Tensor, b: torch.Tensor, order: SlotOrder) -> torch.Tensor:
    """y += s @ B[slot]^T ([T, N] += [T, R] @ [S, N, R]) in place for the tokens with a slot; returns y."""
    assert y.stride(-1) == 1 and b.stride(-1) == 1, "the expand kernel needs contiguous rows"
    t, n = y.shape
    slots, _, r = b.shape
    grid = (triton.cdiv(max(t, 1), BLOCK_M), triton.cdiv(n, BLOCK_N), slots)
    _expand_kernel[grid](s, b, y, order.order, order.starts, order.counts, n, r, s.stride(0), b.stride(0),
                         b.stride(1), y.stride(0), **dot_args(b.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                         BLOCK_R=BLOCK_R)
    return y


def lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, order: SlotOrder) -> torch.Tensor:
    """y += (x @ A[slot]^T) @ B[slot]^T per token (slot -1: nothing), in place; returns y."""
    return lora_expand(y, lora_shrink(x, a, order), b, order)


__all__ = ["lora", "lora_shrink", "lora_expand"]
