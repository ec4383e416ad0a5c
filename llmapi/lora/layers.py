"""Adapters applied from outside: LoRA wrappers swapped in around a model's linears, and the prompt-table embedding.

Like tensor parallelism and quantization, nothing in the model file knows about them. A LoraLinear keeps the
module it wraps (float, quantized, column- or row-parallel) and adds, per token, scale * (x @ A^T) @ B^T of the
token's adapter slot; the slots' A and B live in device buffers [max_loras, rank, in] / [max_loras, out, rank]
(scale folded into B). Every wrapper of a model reads the step's token slots from one shared LoraBatch.

Under tensor parallelism each rank holds its shard of every pair: a column-parallel linear's B cut by its output
rows (A whole), a row-parallel linear's A cut by its input columns (B whole); the row-parallel delta is added to
the rank's partial product before the all-reduce, which sums it with the base's.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._kernels.lora import lora_expand_ref, lora_shrink_ref, slot_groups, slot_order
from ..layers.dispatch import use_triton


class LoraBatch:
    """The current step's adapter slot per token, shared by every LoraLinear of a model.

    `set(token_slots)` before a forward: [T] int32 on the device (-1: no adapter), or None when no token of the
    step has one (the wrappers then run the base alone). The Triton path groups the tokens by slot on the device
    (slot_order: no host sync, so a decode CUDA graph can hold it); the CPU path groups them on the host.
    """

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.active = False
        self.order = None
        self.groups: list = []

    def set(self, token_slots: Optional[torch.Tensor], host_slots: Optional[np.ndarray] = None) -> None:
        self.active = token_slots is not None
        self.order, self.groups = None, []
        if not self.active:
            return
        if use_triton(token_slots):
            self.order = slot_order(token_slots, self.num_slots)
        elif host_slots is not None:  # already on the host: no copy back
            device = token_slots.device
            self.groups = [(int(s), torch.from_numpy(np.flatnonzero(host_slots == s)).to(device))
                           for s in np.unique(host_slots) if s >= 0]
        else:
            self.groups = slot_groups(token_slots)

    def state(self) -> tuple:
        """What `set` decided, for `restore` after a pass over other tokens (an encoder's)."""
        return self.active, self.order, self.groups

    def restore(self, state: tuple) -> None:
        self.active, self.order, self.groups = state

    def add(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """y += (x @ A[slot]^T) @ B[slot]^T per token, in place."""
        if self.order is not None:
            from .._kernels.lora_sgmv import lora

            lora(y, x, a, b, self.order)
        elif self.groups:
            lora_expand_ref(y, lora_shrink_ref(x, a, self.groups), b, self.groups)


def _split_of(base: nn.Module) -> tuple[str | None, list, object]:
    """("rows" | "cols" | None, this rank's (start, length) ranges, the row-parallel all-reduce's communicator)."""
    if hasattr(base, "rows"):  # ColumnParallelLinear
        return "rows", list(base.rows), None
    if hasattr(base, "cols"):  # RowParallelLinear
        return "cols", list(base.cols), base.comm
    split = getattr(base, "tp_split", None)  # a quantized linear standing for either
    if split is not None:
        return split[0], list(split[1]), getattr(base, "tp_comm", None)
    return None, [], None


class LoraLinear(nn.Module):
    """base(x) + (x @ A[slot]^T) @ B[slot]^T per token. `in_features` / `out_features` are the full linear's;
    this rank holds the part its split gives it."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, num_slots: int, rank: int,
                 batch: LoraBatch, dtype: torch.dtype, device):
        super().__init__()
        self.base = base
        self.split, self.ranges, self.comm = _split_of(base)
        local = sum(length for _, length in self.ranges)
        self.in_local = local if self.split == "cols" else in_features
        self.out_local = local if self.split == "rows" else out_features
        self.rank = rank
        # Not in the state dict: adapters come and go, the engine's weights do not name them.
        self.register_buffer("lora_a", torch.zeros(num_slots, rank, self.in_local, dtype=dtype, device=device),
                             persistent=False)  # [S, R, in]
        self.register_buffer("lora_b", torch.zeros(num_slots, self.out_local, rank, dtype=dtype, device=device),
                             persistent=False)  # [S, out, R]
        self._batch = (batch,)  # shared, not a submodule

    def install(self, slot: int, pair: Optional[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put the full (unsharded) pair (A [r, in], B [out, r]) in `slot` (this rank's shard of it), or clear
        the slot (None: the adapter leaves this linear alone)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if pair is None:
            return
        a, b = pair
        if self.split == "cols":
            a = torch.cat([a[:, s:s + n] for s, n in self.ranges], dim=1)
        elif self.split == "rows":
            b = torch.cat([b[s:s + n] for s, n in self.ranges], dim=0)
        r = a.shape[0]
        self.lora_a[slot, :r].copy_(a)
        self.lora_b[slot, :, :r].copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        batch = self._batch[0]
        if not batch.active:
            return self.base(x)
        base = self.base
        if self.comm is None:
            y = base(x)
            batch.add(y, x, self.lora_a, self.lora_b)
            return y
        # Row-parallel: the delta joins this rank's partial product before the sum over the ranks.
        y = base.product(x, None) if hasattr(base, "product") else F.linear(x, base.weight)
        batch.add(y, x, self.lora_a, self.lora_b)
        y = self.comm.all_reduce(y)
        return y if base.bias is None else y + base.bias


class PromptTableEmbedding(nn.Module):
    """The vocabulary embedding, where ids >= vocab_size read rows of the prompt tables' device buffer instead
    ([slots * rows per slot, hidden]: the user's side maps a request's prompt-table ids to its slot's rows)."""

    def __init__(self, base: nn.Module, vocab_size: int, num_rows: int, hidden: int, dtype, device):
        super().__init__()
        self.base, self.vocab_size = base, vocab_size
        self.register_buffer("table", torch.zeros(num_rows, hidden, dtype=dtype, device=device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # a tied head reads the embedding's weight
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        virtual = ids >= self.vocab_size  # [T]
        out = self.base(torch.where(virtual, torch.zeros_like(ids), ids))  # [T, H]
        rows = self.table[(ids - self.vocab_size).clamp(min=0, max=self.table.shape[0] - 1)]  # [T, H]
        return torch.where(virtual[:, None], rows.to(out.dtype), out)


__all__ = ["LoraBatch", "LoraLinear", "PromptTableEmbedding"]
