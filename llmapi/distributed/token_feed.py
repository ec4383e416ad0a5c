"""TokenFeed: each step's sampled ids, from the sampling rank to the first pipeline stage, on the device.

With async scheduling a step may take input ids that the step before it samples (Batch.prev_rows: the
executor submits step N+1 before it collects step N). The ranks that embed them, the first stage's, get those
ids here, device to device, without anything crossing the host: the sampling rank sends each micro-batch's ids
as soon as it has them, and a first-stage rank waits, in stream order, only for the pieces that the micro-batch
it runs next refers to. So a stage runs micro-batch k of step N+1 once micro-batch k of step N is sampled, and
the pipeline stays full.

Nothing crosses until a batch first has placeholders (then the step before it crosses whole, once): with
async scheduling off the feed costs nothing. Every rank sees every batch, so all of them turn the feed on at the
same step.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from llmapi.distributed.mapping import Mapping


class _Incoming:
    """One step's ids [R] arriving in pieces (its micro-batches, in order): each piece's end row and receive."""

    def __init__(self, buffer: torch.Tensor, pieces: list):
        self.buffer, self.pieces, self.done = buffer, pieces, 0

    def upto(self, row: int) -> torch.Tensor:
        """The buffer, once the pieces up to the one holding `row` have arrived (on the CPU), or will have
        before the device's next work (NCCL: the stream waits, the host does not)."""
        while self.done < len(self.pieces) and (self.done == 0 or self.pieces[self.done - 1][0] <= row):
            self.pieces[self.done][1].wait()
            self.done += 1
        return self.buffer

    def finish(self) -> None:
        while self.done < len(self.pieces):
            self.pieces[self.done][1].wait()
            self.done += 1


class TokenFeed:
    """A rank's side of the feed: the sampling rank sends (`sampled`), the first stage's other ranks receive
    (`prev_ids`); every rank calls `begin` before its part of each step, and `close` when the model goes."""

    def __init__(self, group, rank: int, mapping: Mapping, device: torch.device):
        self.group, self.device = group, device
        self.source = mapping.sampler_rank
        self.sends = rank == self.source
        self.embeds = mapping.is_first_stage
        self.receives = self.embeds and not self.sends
        self.targets = [r for r in mapping.stage_ranks(0) if r != self.source] if self.sends else []
        self.on = False
        self._steps = self._rows = 0  # steps begun; requests of the last one
        self._ids: list[torch.Tensor] = []  # sending rank: this step's sampled ids by micro-batch
        self._last: list[torch.Tensor] = []  # and the step before's
        self._last_whole: Optional[torch.Tensor] = None
        self._prev: Optional[_Incoming] = None  # receiving rank: the step before's ids
        self._cur: Optional[_Incoming] = None  # and this step's, on the way
        self._sends: list = []  # (work, tensor): the tensor must live until its send completes

    def begin(self, batch, ranges: list[tuple[int, int]]) -> None:
        """Before this rank's part of a step cut into micro-batches `ranges` (request ranges)."""
        placeholders = bool((np.asarray(batch.prev_rows) >= 0).any())
        if placeholders and self._steps == 0:
            raise RuntimeError("the batch takes tokens sampled by a previous step, but none was run")
        if self.sends:
            self._last, self._ids, self._last_whole = self._ids, [], None
        elif self.receives:
            if self._prev is not None:
                self._prev.finish()  # two steps old: long arrived
            self._prev, self._cur = self._cur, None
        if placeholders and not self.on:
            self.on = True
            if self.sends:
                for target in self.targets:
                    self._isend(self._whole_last(), target)
            elif self.receives:
                self._prev = self._receive(self._rows, [(0, self._rows)])
        if self.on and self.receives:
            self._cur = self._receive(int(batch.num_requests), ranges)
        self._steps, self._rows = self._steps + 1, int(batch.num_requests)

    def prev_ids(self, batch) -> Optional[torch.Tensor]:
        """A first-stage rank: the step before's sampled ids [R'] (int32, on the device) that this
        (micro-)batch's placeholders name, or None when it has none."""
        rows = np.asarray(batch.prev_rows)
        need = int(rows.max(initial=-1))
        if need < 0:
            return None
        if self.sends:  # one stage: the sampling rank embeds too
            return self._whole_last()
        return self._prev.upto(need)

    def sampled(self, ids: torch.Tensor) -> None:
        """The sampling rank: a micro-batch's sampled ids [R_mb] (int32, contiguous, its own memory)."""
        self._ids.append(ids)
        if self.on:
            for target in self.targets:
                self._isend(ids, target)

    def close(self) -> None:
        """Wait for every send and receive in flight (before the model goes, so none is left to the next)."""
        for incoming in (self._prev, self._cur):
            if incoming is not None:
                incoming.finish()
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()
        self._prev = self._cur = None

    def _whole_last(self) -> torch.Tensor:
        if self._last_whole is None:
            self._last_whole = self._last[0] if len(self._last) == 1 else torch.cat(self._last)
        return self._last_whole

    def _isend(self, tensor: torch.Tensor, dst: int) -> None:
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
        self._sends.append((dist.isend(tensor, dst, group=self.group), tensor))

    def _receive(self, rows: int, ranges: list[tuple[int, int]]) -> _Incoming:
        buffer = torch.empty(rows, dtype=torch.int32, device=self.device)
        return _Incoming(buffer, [(stop, dist.irecv(buffer[start:stop], self.source, group=self.group))
                                  for start, stop in ranges])
