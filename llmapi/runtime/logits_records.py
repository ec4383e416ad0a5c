"""Logits outputs the runner keeps per request for the LLM: prompt logprobs, context and generation logits.

Each step's part is computed from the batch alone (`prompt_chunks`, `generation_rows`), the same on every rank
that computes logits, and then added to a `LogitsRecords`: in the runner's process at one rank; at several,
the sampling rank sends its parts to rank 0 with the step's tokens (llmapi.distributed.step_reply), whose
records the LLM reads when the request finishes (in a spawned job rank 0 sends them along with the request's
last response).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

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


@dataclass
class PromptChunk:
    """One step's prompt positions [first, first + num_positions) of a request that asked for their logits
    or logprobs. Logprob rows are the positions that have a next prompt token (the last has none)."""

    request_id: int
    first: int
    num_positions: int
    logits: Optional[torch.Tensor] = None  # [m, V] float32: context logits asked
    token_logprobs: Optional[torch.Tensor] = None  # [m'] m' <= m: prompt logprobs asked
    ranks: Optional[torch.Tensor] = None  # [m']
    top_ids: Optional[torch.Tensor] = None  # [m', k]
    top_logprobs: Optional[torch.Tensor] = None  # [m', k]


@dataclass
class GenerationRow:
    """The raw logits [V] a sampled token of sequences `seqs` came from (output index `index`)."""

    request_id: int
    index: int
    seqs: Sequence[int]
    logits: torch.Tensor


def prompt_chunks(batch, hidden: torch.Tensor, query_start: np.ndarray,
                  compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> List[PromptChunk]:
    """For rows that asked, the logits (and logprobs) of this step's prompt positions (hidden: [T, H]).

    `compute_logits` is a collective at tensor parallel > 1: every rank of the last stage calls this
    with the same batch, so the calls depend on the batch only.
    """
    want_lp = np.asarray(batch.prompt_logprobs)
    want_logits = np.asarray(batch.context_logits) != 0
    rows = np.nonzero((want_lp >= 0) | want_logits)[0]
    chunks: List[PromptChunk] = []
    if len(rows) == 0:
        return chunks
    query_lens, context_lens = np.asarray(batch.query_lens), np.asarray(batch.context_lens)
    prompt_lens, input_ids = np.asarray(batch.prompt_lens), np.asarray(batch.input_ids)
    request_ids, next_ids = np.asarray(batch.request_ids), np.asarray(batch.next_token_ids)
    for r in rows:
        first = int(context_lens[r] - query_lens[r])
        end = min(int(context_lens[r]), int(prompt_lens[r]))
        if end <= first:
            continue
        at = int(query_start[r])
        logits = compute_logits(hidden[at:at + end - first])  # [m, V] float32
        chunk = PromptChunk(int(request_ids[r]), first, end - first, logits if want_logits[r] else None)
        k = int(want_lp[r])
        # Position p scores prompt token p + 1; the last prompt position has none.
        m = min(end, int(prompt_lens[r]) - 1) - first
        if k >= 0 and m > 0:
            nxt = np.append(input_ids[at + 1:at + end - first], next_ids[r])[:m]
            logprobs = logits[:m].log_softmax(dim=-1)  # [m, V]
            targets = torch.tensor(nxt, dtype=torch.long, device=logits.device)
            chosen = logprobs.gather(1, targets[:, None])  # [m, 1]
            chunk.token_logprobs = chosen[:, 0]
            chunk.ranks = ((logprobs > chosen).sum(dim=-1) + 1).to(torch.int32)
            values, ids = logprobs.topk(k, dim=-1)
            chunk.top_ids, chunk.top_logprobs = ids.to(torch.int32), values
        chunks.append(chunk)
    return chunks


def generation_rows(batch, logits: torch.Tensor) -> List[GenerationRow]:
    """The raw logits [V] of each sampled token of the rows that asked (logits: [R, V]); copies, since the
    decoding step then processes `logits` in place."""
    rows = np.nonzero((np.asarray(batch.generation_logits) != 0) & (np.asarray(batch.do_sample) != 0))[0]
    num_candidates = np.asarray(batch.num_candidates)
    out = []
    for r in rows:
        # A forking row's samples all come from these logits.
        seqs = range(int(num_candidates[r])) if num_candidates[r] > 1 else [int(batch.seq_index[r])]
        out.append(GenerationRow(int(batch.request_ids[r]), int(batch.output_index[r]), seqs, logits[r].clone()))
    return out


class LogitsRecords:
    """Written by the runner on the executor's thread, taken by the LLM's response thread. Only
    requests opened (by the LLM, before it enqueues them) and not yet taken are recorded: a
    request finished early on the Python side may still run one more step."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: set = set()
        self._prompt: Dict[int, PromptRecord] = {}
        self._generation: Dict[int, Dict[int, Dict[int, torch.Tensor]]] = {}  # id -> seq -> index -> [V]

    def open(self, request_id: int) -> None:
        with self._lock:
            self._open.add(request_id)

    def add(self, prompt: Sequence[PromptChunk], generation: Sequence[GenerationRow]) -> None:
        """One step's parts (see prompt_chunks and generation_rows) of the open requests."""
        for chunk in prompt:
            with self._lock:
                if chunk.request_id not in self._open:
                    continue
                rec = self._prompt.setdefault(chunk.request_id, PromptRecord())
            skip = rec.num_positions - chunk.first  # positions recorded already
            if skip >= chunk.num_positions:
                continue
            skip = max(skip, 0)
            if chunk.logits is not None:
                rec.logits.append(chunk.logits[skip:])
            if chunk.token_logprobs is not None and skip < len(chunk.token_logprobs):
                rec.token_logprobs.append(chunk.token_logprobs[skip:])
                rec.ranks.append(chunk.ranks[skip:])
                rec.top_ids.append(chunk.top_ids[skip:])
                rec.top_logprobs.append(chunk.top_logprobs[skip:])
            rec.num_positions = chunk.first + chunk.num_positions
        for row in generation:
            with self._lock:
                if row.request_id not in self._open:
                    continue
                per_seq = self._generation.setdefault(row.request_id, {})
                for seq in row.seqs:
                    per_seq.setdefault(seq, {})[row.index] = row.logits

    def pop(self, request_id: int):
        """(PromptRecord or None, {seq: {output index: logits [V]}}) of a finished request."""
        with self._lock:
            self._open.discard(request_id)
            return self._prompt.pop(request_id, None), self._generation.pop(request_id, {})

    def take(self, request_id: int):
        """(PromptRecord or None, generation logits as pop gives them, prompt logprobs as host lists)."""
        record, generation = self.pop(request_id)
        return record, generation, self.prompt_logprobs(record)

    @staticmethod
    def prompt_logprobs(record: Optional[PromptRecord]):
        """The record's prompt logprobs as host lists: (token_logprobs, ranks, top_ids, top_logprobs)."""
        if record is None or not record.token_logprobs:
            return [], [], [], []
        return (torch.cat(record.token_logprobs).tolist(), torch.cat(record.ranks).tolist(),
                torch.cat(record.top_ids).tolist(), torch.cat(record.top_logprobs).tolist())
