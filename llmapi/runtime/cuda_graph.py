"""CUDA graphs of the decode step (forward, logits, greedy ids) for a ladder of batch sizes, on padded inputs."""

from __future__ import annotations

import logging
from typing import List, Optional

import torch

from ..layers.attention import AttentionMetadata
from .sampler import first_argmax
from .step_inputs import InputStager, IntLayout

logger = logging.getLogger(__name__)

# Batch sizes with a graph: a decode batch of R requests runs in the smallest one >= R.
# Decode steps are bound by reading the weights: a few padded rows cost little, and fewer graphs capture faster.
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


class DecodeGraphs:
    """Captured decode steps. All graphs read one static input buffer, laid out per size as the stager packs it."""

    def __init__(self, model, kv_caches: List[torch.Tensor], stager: InputStager, max_batch_size: int,
                 max_blocks: int, num_kv_heads: int):
        from llmapi._kernels.decode_attention import num_splits_for

        self.model, self.kv_caches, self.stager = model, kv_caches, stager
        self.sizes = [s for s in GRAPH_BATCH_SIZES if s <= max_batch_size] or [1]
        largest = self.sizes[-1]
        device = kv_caches[0].device
        self.max_blocks = max_blocks
        # Per size G, IntLayout(G, G, ...): ids, positions, slots, context_lens and query_start_loc, then
        # the step's compact block tables, which one copy spreads into the static [G, max_blocks]
        # table, then the placeholders (at most one per row).
        self.ints = torch.zeros(IntLayout(largest, largest, largest, max_blocks, largest).size, dtype=torch.int32,
                                device=device)
        self.block_tables = torch.zeros(largest, max_blocks, dtype=torch.int32, device=device)
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.graphs, self.logits, self.greedy_ids, self.attn = {}, {}, {}, {}
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first: the smaller ones reuse its memory pool
            splits = num_splits_for(size, num_kv_heads, max_blocks * stager.tokens_per_block, num_sms)
            self.attn[size] = self._metadata(size, splits)
            self._reset(size)
            self._forward(size)  # compiles the kernels outside the capture
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._forward(size)
                # What sample() returns for greedy rows without suppressed ids: the argmax.
                self.greedy_ids[size] = first_argmax(self.logits[size])
            self.graphs[size] = graph
        torch.cuda.synchronize(device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def _views(self, size: int):
        lay = IntLayout(size, size, 0, 0, 0)
        b = self.ints
        return lay.ids(b), lay.positions(b), lay.slots(b), lay.context_lens(b), lay.query_start_loc(b)

    def _metadata(self, size: int, splits: int) -> AttentionMetadata:
        _, _, slots, ctx, qsl = self._views(size)
        return AttentionMetadata(
            slot_mapping=slots, query_lens=qsl[1:] - qsl[:-1], context_lens=ctx, query_start_loc=qsl,
            block_tables=self.block_tables[:size], max_query_len=1,
            max_context_len=self.max_blocks * self.stager.tokens_per_block,
            tokens_per_block=self.stager.tokens_per_block, num_kv_splits=splits)

    def _reset(self, size: int) -> None:
        """All rows padding (no KV write, empty context): what capture runs on."""
        ids, pos, slots, ctx, qsl = self._views(size)
        ids.zero_(), pos.zero_(), slots.fill_(-1), ctx.zero_()
        qsl.copy_(torch.arange(size + 1, dtype=torch.int32, device=qsl.device))

    def _forward(self, size: int) -> torch.Tensor:  # [G, V] in the model dtype
        ids, pos, _, _, _ = self._views(size)
        hidden = self.model(ids, pos, self.attn[size], self.kv_caches)  # [G, H]
        # Not widened to float32 here: the greedy argmax is the same on the model dtype's values (the widening
        # is exact), and a batch that samples widens its rows outside the graph.
        return self.model.compute_logits(hidden, float32=False)

    def size_for(self, batch) -> int:
        """The graph size for this batch, or 0 when it must run eagerly (a prefill, or too large)."""
        r = int(batch.num_requests)
        if int(batch.num_tokens) != r or r > self.sizes[-1] or batch.block_tables.shape[1] > self.max_blocks:
            return 0
        return next(s for s in self.sizes if s >= r)

    def run(self, batch, size: int, prev_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage the batch into the static inputs (placeholders from `prev_ids`, the previous step's
        sampled ids) and replay; returns (logits [R, V] in the model dtype, argmax ids [R]), static outputs."""
        r = int(batch.num_requests)
        host, lay = self.stager.pack_ints(batch, pad_to=size)
        dev = self.stager.copy_ints(host, self.ints)
        self.stager.fill_placeholders(dev, lay, prev_ids)
        self.block_tables[:r, :lay.width].copy_(lay.block_tables(dev))
        self.graphs[size].replay()
        return self.logits[size][:r], self.greedy_ids[size][:r]
