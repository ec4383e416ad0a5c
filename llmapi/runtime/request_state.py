"""Per-request state rows of the runner: output-token counts and prompt masks for penalties, token histories."""

from __future__ import annotations

import numpy as np
import torch


class RequestState:
    """Rows indexed by the executor's state slots (a request that needs penalties or a logits
    processor holds one while it runs). Each step the batch says, per row, whether its slot is
    new (cleared), forked (copied from another slot) and which of its tokens to append; the
    counts live on the device, the token histories (for Python logits processors) on the host.
    """

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self.output_counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)  # [S, V]
        self.in_prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)  # [S, V]
        self.histories: dict[int, list[int]] = {}  # slot -> prompt + output ids (processor rows)

    def _grow(self, num_slots: int) -> None:
        have = self.output_counts.shape[0]
        if num_slots <= have:
            return
        size = max(num_slots, 2 * have, 8)  # amortised: slots are handed out lowest first
        counts = torch.zeros(size, self.vocab_size, dtype=torch.int32, device=self.device)
        mask = torch.zeros(size, self.vocab_size, dtype=torch.bool, device=self.device)
        counts[:have] = self.output_counts
        mask[:have] = self.in_prompt
        self.output_counts, self.in_prompt = counts, mask

    def update(self, batch, history_rows: np.ndarray) -> None:
        """Bring the rows of `batch`'s requests up to date (copies, then clears, then appends).

        history_rows: [R] bool, rows whose host token history is kept (they have a processor).
        """
        slots = np.asarray(batch.slots)
        rows = np.nonzero(slots >= 0)[0]
        if len(rows) == 0:
            return
        self._grow(int(slots.max()) + 1)
        copy_from = np.asarray(batch.slot_copy_from)
        copies = rows[copy_from[rows] >= 0]
        if len(copies):
            # Gathered first, so a copy reads the state from before this step in any order.
            src = torch.tensor(copy_from[copies], dtype=torch.long, device=self.device)
            dst = torch.tensor(slots[copies], dtype=torch.long, device=self.device)
            self.output_counts[dst] = self.output_counts[src]
            self.in_prompt[dst] = self.in_prompt[src]
            saved = {int(copy_from[r]): list(self.histories.get(int(copy_from[r]), [])) for r in copies
                     if history_rows[r]}
            for r in copies:
                if history_rows[r]:
                    self.histories[int(slots[r])] = list(saved[int(copy_from[r])])
        resets = rows[np.asarray(batch.slot_reset)[rows] != 0]
        if len(resets):
            idx = torch.tensor(slots[resets], dtype=torch.long, device=self.device)
            self.output_counts[idx] = 0
            self.in_prompt[idx] = False
            for r in resets:
                self.histories[int(slots[r])] = []
        offsets = np.asarray(batch.state_offsets)
        ids = np.asarray(batch.state_ids)
        if len(ids) == 0:
            return
        lengths = np.diff(offsets)
        entry_rows = np.repeat(np.arange(len(slots)), lengths)  # [H]
        positions = np.asarray(batch.state_start)[entry_rows] + np.arange(len(ids)) - offsets[entry_rows]
        is_output = positions >= np.asarray(batch.prompt_lens)[entry_rows]
        entry_slots = torch.tensor(slots[entry_rows], dtype=torch.long, device=self.device)
        entry_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        out = torch.tensor(is_output, device=self.device)
        self.output_counts.index_put_((entry_slots[out], entry_ids[out]),
                                      torch.ones((), dtype=torch.int32, device=self.device), accumulate=True)
        self.in_prompt.index_put_((entry_slots[~out], entry_ids[~out]),
                                  torch.ones((), dtype=torch.bool, device=self.device))
        for r in np.nonzero(history_rows & (lengths > 0))[0]:
            self.histories.setdefault(int(slots[r]), []).extend(ids[offsets[r]:offsets[r + 1]].tolist())

    def rows(self, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(output_counts [N, V], in_prompt [N, V]) of the given slots."""
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        return self.output_counts[idx], self.in_prompt[idx]
