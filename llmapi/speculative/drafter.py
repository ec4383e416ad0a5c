"""Drafters that run in the model runner before the verify forward: a draft model, or an EAGLE head.

Both keep their KV in tensors of the target's number of blocks, addressed by the target's block tables and slots,
so the executor's one block manager serves both. After every target forward the drafter computes the same tokens
(`after_forward`: the same positions and slots; a verify step's drafts too, of which the accepted ones stay valid),
so its KV follows the target's computed tokens (the core's `sync_drafter`). Before a verify forward it catches up on
the positions from the request's `draft_start` (Batch.draft_start) to its last known token (Batch.draft_input_ids:
that one token for a draft model; for an EAGLE head the pair before it, whose next token was not known at its
forward), then drafts d tokens one at a time. Drafter KV only steers the drafts: the target verifies every token,
so a stale entry costs acceptance, never correctness.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from ..layers.attention import AttentionMetadata
from ..runtime.kv_cache import allocate_kv_caches, bytes_per_token
from .rejection import RowSettings, draft_tokens


def paged_metadata(tables: torch.Tensor, starts: np.ndarray, lengths: np.ndarray, tokens_per_block: int
                   ) -> Tuple[AttentionMetadata, torch.Tensor]:
    """Attention metadata for rows computing lengths[s] tokens from position starts[s] over their block tables
    `tables` [S, W] (device int32), and those tokens' positions [T] (int32)."""
    dev = tables.device
    B = tokens_per_block
    qsl = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    positions = (np.repeat(starts, lengths) + np.arange(qsl[-1]) - np.repeat(qsl[:-1], lengths)).astype(np.int64)
    pos = torch.tensor(positions, device=dev)
    slots = tables[torch.tensor(owner, device=dev), pos // B].long() * B + pos % B
    longer = np.flatnonzero(lengths != 1)
    context = starts + lengths
    qsl_t = torch.tensor(qsl, dtype=torch.int32, device=dev)
    attn = AttentionMetadata(
        slot_mapping=slots, query_lens=qsl_t[1:] - qsl_t[:-1],
        context_lens=torch.tensor(context, dtype=torch.int32, device=dev), query_start_loc=qsl_t,
        block_tables=tables, max_query_len=int(lengths.max()), max_context_len=int(context.max()),
        tokens_per_block=B, num_decodes=int(longer[0]) if len(longer) else 0)
    return attn, pos.to(torch.int32)


def catch_up_inputs(batch, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts [S], lengths [S], token ids [sum lengths]) of the drafter inputs of batch rows `rows`: the tokens at
    positions draft_start up to each row's last known token."""
    offsets = np.asarray(batch.draft_offsets)
    starts = np.asarray(batch.draft_start)[rows].astype(np.int64)
    lengths = (offsets[rows + 1] - offsets[rows]).astype(np.int64)
    if (starts < 0).any() or (lengths < 1).any():
        raise RuntimeError("a speculating row has no drafter inputs (Batch.draft_start / draft_offsets)")
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ids = np.asarray(batch.draft_input_ids)[np.repeat(offsets[rows], lengths) + within]
    return starts, lengths, ids


class _Drafting:
    """The chain of one step's drafts: row s drafts num_draft[s] tokens; column j proposes the token of output
    index output_index + j (the row's first verified position, its last known token, decides output_index)."""

    def __init__(self, settings: RowSettings, num_draft: np.ndarray, device):
        self.settings, self.num_draft = settings, num_draft
        self.kmax = int(num_draft.max())
        self.tokens = torch.full((len(num_draft), self.kmax), -1, dtype=torch.int64, device=device)
        self.probs: Optional[torch.Tensor] = None

    def pick(self, logits: torch.Tensor, active: np.ndarray, j: int) -> Tuple[torch.Tensor, np.ndarray]:
        """Column j's drafts of rows `active` from their drafter logits; returns (the tokens of the rows that draft
        column j + 1 too, those rows)."""
        tokens, q = draft_tokens(self.settings, logits, active, j)
        idx = torch.tensor(active, device=logits.device)
        self.tokens[idx, j] = tokens
        if q is not None:
            if self.probs is None:
                self.probs = torch.zeros(len(self.num_draft), self.kmax, q.shape[1], device=q.device)
            self.probs[idx, j] = q
        more = self.num_draft[active] > j + 1
        return tokens[torch.tensor(more, device=logits.device)], active[more]


class DraftModelDrafter:
    """A smaller model of the target's vocabulary (its own engine), run autoregressively for the drafts."""

    def __init__(self, model, engine_config: dict, device, dtype: torch.dtype, tokens_per_block: int):
        self.model, self.config = model, engine_config
        self.device, self.dtype, self.tokens_per_block = device, dtype, tokens_per_block
        self.kv_caches: List[torch.Tensor] = []

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.config, self.dtype, self.config["num_hidden_layers"])

    def allocate(self, num_blocks: int) -> None:
        self.kv_caches = []
        self.kv_caches = allocate_kv_caches(self.config, range(self.config["num_hidden_layers"]), num_blocks,
                                            self.tokens_per_block, self.device, self.dtype)

    def caches(self) -> List[torch.Tensor]:
        return self.kv_caches

    @torch.inference_mode()
    def after_forward(self, inputs, hidden) -> None:
        """The target's forward: the draft model computes the same tokens into its own cache (a prompt table's
        virtual token ids, past the vocabulary, go in as id 0: such requests never speculate)."""
        ids = inputs.input_ids.clamp(max=self.config["vocab_size"] - 1)
        self.model(ids, inputs.positions, inputs.attn, self.kv_caches)

    @torch.inference_mode()
    def propose(self, batch, inputs, settings: RowSettings, num_draft: np.ndarray):
        """Drafts [S, kmax] (-1 after a row's own count) and their distributions [S, kmax, V] (None when every row
        is greedy) of the speculating rows `settings.rows`."""
        rows = settings.rows
        starts, lengths, ids = catch_up_inputs(batch, rows)
        tables = inputs.attn.block_tables[torch.tensor(rows, device=self.device)]  # [S, W]
        attn, pos = paged_metadata(tables, starts, lengths, self.tokens_per_block)
        hidden = self.model(torch.tensor(ids, dtype=torch.int32, device=self.device), pos, attn, self.kv_caches)
        last = attn.query_start_loc[1:].long() - 1
        logits = self.model.compute_logits(hidden[last])  # [S, V]
        last_known = starts + lengths - 1  # [S] the position of each row's last known token
        chain = _Drafting(settings, num_draft, self.device)
        active = np.arange(len(rows))
        for j in range(chain.kmax):
            fed, active = chain.pick(logits, active, j)
            if len(active) == 0:
                break
            # Draft j goes in at the position after the last known token + j.
            idx = torch.tensor(active, device=self.device)
            attn, pos = paged_metadata(tables[idx], last_known[active] + j + 1, np.ones(len(active), np.int64),
                                       self.tokens_per_block)
            hidden = self.model(fed.to(torch.int32), pos, attn, self.kv_caches)
            logits = self.model.compute_logits(hidden)
        return chain.tokens, chain.probs


class EagleDrafter:
    """An EAGLE head over the target's hidden states, kept per KV slot (the target writes its last hidden state of
    every token it computes into `hidden_cache`), with the target's embeddings and LM head."""

    def __init__(self, head, target_model, device, dtype: torch.dtype, tokens_per_block: int):
        self.head, self.target = head, target_model
        self.device, self.dtype, self.tokens_per_block = device, dtype, tokens_per_block
        self.hidden_size = head.config["hidden_size"]
        self.kv_caches: List[torch.Tensor] = []
        self.hidden_cache: Optional[torch.Tensor] = None  # [num_blocks * B, H]

    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        cfg = self.head.config
        return self.hidden_size * elem + bytes_per_token(cfg, self.dtype, cfg["num_hidden_layers"])

    def allocate(self, num_blocks: int) -> None:
        cfg = self.head.config
        self.kv_caches, self.hidden_cache = [], None
        self.kv_caches = allocate_kv_caches(cfg, range(cfg["num_hidden_layers"]), num_blocks, self.tokens_per_block,
                                            self.device, self.dtype)
        self.hidden_cache = torch.zeros(num_blocks * self.tokens_per_block, self.hidden_size, dtype=self.dtype,
                                        device=self.device)

    def caches(self) -> List[torch.Tensor]:
        """Tensors whose dim 1 is the block (copy-on-write copies blocks of each): the head's KV and hidden cache."""
        hidden = self.hidden_cache.view(1, -1, self.tokens_per_block, self.hidden_size)
        return self.kv_caches + [hidden]

    @torch.inference_mode()
    def after_forward(self, inputs, hidden: torch.Tensor) -> None:
        """The target's forward: keep its last hidden state of each token at the token's slot, and run the head over
        the pairs (h_i, x_{i+1}) of the step's tokens, x_{i+1} the next input of the row (each row's last pair waits
        for its next token: the core counts it as not computed)."""
        slots = inputs.attn.slot_mapping.long()  # [T] (staged as int32)
        tokens = slots.shape[0]
        hidden = hidden[:tokens].to(self.dtype)
        self.hidden_cache.index_copy_(0, slots, hidden)
        # A row's last pair takes the next row's first token (counted as not computed); a prompt table's virtual
        # token ids, past the vocabulary, go in as 0 (such requests never speculate).
        following = torch.roll(inputs.input_ids[:tokens].long(), -1).clamp(max=self.head.config["vocab_size"] - 1)
        self.head(hidden, self._embed(following), inputs.positions[:tokens], inputs.attn, self.kv_caches)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        own = self.head.embed_tokens
        return (own if own is not None else self.target.transformer.vocab_embedding)(ids)

    @torch.inference_mode()
    def propose(self, batch, inputs, settings: RowSettings, num_draft: np.ndarray):
        """As DraftModelDrafter.propose. The head first reads the pairs (h_i, x_{i+1}) for i from draft_start to the
        last known token's position - 1 (the target's hidden states from the hidden cache); its output at the last
        pair gives the first draft, and each draft then goes in with the head's own output."""
        rows = settings.rows
        starts, lengths, ids = catch_up_inputs(batch, rows)
        pairs = lengths - 1  # tokens from draft_start to the last known one: that many pairs before it
        if (pairs < 1).any():
            raise RuntimeError("an EAGLE row has no pair to read before its last known token")
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        next_ids = ids[within > 0]  # x_{i+1} of each pair
        tables = inputs.attn.block_tables[torch.tensor(rows, device=self.device)]
        attn, pos = paged_metadata(tables, starts, pairs, self.tokens_per_block)
        hidden = self.hidden_cache[attn.slot_mapping.long()]  # the pairs' slots are those of their hidden states
        embeds = self._embed(torch.tensor(next_ids, dtype=torch.int64, device=self.device))
        feats = self.head(hidden, embeds, pos, attn, self.kv_caches)
        feats = feats[attn.query_start_loc[1:].long() - 1]  # [S, H]: stands for h at the last known token
        logits = self.target.compute_logits(feats)
        last_known = starts + lengths - 1
        chain = _Drafting(settings, num_draft, self.device)
        active = np.arange(len(rows))
        for j in range(chain.kmax):
            fed, nxt = chain.pick(logits, active, j)
            if len(nxt) == 0:
                break
            keep = torch.tensor(np.isin(active, nxt), device=self.device)
            idx = torch.tensor(nxt, device=self.device)
            # Pair (head output, draft j) at the position of the token the output stands for.
            attn, pos = paged_metadata(tables[idx], last_known[nxt] + j, np.ones(len(nxt), np.int64),
                                       self.tokens_per_block)
            feats = self.head(feats[keep], self._embed(fed), pos, attn, self.kv_caches)
            logits = self.target.compute_logits(feats)
            active = nxt
        return chain.tokens, chain.probs


__all__ = ["DraftModelDrafter", "EagleDrafter", "paged_metadata", "catch_up_inputs"]
