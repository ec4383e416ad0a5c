"""Logits outputs the runner keeps per request for the LLM: prompt logprobs, context and generation logits."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch


@dataclass
class PromptRecord:
    """A request's prompt positions computed so far (chunks arrive in order; a recompute after
    preemption repeats positions, which are skipped)."""

    num_positions: int = 0
    logits: List[torch.Tensor] = field(default_factory=list)  # [m, V] chunks: context logits
    token_logprobs: List[torch.Tensor] = field(default_factory=list)  # [m] logprob of the next prompt token
    ranks: List[torch.Tensor] = field(default_factory=list)  # [m]
    top_ids: List[torch.Tensor] = field(default_factory=list)  # [m, k]
    top_logprobs: List[torch.Tensor] = field(default_factory=list)  # [m, k]


class LogitsRecords:
    """Written by the runner on the executor's thread, taken by the LLM's response thread. Only
    requests opened (by the LLM, before it enqueues them) and not yet popped are recorded: a
    request finished early on the Python side may still run one more step."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: set = set()
        self._prompt: Dict[int, PromptRecord] = {}
        self._generation: Dict[int, Dict[int, Dict[int, torch.Tensor]]] = {}  # id -> seq -> index -> [V]

    def open(self, request_id: int) -> None:
        with self._lock:
            self._open.add(request_id)

    def record_prompt(self, batch, hidden: torch.Tensor, query_start: np.ndarray,
                      compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """For rows that asked, the logits of this step's prompt positions (hidden: [T, H])."""
        want_lp = np.asarray(batch.prompt_logprobs)
        want_logits = np.asarray(batch.context_logits) != 0
        rows = np.nonzero((want_lp >= 0) | want_logits)[0]
        if len(rows) == 0:
            return
        query_lens, context_lens = np.asarray(batch.query_lens), np.asarray(batch.context_lens)
        prompt_lens, input_ids = np.asarray(batch.prompt_lens), np.asarray(batch.input_ids)
        for r in rows:
            rid, start = int(batch.request_ids[r]), int(context_lens[r] - query_lens[r])
            with self._lock:
                if rid not in self._open:
                    continue
                rec = self._prompt.setdefault(rid, PromptRecord())
            first = max(rec.num_positions, start)  # positions before it are recorded already
            end = min(int(context_lens[r]), int(prompt_lens[r]))
            if end <= first:
                continue
            at = int(query_start[r]) + first - start
            logits = compute_logits(hidden[at:at + end - first])  # [m, V] float32
            if want_logits[r]:
                rec.logits.append(logits)
            k = int(want_lp[r])
            if k >= 0:
                # Position p scores prompt token p + 1; the last prompt position has none.
                nxt = list(input_ids[at + 1:at + end - first]) + [int(batch.next_token_ids[r])]
                m = min(end, int(prompt_lens[r]) - 1) - first
                if m > 0:
                    logprobs = logits[:m].log_softmax(dim=-1)  # [m, V]
                    targets = torch.tensor(nxt[:m], dtype=torch.long, device=logits.device)
                    chosen = logprobs.gather(1, targets[:, None])  # [m, 1]
                    rec.token_logprobs.append(chosen[:, 0])
                    rec.ranks.append((logprobs > chosen).sum(dim=-1) + 1)
                    values, ids = logprobs.topk(k, dim=-1)
                    rec.top_ids.append(ids)
                    rec.top_logprobs.append(values)
            rec.num_positions = end

    def record_generation(self, batch, logits: torch.Tensor) -> None:
        """The raw logits [V] of each sampled token of the rows that asked (logits: [R, V])."""
        rows = np.nonzero((np.asarray(batch.generation_logits) != 0) & (np.asarray(batch.do_sample) != 0))[0]
        num_candidates = np.asarray(batch.num_candidates)
        for r in rows:
            rid, index = int(batch.request_ids[r]), int(batch.output_index[r])
            # A forking row's samples all come from these logits.
            seqs = range(int(num_candidates[r])) if num_candidates[r] > 1 else [int(batch.seq_index[r])]
            row = logits[r].clone()  # [V]: the decoding step then processes logits in place
            with self._lock:
                if rid not in self._open:
                    continue
                per_seq = self._generation.setdefault(rid, {})
                for seq in seqs:
                    per_seq.setdefault(seq, {})[index] = row

    def pop(self, request_id: int):
        """(PromptRecord or None, {seq: {output index: logits [V]}}) of a finished request."""
        with self._lock:
            self._open.discard(request_id)
            return self._prompt.pop(request_id, None), self._generation.pop(request_id, {})

    def prompt_logprobs(self, record: Optional[PromptRecord]):
        """The record's prompt logprobs as host lists: (token_logprobs, ranks, top_ids, top_logprobs)."""
        if record is None or not record.token_logprobs:
            return [], [], [], []
        return (torch.cat(record.token_logprobs).tolist(), torch.cat(record.ranks).tolist(),
                torch.cat(record.top_ids).tolist(), torch.cat(record.top_logprobs).tolist())
