"""Triton batched LoRA (punica's SGMV shape): shrink x @ A^T and expand s @ B^T over the tokens grouped by slot.

Reference: lora.py (lora_shrink_ref, lora_expand_ref). The grid's last axis is the adapter slot and its first the
blocks of that slot's tokens (SlotOrder), so a program multiplies a block of tokens that share one A or B; the
grid depends on the token count and the number of slots only, never on how the tokens fall into slots, which is
what lets a decode CUDA graph replay it with other requests' adapters. The shrink keeps float32 (as vLLM's); the
expand adds into the base linear's output in place.

A step of few tokens (a decode step: one token a request) gives the shrink too few programs to be anything but a
chain of BLOCK_K loads along K on one SM (a 14336-wide input: 224 of them). Then the shrink splits K: program
(m, r, split) writes its part of the sum to its own plane of s [SPLIT, T, R], and the expand adds the planes as it
loads them (a fixed order: the same result every run, no atomics).
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
SPLIT_MAX_TOKENS = 64  # the shrink splits K for steps of at most this many tokens
MAX_SPLIT = 16  # ... into at most this many parts (the expand sums them in one [BM, SPLIT, BR] load)
SPLIT_K = 256  # ... of at least this many input features each


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, s_ptr, order_ptr, starts_ptr, counts_ptr, K, R, K_PER_SPLIT, stride_xm, stride_as,
                   stride_ar, stride_ss, stride_sm, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    pid_m, pid_rk, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid_r, split = pid_rk // SPLIT, pid_rk % SPLIT
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
        k_lo = split * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask_k = ks < k_hi
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=mask_m[:, None] & mask_k[None, :],
                         other=0.0)  # [BM, BK]
            at = tl.load(a_base + cols[:, None] * stride_ar + ks[None, :], mask=mask_r[:, None] & mask_k[None, :],
                         other=0.0)  # [BR, BK]
            acc += tl.dot(xt.to(DOT_DTYPE), tl.trans(at.to(DOT_DTYPE)), input_precision=PRECISION)
        tl.store(s_ptr + split * stride_ss + rows[:, None] * stride_sm + cols[None, :], acc,
                 mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(s_ptr, b_ptr, y_ptr, order_ptr, starts_ptr, counts_ptr, N, R, NUM_SPLITS, stride_ss, stride_sm,
                   stride_bs, stride_bn, stride_ym, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_P: tl.constexpr):
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
            if SPLIT_P == 1:
                st = tl.load(s_ptr + rows[:, None] * stride_sm + rs[None, :], mask=mask_m[:, None] & mask_r[None, :],
                             other=0.0)  # [BM, BR] float32
            else:  # the shrink's planes, summed
                sp = tl.arange(0, SPLIT_P)
                mask = mask_m[:, None, None] & (sp < NUM_SPLITS)[None, :, None] & mask_r[None, None, :]
                st = tl.sum(tl.load(s_ptr + sp[None, :, None] * stride_ss + rows[:, None, None] * stride_sm
                                    + rs[None, None, :], mask=mask, other=0.0), axis=1)  # [BM, BR]
            bt = tl.load(b_base + cols[:, None] * stride_bn + rs[None, :], mask=mask_n[:, None] & mask_r[None, :],
                         other=0.0)  # [BN, BR]
            acc += tl.dot(st.to(DOT_DTYPE), tl.trans(bt.to(DOT_DTYPE)), input_precision=PRECISION)
        ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


def num_splits(tokens: int, in_features: int) -> int:
    """How many parts the shrink splits K into for a step of `tokens` tokens (1: none)."""
    if tokens > SPLIT_MAX_TOKENS:
        return 1
    return max(1, min(MAX_SPLIT, in_features // SPLIT_K))


def lora_shrink(x: torch.Tensor, a: torch.Tensor, order: SlotOrder) -> torch.Tensor:
    """s = x @ A[slot]^T (float32) for the tokens with a slot, as [SPLIT, T, R] planes whose sum is s ([T, K],
    [S, R, K] -> [SPLIT, T, R]; SPLIT = num_splits(T, K)); the rows of the other tokens are left unwritten."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    t, k = x.shape
    slots, r, _ = a.shape
    split = num_splits(t, k)
    per_split = triton.cdiv(triton.cdiv(k, split), BLOCK_K) * BLOCK_K
    s = torch.empty(split, t, r, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(max(t, 1), BLOCK_M), triton.cdiv(r, BLOCK_R) * split, slots)
    _shrink_kernel[grid](x, a, s, order.order, order.starts, order.counts, k, r, per_split, x.stride(0), a.stride(0),
                         a.stride(1), s.stride(0), s.stride(1), **dot_args(a.dtype), BLOCK_M=BLOCK_M,
                         BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, SPLIT=split)
    return s


def lora_expand(y: torch.Tensor, s: torch.Tensor, b: torch.Tensor, order: SlotOrder) -> torch.Tensor:
    """y += s @ B[slot]^T ([T, N] += sum of s's [SPLIT, T, R] planes @ [S, N, R]) in place for the tokens with a
    slot; returns y."""
    assert y.stride(-1) == 1 and b.stride(-1) == 1, "the expand kernel needs contiguous rows"
    t, n = y.shape
    slots, _, r = b.shape
    split = s.shape[0]
    grid = (triton.cdiv(max(t, 1), BLOCK_M), triton.cdiv(n, BLOCK_N), slots)
    _expand_kernel[grid](s, b, y, order.order, order.starts, order.counts, n, r, split, s.stride(0), s.stride(1),
                         b.stride(0), b.stride(1), y.stride(0), **dot_args(b.dtype), BLOCK_M=BLOCK_M,
                         BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, SPLIT_P=triton.next_power_of_2(split))
    return y


def lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, order: SlotOrder) -> torch.Tensor:
    """y += (x @ A[slot]^T) @ B[slot]^T per token (slot -1: nothing), in place; returns y."""
    return lora_expand(y, lora_shrink(x, a, order), b, order)


__all__ = ["lora", "lora_shrink", "lora_expand", "num_splits"]
