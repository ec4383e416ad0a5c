"""CUDA graphs of the decode step (one rank's layers; the last stage's logits and greedy ids) for a ladder of
batch sizes, on padded inputs.

With tensor parallelism the layers' all-reduces and the head's all-gather (NCCL) are captured inside the graphs.
The ranks of a stage take part in each other's collectives, so they must replay the same graph at the same
step: every rank captures the same ladder (`graph_sizes`, from settings every rank shares), in the same order,
and picks a batch's graph (`graph_size`) from the batch alone, which every rank receives whole. A pipeline
stage captures its own layers; a stage after the first reads its input from a static hidden-state buffer.

`LLMAPI_DECODE_GRAPHS_ON_CPU=1` runs this path on the CPU with each "replay" an eager run over the same static,
padded buffers (the batch-size ladder, the padding, the ranks' agreement), so that CPU tests cover all of it but
the capture itself.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from ..layers.attention import AttentionMetadata
from .sampler import first_argmax
from .step_inputs import InputStager, IntLayout

logger = logging.getLogger(__name__)

GRAPHS_ON_CPU_ENV = "LLMAPI_DECODE_GRAPHS_ON_CPU"

# Batch sizes with a graph: a decode batch of R requests runs in the smallest one >= R.
# Small decode steps are bound by reading the weights: a few padded rows cost little there, and fewer graphs
# capture faster. Past a few hundred rows the FP8 / bf16 GEMMs are bound by their FLOPs instead, and a padded row
# costs what a real one does (885 requests in the 1,024 graph: 16% more GEMM work), so the ladder is finer there.
# No 448: on an H100 (FP8 128/2048) 440 requests ran 8% slower in a 448-row graph than in the 512-row one, where
# 300 in 320 rows, 600 in 640 and 880 in 896 each ran 2-5% faster than in the next coarser graph; at 448 rows the
# FP8 GEMM cuBLASLt picks for gate_up runs at half its neighbours' rate (bench_kernels --fp8-gemm).
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 320, 384, 512, 640, 768, 896, 1024, 1280, 1536,
                     1792, 2048)


def graphs_on_cpu() -> bool:
    """Whether the decode-graph path also runs on the CPU (eagerly; see the module docstring)."""
    return os.environ.get(GRAPHS_ON_CPU_ENV, "") == "1"


def graph_sizes(max_batch_size: int, batch_sizes: Optional[Sequence[int]] = None) -> List[int]:
    """The batch sizes that get a graph, smallest first: those of `batch_sizes` (default GRAPH_BATCH_SIZES) up to
    `max_batch_size`, or [1] when none is."""
    ladder = GRAPH_BATCH_SIZES if batch_sizes is None else sorted(set(int(s) for s in batch_sizes))
    return [s for s in ladder if s <= max_batch_size] or [1]


def graph_size(sizes: Sequence[int], max_blocks: int, num_requests: int, num_tokens: int, width: int) -> int:
    """The graph that runs a batch (R requests, T tokens, block tables `width` wide), or 0 when it runs eagerly:
    a prefill (T != R), more requests than the largest graph, or a block table wider than the graphs'."""
    if num_tokens != num_requests or num_requests > sizes[-1] or width > max_blocks:
        return 0
    return next(s for s in sizes if s >= num_requests)


class _EagerGraph:
    """The CPU stand-in of a captured graph: a replay runs the step again over the same static inputs and
    copies its outputs into the first run's tensors, as a replay overwrites a graph's outputs."""

    def __init__(self, step: Callable[[], tuple]):
        self.step = step
        self.outputs = step()

    def replay(self) -> None:
        for static, fresh in zip(self.outputs, self.step()):
            static.copy_(fresh)


class DecodeGraphs:
    """Captured decode steps. All graphs read one static input buffer, laid out per size as the stager packs it.

    `hidden`: (hidden size, dtype) of the previous stage's output, for a stage after the first; `last_stage`:
    the graphs end in logits and greedy ids (else in this stage's hidden states); `distributed`: other ranks
    run collectives meanwhile (captured in thread-local mode, so their threads' CUDA calls cannot break it).
    """

    def __init__(self, model, kv_caches: List[torch.Tensor], stager: InputStager, max_batch_size: int,
                 max_blocks: int, num_kv_heads: int, hidden: Optional[tuple[int, torch.dtype]] = None,
                 last_stage: bool = True, distributed: bool = False, adapters=None, max_cross_blocks: int = 0,
                 batch_sizes: Optional[Sequence[int]] = None):
        from llmapi._kernels.decode_attention import num_splits_for

        self.model, self.kv_caches, self.stager = model, kv_caches, stager
        self.last_stage = last_stage
        self.sizes = graph_sizes(max_batch_size, batch_sizes)
        largest = self.sizes[-1]
        device = kv_caches[0].device
        cuda = device.type == "cuda"
        self.max_blocks = max_blocks
        # Per size G, IntLayout(G, G, ...): ids, positions, slots, context_lens and query_start_loc, then
        # the step's compact block tables, which one copy spreads into the static [G, max_blocks]
        # table, then the placeholders (at most one per row).
        self.ints = torch.zeros(IntLayout(largest, largest, largest, max_blocks, largest).size, dtype=torch.int32,
                                device=device)
        self.block_tables = torch.zeros(largest, max_blocks, dtype=torch.int32, device=device)
        # [G, H]: the previous stage's output (received here), for a stage after the first.
        self.hidden_in = None if hidden is None else torch.zeros(largest, hidden[0], dtype=hidden[1], device=device)
        # [G]: each row's LoRA adapter slot (-1: none), a static input as the ids are (llmapi.lora.runtime).
        self.adapters = adapters
        self.adapter_slots = None if adapters is None else torch.full((largest,), -1, dtype=torch.int32,
                                                                      device=device)
        # Encoder-decoder models (max_cross_blocks > 0): each row's cross blocks and encoder length, static inputs
        # of the cross-attention (decode steps run no encoder).
        self.max_cross_blocks = max_cross_blocks
        if max_cross_blocks:
            self.cross_lens = torch.zeros(largest, dtype=torch.int32, device=device)
            self.cross_tables = torch.zeros(largest, max_cross_blocks, dtype=torch.int32, device=device)
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 0
        self.graphs, self.outputs, self.attn = {}, {}, {}
        pool = torch.cuda.graph_pool_handle() if cuda else None
        for size in reversed(self.sizes):  # largest first: the smaller ones reuse its memory pool
            splits = num_splits_for(size, num_kv_heads, max_blocks * stager.tokens_per_block, num_sms,
                                    quantized=kv_caches[0].element_size() == 1) if cuda else 0
            self.attn[size] = self._metadata(size, splits)
            self._reset(size)
            if not cuda:
                self.graphs[size] = _EagerGraph(lambda size=size: self._step(size))
                self.outputs[size] = self.graphs[size].outputs
                continue
            self._step(size)  # compiles the kernels (and, with several ranks, connects NCCL) outside the capture
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            mode = "thread_local" if distributed else "global"
            with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
                self.outputs[size] = self._step(size)
            self.graphs[size] = graph
        if cuda:
            torch.cuda.synchronize(device)
        logger.info("captured decode %s for batch sizes %s", "CUDA graphs" if cuda else "steps (CPU)", self.sizes)

    def _views(self, size: int):
        lay = IntLayout(size, size, 0, 0, 0)
        b = self.ints
        return lay.ids(b), lay.positions(b), lay.slots(b), lay.context_lens(b), lay.query_start_loc(b)

    def _metadata(self, size: int, splits: int) -> AttentionMetadata:
        _, _, slots, ctx, qsl = self._views(size)
        cross = None
        if self.max_cross_blocks:
            from ..layers.encdec_attention import CrossMetadata

            none = torch.zeros(0, dtype=torch.int32, device=ctx.device)
            cross = CrossMetadata(encoder_ids=none, encoder_positions=none, encoder_start_loc=none[:0],
                                  encoder_max_len=0, encoder_slot_mapping=none.long(),
                                  cross_lens=self.cross_lens[:size], cross_block_tables=self.cross_tables[:size],
                                  max_cross_len=self.max_cross_blocks * self.stager.tokens_per_block)
        return AttentionMetadata(
            slot_mapping=slots, query_lens=qsl[1:] - qsl[:-1], context_lens=ctx, query_start_loc=qsl,
            block_tables=self.block_tables[:size], max_query_len=1,
            max_context_len=self.max_blocks * self.stager.tokens_per_block,
            tokens_per_block=self.stager.tokens_per_block, num_kv_splits=splits, cross=cross)

    def _reset(self, size: int) -> None:
        """All rows padding (no KV write, empty context): what capture runs on."""
        ids, pos, slots, ctx, qsl = self._views(size)
        ids.zero_(), pos.zero_(), slots.fill_(-1), ctx.zero_()
        if self.adapter_slots is not None:
            self.adapter_slots.fill_(-1)
        if self.max_cross_blocks:
            self.cross_lens.zero_()
        qsl.copy_(torch.arange(size + 1, dtype=torch.int32, device=qsl.device))

    def _step(self, size: int) -> tuple:
        """(logits [G, V] in the model dtype, greedy ids [G]) on the last stage, else (hidden [G, H],)."""
        ids, pos, _, _, _ = self._views(size)
        hidden_in = None if self.hidden_in is None else self.hidden_in[:size]
        if self.adapters is not None:  # the slots' grouping is computed inside the graph
            self.adapters.begin(self.adapter_slots[:size])
        hidden = self.model(ids, pos, self.attn[size], self.kv_caches, hidden=hidden_in)  # [G, H]
        if not self.last_stage:
            return (hidden,)
        # Not widened to float32 here: the greedy argmax is the same on the model dtype's values (the widening
        # is exact), and a batch that samples widens its rows outside the graph.
        logits = self.model.compute_logits(hidden, float32=False)
        # What sample() returns for greedy rows without suppressed ids: the argmax.
        return logits, first_argmax(logits)

    def size_for(self, batch) -> int:
        """The graph size for this batch, or 0 when it must run eagerly (a prefill, or too large)."""
        tables = batch.block_tables
        if self.max_cross_blocks:  # an encoder-decoder step: none may start (run its encoder) or outgrow the graphs
            cross = np.asarray(batch.cross_block_tables)
            if len(batch.encoder_input_ids) or (cross.ndim == 2 and cross.shape[1] > self.max_cross_blocks):
                return 0
        return graph_size(self.sizes, self.max_blocks, int(batch.num_requests), int(batch.num_tokens),
                          tables.shape[1] if tables.ndim == 2 else 0)

    def hidden_input(self, num_tokens: int) -> torch.Tensor:  # [T, H]
        """Where the previous stage's output for the next replay goes (a stage after the first)."""
        return self.hidden_in[:num_tokens]

    def run(self, batch, size: int, prev_ids: Optional[torch.Tensor] = None):
        """Stage the batch into the static inputs (placeholders from `prev_ids`, the previous step's
        sampled ids, on the first stage) and replay. Returns static outputs, overwritten by the next replay:
        (logits [R, V] in the model dtype, argmax ids [R]) on the last stage, else hidden states [R, H]."""
        r = int(batch.num_requests)
        host, lay = self.stager.pack_ints(batch, pad_to=size)
        dev = self.stager.copy_ints(host, self.ints)
        if self.hidden_in is None:  # a later stage embeds nothing
            self.stager.fill_placeholders(dev, lay, prev_ids)
        self.block_tables[:r, :lay.width].copy_(lay.block_tables(dev))
        if self.adapter_slots is not None:
            slots = np.full(size, -1, dtype=np.int32)
            slots[:r] = np.asarray(batch.adapter_slots)
            self.adapter_slots[:size].copy_(torch.from_numpy(slots), non_blocking=True)
        if self.max_cross_blocks:
            lens = np.zeros(size, dtype=np.int32)
            lens[:r] = np.asarray(batch.cross_lens)
            self.cross_lens[:size].copy_(torch.from_numpy(lens), non_blocking=True)
            cross = np.asarray(batch.cross_block_tables, dtype=np.int32).reshape(r, -1)
            self.cross_tables[:r, :cross.shape[1]].copy_(torch.from_numpy(np.array(cross)), non_blocking=True)
        self.graphs[size].replay()
        outputs = self.outputs[size]
        if self.last_stage:
            return outputs[0][:r], outputs[1][:r]
        return outputs[0][:r]
