"""The runner's speculative step: drafts (from the batch, a draft model or an EAGLE head), one target forward over
every row, the plain rows decoded as usual and the speculating rows verified, one result for the executor.

A speculating row (Batch.num_draft_tokens[r] = d > 0) computes its last known token and d drafts; its result row
holds the accepted drafts, then the target's own next token (a correction, or the bonus token after all d), -1
after. Such steps run eagerly (their query lengths are 1 + d), except n-gram steps that need nothing but greedy
matching, which replay a verify graph (llmapi.speculative.graphs) on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional

import numpy as np
import torch

from ..runtime.decode import StepOutput
from .rejection import RowSettings, verify


@dataclass
class SpeculativeStepOutput(StepOutput):
    """StepOutput of a step with speculating rows: their tokens are consecutive, and with top logprobs each token
    has its own list (top_ids / top_logprobs [R, K * L], top_per_token)."""

    top_per_token: bool = False


class SpeculativeHandle:
    """A submitted speculative step: its outputs on the device until collect."""

    def __init__(self, outputs: dict):
        self.outputs = outputs

    def collect(self) -> SpeculativeStepOutput:
        host = {name: (t.to("cpu").numpy() if isinstance(t, torch.Tensor) else t) for name, t in self.outputs.items()}
        return SpeculativeStepOutput(**host)


class SpeculativeDecoder:
    """A runner's speculative decoding: the drafter (None for n-gram drafts, which the executor proposes) and the
    speculative step. `mode` is the core's SpeculativeMode; `accept_all` (DraftTargetDecodingConfig's benchmark
    switch) keeps every draft unchecked."""

    def __init__(self, mode: int, drafter=None, accept_all: bool = False, max_draft_len: int = 0):
        self.mode, self.drafter, self.accept_all = mode, drafter, accept_all
        self.max_draft_len = max_draft_len
        self.graphs = None  # VerifyGraphs (n-gram drafts, one rank): capture_graphs

    def capture_graphs(self, model, kv_caches, tokens_per_block: int, max_batch_size: int, max_blocks: int) -> None:
        """Capture the verify graphs (n-gram drafts only: a drafter follows every forward)."""
        from .graphs import VerifyGraphs

        if self.drafter is None and self.max_draft_len > 0:
            self.graphs = None  # a new capture's memory comes after the old graphs are gone
            self.graphs = VerifyGraphs(model, kv_caches, tokens_per_block, max_batch_size, max_blocks,
                                       self.max_draft_len)

    @property
    def extra_bytes_per_token(self) -> int:
        """What the drafter keeps per cached token (its KV, the target's hidden state for EAGLE)."""
        return 0 if self.drafter is None else self.drafter.bytes_per_token

    def allocate(self, num_blocks: int) -> None:
        if self.drafter is not None:
            self.drafter.allocate(num_blocks)

    def caches(self) -> List[torch.Tensor]:
        """The drafter's per-block tensors (block dim 1), copied with the target's on copy-on-write."""
        return [] if self.drafter is None else self.drafter.caches()

    @property
    def needs_every_forward(self) -> bool:
        """A drafter follows every target forward (after_forward): every forward runs eagerly (no decode graphs)."""
        return self.drafter is not None

    def after_forward(self, inputs, hidden: torch.Tensor) -> None:
        if self.drafter is not None:
            self.drafter.after_forward(inputs, hidden)

    @staticmethod
    def handles(batch) -> bool:
        """Whether the batch has a speculating row (host arrays only)."""
        return bool((np.asarray(batch.num_draft_tokens) > 0).any())

    @torch.inference_mode()
    def submit(self, runner, batch, prev_ids: Optional[torch.Tensor]) -> SpeculativeHandle:
        if self.graphs is not None and not self.accept_all:
            from .graphs import applies

            size = self.graphs.size_for(batch) if applies(runner, batch) else 0
            if size:
                runner.stats.graph_steps += 1
                return SpeculativeHandle({"tokens": self.graphs.run(batch, size)})
        dev = runner.device
        inputs = runner.stager.stage(batch, prev_ids=prev_ids)
        plan = StepPlan(batch, dev)
        settings = RowSettings.from_batch(batch, plan.rows, dev)
        draft_probs = None
        if self.drafter is not None:
            drafts, draft_probs = self.drafter.propose(batch, inputs, settings, plan.num_draft)
            plan.place(inputs, drafts)
        else:  # n-gram drafts: in the batch's input ids
            drafts = plan.batch_drafts(inputs)
        hidden = runner.forward(inputs)  # [T, H]
        out, prompt, generation = verify_step(runner, batch, inputs, hidden, plan, settings, drafts, draft_probs,
                                              accept_all=self.accept_all)
        runner.records.add(prompt, generation)
        return SpeculativeHandle(out)


class StepPlan:
    """Where a step's speculating rows and their drafts lie (host arrays of the batch): rows [S], num_draft [S],
    each row's first token `starts` [S], and the drafts' (row, column) pairs and token rows."""

    def __init__(self, batch, device):
        num_draft_all = np.asarray(batch.num_draft_tokens)
        self.device = device
        self.rows = np.flatnonzero(num_draft_all > 0)
        self.num_draft = num_draft_all[self.rows].astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(batch.query_lens))])[self.rows]
        self.kmax = int(self.num_draft.max())
        valid = np.arange(self.kmax)[None, :] < self.num_draft[:, None]  # [S, kmax]
        draft_rows, draft_cols = np.nonzero(valid)
        self.draft_rows = torch.tensor(draft_rows, device=device)
        self.draft_cols = torch.tensor(draft_cols, device=device)
        self.flat = torch.tensor(self.starts[draft_rows] + 1 + draft_cols, device=device)  # the drafts' token rows

    def place(self, inputs, drafts: torch.Tensor) -> None:
        """Drafts [S, kmax] into the step's input ids."""
        inputs.input_ids[self.flat] = drafts[self.draft_rows, self.draft_cols].to(inputs.input_ids.dtype)

    def batch_drafts(self, inputs) -> torch.Tensor:
        """The drafts [S, kmax] (-1 after a row's own count) the batch's input ids hold (n-gram drafts)."""
        drafts = torch.full((len(self.rows), self.kmax), -1, dtype=torch.int64, device=self.device)
        drafts[self.draft_rows, self.draft_cols] = inputs.input_ids[self.flat].long()
        return drafts


def verify_step(runner, batch, inputs, hidden: torch.Tensor, plan: StepPlan, settings: Optional[RowSettings],
                drafts: Optional[torch.Tensor], draft_probs: Optional[torch.Tensor], samples: bool = True,
                accept_all: bool = False):
    """After the target forward (hidden [T, H]): every row decoded as a plain step decodes it, the speculating rows
    verified -> (the step's outputs as StepOutput's fields, prompt chunks, generation rows). With several ranks
    every rank of the last stage calls it (the head's all-gather is a collective); only the sampling rank
    (`samples`, with settings and drafts) decodes and verifies, the others get (None, [], []). `accept_all`: every
    draft kept unchecked (the benchmark switch; see rejection.verify)."""
    prompt, generation = [], []
    # Every row as a plain step decodes it (a speculating row's own result is replaced below).
    if runner.needs_decode(batch):
        base, prompt, generation = runner.decode_step(batch, inputs, hidden, samples=samples)
    else:
        logits = runner.logits(inputs, hidden)
        base = {"tokens": runner.sample(inputs, logits).to(torch.int32).unsqueeze(1)} if samples else None
    # The speculating rows' logits at their last known token and each draft: 1 + d rows each.
    positions = np.concatenate([plan.starts[s] + np.arange(plan.num_draft[s] + 1) for s in range(len(plan.rows))])
    logits = runner.model.compute_logits(hidden[torch.tensor(positions, device=plan.device)])  # [N, V] float32
    if not samples:
        return None, [], []
    raw = logits.clone() if (np.asarray(batch.logprobs)[plan.rows] >= 0).any() else None
    result = verify(settings, logits, plan.num_draft, drafts, draft_probs, accept_all=accept_all)
    return merge(base, batch, plan.rows, result, raw), prompt, generation


def _widen(t: torch.Tensor, width: int, fill) -> torch.Tensor:
    """[R, K] -> [R, width] (width >= K), the new columns `fill`."""
    if t.shape[1] == width:
        return t
    out = torch.full((t.shape[0], width), fill, dtype=t.dtype, device=t.device)
    out[:, :t.shape[1]] = t
    return out


def merge(base: dict, batch, rows: np.ndarray, result, raw: Optional[torch.Tensor]) -> dict:
    """The step's outputs (StepOutput's fields): every row's `base` result (decode()'s dict, or tokens alone), the
    speculating rows `rows` replaced by their verified tokens; with `raw` ([N, V], their raw logits) the
    logprobs, ranks and top lists of those tokens, position by position."""
    dev = result.tokens.device
    num_rows = int(batch.num_requests)
    width = max(base["tokens"].shape[1], result.tokens.shape[1])
    idx = torch.tensor(rows, device=dev)
    tokens = _widen(base["tokens"].to(torch.int32), width, -1)
    tokens[idx] = _widen(result.tokens.to(torch.int32), width, -1)
    out = {name: base.get(name) for name in (f.name for f in fields(StepOutput)) if name != "tokens"}
    out["tokens"] = tokens
    if out.get("scores") is not None:
        out["scores"] = _widen(out["scores"], width, 0.0)
    want = np.asarray(batch.logprobs)
    if raw is None and out.get("logprobs") is None:
        return out
    # Per-token logprobs and ranks: the base rows' columns, the speculating rows' positions.
    logprobs = _widen(out["logprobs"], width, float("nan")) if out.get("logprobs") is not None else \
        torch.full((num_rows, width), float("nan"), device=dev)
    ranks = _widen(out["ranks"], width, 0) if out.get("ranks") is not None else \
        torch.zeros(num_rows, width, dtype=torch.int32, device=dev)
    top_lists = None
    if raw is not None:
        spec_lp = raw.log_softmax(dim=-1)  # [N, V]
        cand = result.tokens.clamp(min=0)  # [S, k + 1]
        at = spec_lp[result.positions]  # [S, k + 1, V]
        chosen = at.gather(2, cand.unsqueeze(2)).squeeze(2)
        spec_ranks = (at > chosen.unsqueeze(2)).sum(dim=-1) + 1
        k1 = cand.shape[1]
        logprobs[idx, :k1], ranks[idx, :k1] = chosen, spec_ranks.to(torch.int32)
        top = int(want[rows].max())
        if top > 0:
            top_lists = at.topk(min(top, at.shape[2]), dim=-1)  # values, ids: [S, k + 1, L]
    out["logprobs"], out["ranks"] = logprobs, ranks
    if top_lists is None:
        return out
    # A top list per token: the base rows' list repeated for every column.
    base_ids, base_lps = out.get("top_ids"), out.get("top_logprobs")
    L = max(top_lists[0].shape[2], 0 if base_ids is None else base_ids.shape[1])
    top_ids = torch.full((num_rows, width, L), -1, dtype=torch.int32, device=dev)
    top_lps = torch.zeros(num_rows, width, L, device=dev)
    if base_ids is not None:
        top_ids[:, :, :base_ids.shape[1]] = base_ids.unsqueeze(1)
        top_lps[:, :, :base_ids.shape[1]] = base_lps.unsqueeze(1)
    values, ids = top_lists
    top_ids[idx] = -1
    top_lps[idx] = 0.0
    top_ids[idx, :ids.shape[1], :ids.shape[2]] = ids.to(torch.int32)
    top_lps[idx, :ids.shape[1], :ids.shape[2]] = values
    out["top_ids"], out["top_logprobs"] = top_ids.reshape(num_rows, width * L), top_lps.reshape(num_rows, width * L)
    out["top_per_token"] = True
    return out


__all__ = ["SpeculativeDecoder", "SpeculativeHandle", "SpeculativeStepOutput", "StepPlan", "merge", "verify_step"]
