"""Drafting and verifying draft tokens on the device: greedy matching, and the standard rejection-sampling rule
(accept draft x with probability min(1, p(x) / q(x)); on a rejection sample from normalize(max(0, p - q)); after
all k accepted, one more token from p), so that the output follows the target's sampling distribution.

Every random draw is keyed like the sampler's (llmapi.runtime.sampler): by the request's seed, a salt per kind of
draw, and the output index of the token it decides, so a seeded request gives the same tokens in any batch. A
drafter samples its token with the very noise a plain step would sample that output position with, so a draft
that equals the target (p = q: always accepted) gives plain sampling's tokens. Reusing a key across steps is
sound: a draw that decided nothing (a draft or an acceptance test after the first rejection) may be drawn again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..runtime import sampler
from ..runtime.logits_processing import apply_logit_bias_
from ..runtime.sampler import (GREEDY_TEMPERATURE_EPS, _fmix32, _sorted_top_k_top_p, apply_min_p_, gumbel_noise,
                               row_keys, sample, suppress_)

# sample_index words of the acceptance tests and of the corrections after a rejection (a request's own samples,
# and its drafts, use its sequence index, far below).
SALT_ACCEPT = 0x5D000002
SALT_RESIDUAL = 0x5D000003


def expand_csr(offsets: np.ndarray, owner: np.ndarray, *arrays: np.ndarray) -> tuple:
    """A per-row CSR list (offsets [S+1], entries `arrays`) repeated for each of N positions of row owner[n]:
    (offsets [N+1], the entries of each array for the positions)."""
    lengths = np.diff(offsets)[owner]  # [N]
    out_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    index = np.repeat(offsets[owner], lengths) + (np.arange(out_offsets[-1]) - np.repeat(out_offsets[:-1], lengths))
    return (out_offsets,) + tuple(np.asarray(a)[index] for a in arrays)


def _subset_csr(offsets: np.ndarray, rows: np.ndarray, *arrays: np.ndarray) -> tuple:
    """Rows `rows` of a CSR list: (offsets [S+1], their entries)."""
    return expand_csr(np.asarray(offsets), rows, *arrays)


@dataclass
class RowSettings:
    """The sampling settings of the speculating rows of a batch (S of them), on the device."""

    rows: np.ndarray  # [S] their batch rows
    greedy_host: np.ndarray  # [S] bool
    greedy: torch.Tensor  # [S] bool
    temperature: torch.Tensor  # [S] float32
    top_k: torch.Tensor  # [S] int64
    top_p: torch.Tensor  # [S] float32
    min_p: torch.Tensor  # [S] float32
    seeds: torch.Tensor  # [S] int64
    seq_index: torch.Tensor  # [S] int64
    output_index: torch.Tensor  # [S] int64: output index of the token decided at the row's first position
    bias: tuple  # (offsets [S+1], ids, values) host
    suppress: tuple  # (offsets [S+1], ids) host
    any_filter: bool
    any_min_p: bool

    @classmethod
    def from_batch(cls, batch, rows: np.ndarray, device) -> "RowSettings":
        def take(name, dtype):
            return torch.tensor(np.asarray(getattr(batch, name))[rows], dtype=dtype, device=device)

        temperature = np.asarray(batch.temperature)[rows]
        top_k, top_p = np.asarray(batch.top_k)[rows], np.asarray(batch.top_p)[rows]
        min_p = np.asarray(batch.min_p)[rows]
        vocab_wide = top_k > 0
        greedy = temperature < GREEDY_TEMPERATURE_EPS
        return cls(
            rows=rows, greedy_host=greedy, greedy=torch.tensor(greedy, device=device),
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
            top_k=take("top_k", torch.int64), top_p=take("top_p", torch.float32),
            min_p=torch.tensor(min_p, dtype=torch.float32, device=device),
            seeds=take("seeds", torch.int64), seq_index=take("seq_index", torch.int64),
            output_index=take("output_index", torch.int64),
            bias=_subset_csr(batch.bias_offsets, rows, batch.bias_ids, batch.bias_values),
            suppress=_subset_csr(batch.suppress_offsets, rows, batch.suppress_ids),
            any_filter=bool(((vocab_wide | (top_p < 1.0)) & ~greedy).any()),
            any_min_p=bool(((min_p > 0) & ~greedy).any()))

    @property
    def all_greedy(self) -> bool:
        return bool(self.greedy_host.all())

    def adjust_(self, logits: torch.Tensor, owner: np.ndarray) -> torch.Tensor:
        """Logit bias, then the suppressed ids (single-token bad words), of each position's row, in place:
        logits [N, V] float32, owner [N] (the row of each position, 0..S-1)."""
        dev = logits.device
        offsets, ids, values = expand_csr(self.bias[0], owner, self.bias[1], self.bias[2])
        if len(ids):
            apply_logit_bias_(logits, torch.tensor(offsets, device=dev), torch.tensor(ids, device=dev),
                              torch.tensor(values, dtype=torch.float32, device=dev))
        offsets, ids = expand_csr(self.suppress[0], owner, self.suppress[1])
        if len(ids):
            suppress_(logits, torch.tensor(offsets, device=dev), torch.tensor(ids, dtype=torch.int64, device=dev))
        return logits

    def filtered(self, logits: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """What sample() draws from: logits / temperature with top-k, top-p then min-p applied (removed ids at
        -inf), in vocabulary order; [N, V] float32 (greedy positions are divided by 1)."""
        greedy = self.greedy[owner]
        scaled = logits / self.temperature[owner].masked_fill(greedy, 1.0).unsqueeze(1)
        min_p = self.min_p[owner] if self.any_min_p else None
        if self.any_filter:
            sorted_logits, sorted_ids = _sorted_top_k_top_p(scaled, self.top_k[owner], self.top_p[owner], min_p)
            return torch.empty_like(sorted_logits).scatter_(1, sorted_ids, sorted_logits)
        if min_p is not None:
            apply_min_p_(scaled, min_p)
        return scaled


def uniform(seeds: torch.Tensor, salt: int, output_index: torch.Tensor) -> torch.Tensor:
    """A uniform draw in (0, 1) per element, hashed from (seed, salt, output index): float32 of their shape."""
    keys = row_keys(seeds.reshape(-1), torch.full_like(seeds.reshape(-1), salt), output_index.reshape(-1))
    u = (_fmix32(keys) >> 9).to(torch.float32).add_(0.5).mul_(2.0**-23)
    return u.reshape(seeds.shape)


def gumbel_argmax(logits: torch.Tensor, seeds: torch.Tensor, sample_index, output_index: torch.Tensor) -> torch.Tensor:
    """argmax(logits + Gumbel noise) per row, the noise hashed from (seed, sample index or salt, output index, token
    id), as sample() draws it: a sample of softmax(logits). logits [N, V]; seeds, output_index [N]; sample_index
    [N] or an int. Returns [N] int64."""
    if not isinstance(sample_index, torch.Tensor):
        sample_index = torch.full_like(seeds, sample_index)
    keys = row_keys(seeds, sample_index, output_index)
    vocab = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    return (logits + gumbel_noise(keys, vocab)).argmax(dim=-1)


def draft_tokens(settings: RowSettings, logits: torch.Tensor, owner: np.ndarray, column: int
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A drafter's token for each row of `logits` [n, V] float32 (the drafter's logits; row n belongs to
    speculating row owner[n]), deciding output position output_index + column: the argmax for greedy rows, a
    sample of the processed distribution q otherwise. Returns (tokens [n] int64, q [n, V] or None when every row
    is greedy)."""
    settings.adjust_(logits, owner)
    greedy_ids = logits.argmax(dim=-1)
    if settings.greedy_host[owner].all():
        return greedy_ids, None
    own = torch.as_tensor(owner, dtype=torch.long, device=logits.device)
    filtered = settings.filtered(logits, own)
    q = filtered.softmax(dim=-1)
    sampled = gumbel_argmax(filtered, settings.seeds[own], settings.seq_index[own], settings.output_index[own] + column)
    return torch.where(settings.greedy[own], greedy_ids, sampled), q


def _target_probs_at(settings: RowSettings, logits: torch.Tensor, own: torch.Tensor, rows: torch.Tensor,
                     ids: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(p, p[rows, ids]) for the target's sampling distribution p = softmax(filtered(logits)) [N, V]. Past one of
    sample()'s chunks of logits (sampler.SAMPLE_CHUNK_LOGITS) p is computed chunk by chunk of rows, so that the
    filtering's [N, V] temporaries (a sort's values and int64 ids) stay bounded, and not returned (None)."""
    n, vocab = logits.shape
    chunk = max(1, sampler.SAMPLE_CHUNK_LOGITS // max(vocab, 1))
    if n <= chunk:
        p = settings.filtered(logits, own).softmax(dim=-1)
        return p, p[rows, ids]
    out = torch.zeros(rows.shape, dtype=torch.float32, device=logits.device)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        p = settings.filtered(logits[a:b], own[a:b]).softmax(dim=-1)  # [b - a, V]
        inside = (rows >= a) & (rows < b)  # no host sync: every entry is read, the others' from a valid row
        out = torch.where(inside, p[(rows - a).clamp(0, b - a - 1), ids], out)
    return None, out


@dataclass
class Verified:
    """The verification of S speculating rows."""

    tokens: torch.Tensor  # [S, kmax + 1] int64: the accepted drafts, then the target's token; -1 after
    accepted: torch.Tensor  # [S] int64
    positions: torch.Tensor  # [S, kmax + 1] int64: the logits row that decided each token (for logprobs)


def verify(settings: RowSettings, logits: torch.Tensor, num_draft: np.ndarray, drafts: torch.Tensor,
           draft_probs: Optional[torch.Tensor], accept_all: bool = False) -> Verified:
    """Verify each row's drafts against the target's logits.

    logits: [N, V] float32, the target's raw logits at each row's 1 + d positions, rows back to back (N = sum of
    num_draft + 1), adjusted here (bias, suppressed ids); num_draft: [S] host; drafts: [S, kmax] int64 (-1 after a
    row's d); draft_probs: [S, kmax, V], the distribution q each draft was sampled from, or None for deterministic
    drafts (n-gram: q is one-hot) or rows that are all greedy. `accept_all` (DraftTargetDecodingConfig's benchmark
    switch): every draft is accepted whatever the target says, and the row's last token is the target's own next
    token after them (as after a genuine full acceptance), so the step does the work of one at 100% acceptance.
    """
    dev = logits.device
    num_rows = len(num_draft)
    kmax = drafts.shape[1]
    owner = np.repeat(np.arange(num_rows), num_draft + 1)  # [N]
    settings.adjust_(logits, owner)
    base = np.concatenate([[0], np.cumsum(num_draft + 1)[:-1]]).astype(np.int64)  # [S] each row's first position
    col = np.arange(kmax)
    valid_host = col[None, :] < num_draft[:, None]  # [S, kmax]
    judged_host = np.where(valid_host, base[:, None] + col[None, :], 0)  # the position that judges draft j
    valid, judged = torch.tensor(valid_host, device=dev), torch.tensor(judged_host, device=dev)
    safe_drafts = drafts.clamp(min=0)
    target_ids = logits.argmax(dim=-1)  # [N]
    accept = drafts == target_ids[judged]  # greedy rows: the draft is the target's own argmax
    own = torch.tensor(owner, dtype=torch.long, device=dev)
    first_index = settings.output_index.unsqueeze(1) + torch.arange(kmax, device=dev).unsqueeze(0)  # [S, kmax]
    p = None  # [N, V] the target's sampling distribution, where one chunk of rows holds it (else its rows on demand)
    if not settings.all_greedy:
        p, p_draft = _target_probs_at(settings, logits, own, judged, safe_drafts)  # p_draft [S, kmax]
        q_draft = (torch.ones_like(p_draft) if draft_probs is None
                   else draft_probs.gather(2, safe_drafts.unsqueeze(2)).squeeze(2))
        u = uniform(settings.seeds.unsqueeze(1).expand(-1, kmax), SALT_ACCEPT, first_index)
        sampled_accept = u * q_draft < p_draft  # u < p / q, without dividing
        accept = torch.where(settings.greedy.unsqueeze(1), accept, sampled_accept)
    if accept_all:
        accept = torch.ones_like(accept)
    accept &= valid
    accepted = accept.to(torch.int64).cumprod(dim=1).sum(dim=1)  # [S] leading accepted drafts
    base_t = torch.tensor(base, device=dev)
    final_pos = base_t + accepted  # [S] the position whose distribution gives the last token
    final = target_ids[final_pos]  # greedy rows: the target's argmax
    if not settings.all_greedy:
        d = torch.tensor(num_draft, device=dev)
        rejected = accepted < d
        # [S, V]: the filtering is row by row, so the final rows' own distribution equals those rows of p.
        p_final = p[final_pos] if p is not None else \
            settings.filtered(logits[final_pos], own[final_pos]).softmax(dim=-1)
        column = accepted.clamp(max=kmax - 1).unsqueeze(1)
        if draft_probs is None:  # one-hot q: the rejected draft's probability goes to the rest
            q_final = torch.zeros_like(p_final).scatter_(1, safe_drafts.gather(1, column), 1.0)
        else:
            q_final = draft_probs.gather(1, column.unsqueeze(2).expand(-1, -1, draft_probs.shape[2])).squeeze(1)
        residual = (p_final - q_final).clamp_(min=0)
        empty = residual.sum(dim=1, keepdim=True) <= 0  # p <= q everywhere (rounding): fall back to p
        residual = torch.where(empty, p_final, residual)
        corrected = gumbel_argmax(residual.log(), settings.seeds, SALT_RESIDUAL, settings.output_index + accepted)
        # Every draft accepted: the next token as a plain step samples it (same key: seed, sequence, output index).
        rows_logits = logits[final_pos]
        no_suppress = torch.zeros(num_rows + 1, dtype=torch.int32, device=dev)
        bonus = sample(rows_logits, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                       seeds=settings.seeds, output_index=settings.output_index + accepted,
                       suppress_offsets=no_suppress, suppress_ids=torch.zeros(0, dtype=torch.long, device=dev),
                       sample_index=settings.seq_index, min_p=settings.min_p if settings.any_min_p else None,
                       any_top_k_top_p=settings.any_filter)
        final = torch.where(settings.greedy, final, torch.where(rejected, corrected, bonus))
    out_cols = torch.arange(kmax + 1, device=dev).unsqueeze(0)  # [1, kmax + 1]
    tokens = torch.full((num_rows, kmax + 1), -1, dtype=torch.int64, device=dev)
    tokens[:, :kmax] = torch.where(out_cols[:, :kmax] < accepted.unsqueeze(1), drafts, tokens[:, :kmax])
    tokens.scatter_(1, accepted.unsqueeze(1), final.unsqueeze(1))
    positions = (base_t.unsqueeze(1) + out_cols).clamp(max=logits.shape[0] - 1)
    return Verified(tokens, accepted, positions)


__all__ = ["RowSettings", "Verified", "verify", "draft_tokens", "expand_csr", "uniform", "gumbel_argmax",
           "SALT_ACCEPT", "SALT_RESIDUAL"]
