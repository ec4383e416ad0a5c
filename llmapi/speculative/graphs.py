"""CUDA graphs of n-gram speculation's verify steps: one target forward over every row's last known token and its
drafts, the greedy verification after it, captured for a ladder of batch sizes as the decode graphs are
(llmapi.runtime.cuda_graph).

A graph of G rows runs Q = max_draft_len + 1 token rows per request, request r's at r*Q ... r*Q + Q - 1: its last
known token, its d drafts, then Q - 1 - d pads. A pad writes no KV (slot -1), sits at its row's last real
position (never past the position tables), and its output is never read; the attention sees each request as Q
queries over context_lens + Q - 1 - d keys, which puts query j (j <= d) at its true position: the real tokens
attend to exactly the keys they attend to eagerly, and the keys behind the pads are read by the pads alone.

Verification inside the graph is greedy matching: the target's argmax at each position (of the model-dtype
logits, as the decode graphs' greedy ids), drafts accepted while they equal it, then the target's own token.
What the eager step (llmapi.speculative.step) does for these rows, bit for bit, is the same rule; the graphs
take only batches that need nothing else (see `applies`): every row greedy, no decode features (logprobs,
beams, bias, suppressed ids, forced tokens, ...), no placeholder ids, one rank, no adapters.

`LLMAPI_DECODE_GRAPHS_ON_CPU=1` runs them on the CPU as eager replays over the same static buffers.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..layers.attention import AttentionMetadata
from ..runtime.cuda_graph import _EagerGraph
from ..runtime.sampler import first_argmax

logger = logging.getLogger(__name__)

# Batch sizes with a verify graph (speculation pays at small batches; a larger batch runs eagerly).
VERIFY_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


class VerifyGraphs:
    """Captured verify steps of n-gram speculation for batch sizes up to `max_batch_size` (at most 32), each of
    max_draft_len + 1 token rows per request, over a block table `max_blocks` wide."""

    def __init__(self, model, kv_caches, tokens_per_block: int, max_batch_size: int, max_blocks: int,
                 max_draft_len: int):
        self.model, self.kv_caches = model, kv_caches
        self.tokens_per_block, self.max_blocks = tokens_per_block, max_blocks
        self.q = max_draft_len + 1
        self.sizes = [s for s in VERIFY_BATCH_SIZES if s <= max_batch_size] or [1]
        largest = self.sizes[-1]
        device = kv_caches[0].device
        cuda = device.type == "cuda"
        n = largest * self.q
        # Static inputs, sliced per size: [ids n | positions n | slots n | context lens G | drafts G | tables G*W].
        self._offsets = np.cumsum([0, n, n, n, largest, largest, largest * max_blocks])
        self.ints = torch.zeros(int(self._offsets[-1]), dtype=torch.int32, device=device)
        self.cols = torch.arange(self.q, device=device)
        self.replays = 0  # verify steps run through the graphs
        self.graphs, self.outputs, self.attn = {}, {}, {}
        pool = torch.cuda.graph_pool_handle() if cuda else None
        for size in reversed(self.sizes):  # largest first: the smaller ones reuse its memory pool
            self.attn[size] = self._metadata(size)
            self._reset(size)
            if not cuda:
                self.graphs[size] = _EagerGraph(lambda size=size: self._step(size))
                self.outputs[size] = self.graphs[size].outputs
                continue
            self._step(size)  # compiles the kernels outside the capture
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._step(size)
            self.graphs[size] = graph
        if cuda:
            torch.cuda.synchronize(device)
        logger.info("captured verify %s for batch sizes %s (%d tokens a request)",
                    "CUDA graphs" if cuda else "steps (CPU)", self.sizes, self.q)

    def _views(self, size: int, buffer=None):
        """(ids, positions, slots [size*Q], context lens, drafts [size], block tables [size, W]) of the static
        buffer, or of a host array laid out as it is."""
        o, b, n = self._offsets, self.ints if buffer is None else buffer, size * self.q
        return (b[o[0]:o[0] + n], b[o[1]:o[1] + n], b[o[2]:o[2] + n], b[o[3]:o[3] + size], b[o[4]:o[4] + size],
                b[o[5]:o[5] + size * self.max_blocks].reshape(size, self.max_blocks))

    def _metadata(self, size: int) -> AttentionMetadata:
        _, _, slots, ctx, _, tables = self._views(size)
        qsl = torch.arange(0, size * self.q + 1, self.q, dtype=torch.int32, device=ctx.device)
        return AttentionMetadata(
            slot_mapping=slots, query_lens=qsl[1:] - qsl[:-1], context_lens=ctx, query_start_loc=qsl,
            block_tables=tables, max_query_len=self.q, max_context_len=self.max_blocks * self.tokens_per_block,
            tokens_per_block=self.tokens_per_block)

    def _reset(self, size: int) -> None:
        """All rows padding (no KV write): what capture runs on."""
        ids, pos, slots, ctx, drafts, tables = self._views(size)
        ids.zero_(), pos.zero_(), slots.fill_(-1), ctx.fill_(self.q), drafts.zero_(), tables.zero_()

    def _step(self, size: int) -> tuple:
        """(tokens [G, Q] int32: each row's accepted drafts, then the target's token, -1 after,)."""
        ids, pos, _, _, drafts, _ = self._views(size)
        hidden = self.model(ids, pos, self.attn[size], self.kv_caches)  # [G*Q, H]
        target = first_argmax(self.model.compute_logits(hidden, float32=False)).view(size, self.q)  # [G, Q]
        row_ids = ids.view(size, self.q).long()
        k = self.q - 1
        accept = (row_ids[:, 1:] == target[:, :k]) & (self.cols[:k].unsqueeze(0) < drafts.unsqueeze(1))
        accepted = accept.to(torch.int32).cumprod(dim=1).sum(dim=1, keepdim=True)  # [G, 1]
        tokens = torch.where(self.cols.unsqueeze(0) <= accepted, target, -1)  # accepted drafts equal the target's
        return (tokens.to(torch.int32),)

    # ---------------------------------------------------------------- steps
    def size_for(self, batch) -> int:
        """The graph for this batch (host arrays), or 0: more rows than the largest graph, a row with more than
        Q tokens (a prefill chunk), or a context that outgrows the block tables with its pads."""
        r = int(batch.num_requests)
        if r > self.sizes[-1]:
            return 0
        q_lens = np.asarray(batch.query_lens)
        if (q_lens > self.q).any() or (q_lens != np.asarray(batch.num_draft_tokens) + 1).any():
            return 0
        tables = np.asarray(batch.block_tables)
        if tables.ndim != 2 or tables.shape[1] > self.max_blocks:
            return 0
        if (np.asarray(batch.context_lens) + self.q - q_lens).max() > self.max_blocks * self.tokens_per_block:
            return 0
        return next(s for s in self.sizes if s >= r)

    def run(self, batch, size: int) -> torch.Tensor:
        """Stage the batch into the static inputs (padded as the module docstring says) and replay: the step's
        tokens [R, Q] int32 (a copy: the next replay overwrites the graph's)."""
        r, q = int(batch.num_requests), self.q
        q_lens = np.asarray(batch.query_lens)
        host = np.zeros(len(self.ints), dtype=np.int32)  # only this size's sections are read
        ids, pos, slots, ctx, drafts, tables = self._views(size, host)
        starts = np.concatenate([[0], np.cumsum(q_lens)[:-1]])  # each row's first token in the batch
        col = np.arange(q)[None, :]  # [1, Q]
        real = col < q_lens[:, None]  # [R, Q]
        src = np.where(real, starts[:, None] + col, (starts + q_lens - 1)[:, None])  # pads repeat the last token
        ids2, pos2, slots2 = ids.reshape(size, q), pos.reshape(size, q), slots.reshape(size, q)
        ids2[:r] = np.asarray(batch.input_ids)[src]
        pos2[:r] = np.asarray(batch.positions)[src]
        slots2[:r] = np.where(real, np.asarray(batch.slot_mapping)[src], -1)
        slots2[r:] = -1
        ctx[:r] = np.asarray(batch.context_lens) + q - q_lens
        ctx[r:] = q
        drafts[:r] = np.asarray(batch.num_draft_tokens)
        block_tables = np.asarray(batch.block_tables)
        tables[:r, :block_tables.shape[1]] = block_tables
        self.ints.copy_(torch.from_numpy(host), non_blocking=True)
        self.graphs[size].replay()
        self.replays += 1
        return self.outputs[size][0][:r].clone()


def applies(runner, batch) -> bool:
    """Whether a speculative batch can run in a verify graph: every row greedy with nothing else to decode
    (no logprobs, beams, bias, suppressed ids, forced tokens, ...) and no token filled in from a step in flight
    (host arrays only)."""
    return (not runner.needs_decode(batch) and len(batch.suppress_ids) == 0 and runner.stager.all_greedy(batch)
            and not (np.asarray(batch.prev_rows) >= 0).any())


__all__ = ["VerifyGraphs", "applies", "VERIFY_BATCH_SIZES"]
