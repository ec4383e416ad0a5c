"""Batched LoRA over device slots, plain-torch reference (the CPU path and the Triton kernels' oracle).

A step's tokens each read one adapter slot (-1: none). shrink: s[t] = x[t] @ A[slot[t]]^T ([T, K] -> [T, R]);
expand: y[t] += s[t] @ B[slot[t]]^T ([T, R] -> [T, N]); rows of slot -1 are left as they are. The kernels
(lora_sgmv.py) work on the tokens grouped by slot (SlotOrder), as punica's SGMV works on segments.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class SlotOrder(NamedTuple):
    """The step's tokens grouped by slot, on the device, computed there (no host sync: a CUDA graph can hold it).

    `order` [T] int32: token indices sorted by slot (the tokens of slot -1 first); `starts` / `counts` [S] int32:
    where slot s's tokens begin in `order`, and how many there are."""

    order: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor


def slot_order(token_slots: torch.Tensor, num_slots: int) -> SlotOrder:
    """SlotOrder of `token_slots` [T] (int, -1 for none) over `num_slots` slots."""
    slots = token_slots.long()
    order = torch.argsort(slots, stable=True).to(torch.int32)  # [T]
    counts = torch.zeros(num_slots + 1, dtype=torch.int32, device=slots.device)
    counts.scatter_add_(0, slots + 1, torch.ones_like(slots, dtype=torch.int32))  # [S + 1], slot -1 first
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    return SlotOrder(order, starts[1:].contiguous(), counts[1:].contiguous())


def slot_groups(token_slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """[(slot, its token indices [n] int64)] of the slots `token_slots` [T] uses (host work: the CPU path's)."""
    slots = token_slots.cpu()
    return [(int(s), torch.nonzero(slots == s).flatten().to(token_slots.device))
            for s in torch.unique(slots).tolist() if s >= 0]


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, groups) -> torch.Tensor:  # [T, K], [S, R, K] -> [T, R]
    """s[t] = x[t] @ A[slot]^T in float32 for the tokens of each (slot, tokens) group; 0 elsewhere."""
    out = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    for slot, rows in groups:
        out[rows] = x[rows].float() @ a[slot].float().t()
    return out


def lora_expand_ref(y: torch.Tensor, s: torch.Tensor, b: torch.Tensor, groups) -> torch.Tensor:
    """y[t] += s[t] @ B[slot]^T ([T, N] += [T, R] @ [S, N, R]) in place for each group's tokens; returns y."""
    for slot, rows in groups:
        y[rows] = (y[rows].float() + s[rows] @ b[slot].float().t()).to(y.dtype)
    return y


def lora_ref(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor):
    """y += (x @ A[slot]^T) @ B[slot]^T per token (slot -1: nothing), in place; returns y."""
    groups = slot_groups(token_slots)
    return lora_expand_ref(y, lora_shrink_ref(x, a, groups), b, groups)


__all__ = ["SlotOrder", "slot_order", "slot_groups", "lora_shrink_ref", "lora_expand_ref", "lora_ref"]
