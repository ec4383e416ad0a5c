"""ModelRunner: one rank's model, KV cache and sampler; runs the executor's packed batches."""

from __future__ import annotations

import logging
import os
import threading
import time
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .._kernels.kv_quant import as_bytes
from ..config import KvCacheConfig
from ..distributed.mapping import Mapping, local_kv_heads
from ..distributed.sharding import build_rank_model, load_rank_model
from ..engine.format import rank_file
from ..errors import LLMAPIError
from ..layers.linear import one_token_gemv, use_triton_gemv
from ..quantization.kv_cache import check_kv_cache_device, kv_cache_dtype
from .decode import StepOutput, decode
from .kv_cache import allocate_kv_caches, num_kv_blocks
from .logits_records import LogitsRecords, generation_rows, prompt_chunks
from .request_state import RequestState
from .sampler import first_argmax, sample
from .step_inputs import InputStager, StepInputs

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


class _Step:
    """A submitted step: its sampled ids on the way to a host buffer, and the event that marks their arrival."""

    def __init__(self, host_ids: torch.Tensor, event):
        self.host_ids, self.event = host_ids, event


class StepStats:
    """Where the runner's time goes: steps (captured or eager), host time in submit, waits in collect."""

    def __init__(self):
        self.steps = self.graph_steps = self.tokens = 0
        self.submit_s = self.wait_s = 0.0
        # Of submit_s: the steps that ran eagerly, and the longest single submit (a kernel compiling mid-run
        # shows there: a second or more, where a step's launches take milliseconds).
        self.eager_submit_s = self.max_submit_s = 0.0

    def as_dict(self) -> dict:
        return dict(vars(self))


def profile_query_lens(num_tokens: int, num_rows: int, max_len: int) -> np.ndarray:
    """The query lengths [R] of the largest step the scheduler can form: `num_tokens` tokens (max_num_tokens, and
    never more than `num_rows` requests of `max_len` hold) over `num_rows` requests (max_batch_size, and never more
    than the tokens): single tokens first, as decode rows come, then the fewest prompts of at most `max_len`
    tokens (the LLM's max_seq_len) that take the rest, evenly."""
    num_rows = max(1, min(num_rows, num_tokens))
    num_tokens = min(num_tokens, num_rows * max_len)
    prompts = 1
    while num_rows - prompts + prompts * max_len < num_tokens:
        prompts += 1
    decodes = num_rows - prompts
    rest = num_tokens - decodes
    lens = [rest // prompts + (i < rest % prompts) for i in range(prompts)]
    return np.array([1] * decodes + lens, np.int32)


def _block_tables(blocks: np.ndarray, first: int) -> tuple[np.ndarray, int]:
    """Block tables [R, max blocks] (padded with 0) for rows of `blocks` [R] blocks each, numbered from `first` on;
    and the next free block."""
    tables = np.zeros((len(blocks), max(int(blocks.max()), 1)), np.int32)
    starts = first + np.concatenate([[0], np.cumsum(blocks)])
    for r in range(len(blocks)):
        tables[r, :blocks[r]] = np.arange(starts[r], starts[r + 1])
    return tables, int(starts[-1])


def _slots(tables: np.ndarray, rows: np.ndarray, positions: np.ndarray, tokens_per_block: int) -> np.ndarray:
    """[N] int64 cache slots of tokens at `positions` of the rows `rows` of `tables`."""
    return tables[rows, positions // tokens_per_block].astype(np.int64) * tokens_per_block + \
        positions % tokens_per_block


class ModelRunner:
    """The executor calls `submit(batch)` then `collect(handle)` from its loop thread.

    `submit` stages the inputs (one host-to-device copy per buffer), runs the forward (a captured
    CUDA graph for decode batches on CUDA) and the sampler, and starts the one device-to-host copy
    of the sampled ids; `collect` waits for that copy. A batch that uses a decoding feature beyond
    sampling (n / best_of forks, beams, logprobs, penalties, min_p, logit bias, Python logits
    processors, prompt logprobs or logits outputs) runs eagerly through `decode`, and `collect` then
    returns a StepOutput. Two steps may be in flight (async scheduling): a batch's placeholder
    input ids (Batch.prev_rows) are the ids the step submitted before it samples, filled in on the
    device from `_prev_ids` before its forward or graph replay. `logits_processors` maps a request
    id to its Python logits processor (set by the LLM before it enqueues the request); `records`
    keeps the prompt logprobs and logits outputs.

    With several ranks (`mapping`, `comm`: see llmapi.distributed) each rank holds its shard, and the
    rank's driver (llmapi.distributed.rank_worker) calls copy_blocks, the stager, forward / logits / sample or
    decode_step, or the decode graphs (capture_graphs: its stage's layers, collectives inside) itself; the
    sampling rank's `logits_processors` and `state` serve decode_step there.
    """

    def __init__(self, engine_dir: str, engine_config: dict, device: torch.device,
                 kv_cache_config: KvCacheConfig, tokens_per_block: int, load_format: str = "auto",
                 max_batch_size: int = 1024, cuda_graphs: bool = True,
                 mapping: Optional[Mapping] = None, comm=None, speculative=None, adapters: Optional[dict] = None,
                 attn_backend: str = "triton", cuda_graph_batch_sizes: Optional[Sequence[int]] = None,
                 max_num_tokens: int = 0, max_seq_len: int = 0, verify_logits: Optional[bool] = None,
                 max_encoder_input_len: int = 0):
        started = time.perf_counter()
        self.config = engine_config
        self.device = device
        self.dtype = torch_dtype(engine_config["dtype"])
        check_kv_cache_device(engine_config, device)
        self.kv_dtype = kv_cache_dtype(engine_config, self.dtype)  # int8 / float8 for a quantized KV cache
        self.tokens_per_block = tokens_per_block
        self.mapping = mapping or Mapping()
        self.model = build_rank_model(engine_config, self.mapping, device, self.dtype, comm)
        # Dummy weights are drawn where they are used: an 8B model's weights take minutes to draw on a CPU.
        dummy = load_format == "dummy" and not os.path.exists(os.path.join(engine_dir, rank_file(self.mapping.rank)))
        load_rank_model(self.model, engine_dir, self.mapping.rank, dummy, engine_config, self.dtype, device)
        # LoRA slots and prompt tables (llmapi.lora.runtime), wrapped around the loaded model before the cache is
        # sized: their device buffers come first.
        self.adapters = None
        if adapters:
            from ..lora.runtime import RunnerAdapters

            self.adapters = RunnerAdapters(self.model, engine_config, adapters, device, self.dtype)
        # Speculative decoding (llmapi.speculative.setup.SpeculativeSetup): its drafter's weights load before the
        # cache is sized, and its KV (EAGLE: also the target's hidden states) lies in the same blocks.
        self.spec = None if speculative is None else speculative.build(self.model, device, self.dtype,
                                                                        tokens_per_block)
        if self.mapping.world_size == 1:  # an odd vocabulary's head in aligned rows (a sharded head stays as it is)
            self.model.align_head()
        if kv_cache_config.use_fp8_context_fmha:
            from ..layers.attention import enable_fp8_context_fmha

            enable_fp8_context_fmha(self.model, self.kv_dtype, device)
        if attn_backend != "triton":
            from ..layers.attention import set_attn_backend

            set_attn_backend(self.model, attn_backend, self.dtype, device, kv_cache_config.use_fp8_context_fmha)
        # LLMAPI_ONE_TOKEN_GEMV (checked on every device): on a GPU, bs 1 linears through the Triton GEMV.
        if one_token_gemv() == "triton" and device.type == "cuda":
            logger.info("one-token GEMV: Triton, %d linears", use_triton_gemv(self.model))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the loaded copies' memory goes back before the KV cache is sized
        logger.info("weights loaded in %.2f s", time.perf_counter() - started)
        self.layers = self.mapping.stage_layers(engine_config["num_hidden_layers"])
        self.kv_heads = local_kv_heads(engine_config["num_key_value_heads"], self.mapping.tp_size)
        self.kv_caches: List[torch.Tensor] = []
        self.encoder_decoder = bool(engine_config.get("is_encoder_decoder"))
        # Encoder-decoder decode graphs hold each row's cross blocks, up to the longest encoder input's.
        self.max_cross_blocks = -(-int(engine_config.get("max_encoder_input_len") or 1024) // tokens_per_block) \
            if self.encoder_decoder else 0
        self.stager = InputStager(device, tokens_per_block, encoder_decoder=self.encoder_decoder)
        # On a GPU the cache gets its fraction of what is free after the largest step (KvCacheConfig).
        self.step_peak_bytes = 0
        # Whether steps verify drafts (every token's logits): the same on every rank of a stage, for the head's
        # all-gather, also where only the sampling rank holds the drafter (`speculative` None on the others).
        self._verify_logits = speculative is not None if verify_logits is None else verify_logits
        if device.type == "cuda" and max_num_tokens > 0:
            self.step_peak_bytes = self._profile_step(max_num_tokens, max_batch_size, max_seq_len,
                                                      max_encoder_input_len)
        self.num_blocks = num_kv_blocks(engine_config, kv_cache_config, device, self.kv_dtype,
                                        tokens_per_block, len(self.layers), self.kv_heads,
                                        extra_bytes_per_token=0 if self.spec is None else
                                        self.spec.extra_bytes_per_token, step_peak_bytes=self.step_peak_bytes)
        self.allocate_kv_caches(self.num_blocks)
        self.state = RequestState(engine_config["vocab_size"], device)
        self.logits_processors: Dict[int, Callable] = {}
        self.records = LogitsRecords()
        self.stats = StepStats()
        # The step watchdog's marks (llmapi.runtime.watchdog.RunnerProbe): when the current submit or collect
        # began (monotonic seconds; 0.0 between calls), and the executor's loop thread that calls them.
        self.call_started = 0.0
        self.loop_thread: Optional[int] = None
        self.graphs = None
        self.cuda_graph_batch_sizes = cuda_graph_batch_sizes  # None: the default ladder (runtime.cuda_graph)
        # The last submitted step's sampled ids [R] on the device: the next step's placeholders
        # (Batch.prev_rows) are filled from them there, without waiting for the step.
        self._prev_ids: Optional[torch.Tensor] = None
        # With several ranks the driver captures once the ranks agree on the cache size (graphs hold its address).
        if self.spec is not None and self.spec.needs_every_forward:
            cuda_graphs = False  # a drafter follows every forward (decode graphs would skip it)
        if cuda_graphs and self.mapping.world_size == 1 and self.graphs_supported:
            self.capture_graphs(max_batch_size)

    @property
    def graphs_supported(self) -> bool:
        """Decode steps run as CUDA graphs on CUDA (and as their eager stand-in on the CPU, when asked)."""
        from .cuda_graph import graphs_on_cpu

        return self.device.type == "cuda" or graphs_on_cpu()

    def capture_graphs(self, max_batch_size: int) -> None:
        """Capture the decode graphs of this rank's layers (its pipeline stage's), for batch sizes (those of
        `cuda_graph_batch_sizes`, else the default ladder) up to `max_batch_size`, and never more than the cache's
        blocks (each running sequence holds one at least: a larger decode batch cannot happen, and its graph's
        memory would be wasted); with tensor parallelism every rank of the stage must call this at once (they hold
        the same number of blocks and sizes)."""
        from .cuda_graph import DecodeGraphs

        max_batch_size = min(max_batch_size, self.num_blocks)
        m = self.mapping
        max_blocks = -(-self.config["max_position_embeddings"] // self.tokens_per_block)
        hidden = None if m.is_first_stage else (self.config["hidden_size"], self.dtype)
        captured = time.perf_counter()
        self.graphs = None  # a new capture's memory comes after the old graphs are gone
        try:
            with torch.inference_mode():
                self.graphs = DecodeGraphs(self.model, self.kv_caches, self.stager, max_batch_size, max_blocks,
                                           self.kv_heads, hidden=hidden, last_stage=m.is_last_stage,
                                           distributed=m.world_size > 1, adapters=self.adapters,
                                           max_cross_blocks=self.max_cross_blocks,
                                           batch_sizes=self.cuda_graph_batch_sizes)
                if self.spec is not None and m.world_size == 1 and self.adapters is None:
                    self.spec.capture_graphs(self.model, self.kv_caches, self.tokens_per_block, max_batch_size,
                                             max_blocks)
        except torch.OutOfMemoryError as e:
            self.graphs = None
            raise LLMAPIError(f"the decode CUDA graphs (up to {max_batch_size} rows) do not fit in what the KV cache "
                              "leaves: lower kv_cache_config.free_gpu_memory_fraction, max_batch_size or "
                              "cuda_graph_batch_sizes") from e
        logger.info("decode graphs captured in %.2f s", time.perf_counter() - captured)

    @torch.inference_mode()
    def _profile_step(self, num_tokens: int, num_rows: int, max_seq_len: int = 0,
                      max_encoder_input_len: int = 0) -> int:
        """Before the cache is allocated: run the largest step the scheduler can form (_profile_batch) on a cache of
        just its blocks, and return the device memory it took at its peak beyond what it leaves allocated (bytes;
        CUDA's allocator counts them, 0 elsewhere).

        On the last pipeline stage the step ends in every row's float32 logits (with speculative decoding every
        token's, as a verify step has) and a top-k / top-p draw of each, the costliest sampling. Not in it: prompt
        logprobs and context logits, which take the logits of every prompt position of the requests that ask, and a
        sampled verify step's [rows, vocabulary] distributions (the target's and the residual at each row's final
        position, a draft model's at each draft). With several ranks every rank of a stage calls it at once (the
        collectives); a stage after the first takes zeros for its input."""
        batch, blocks = self._profile_batch(num_tokens, num_rows, max_seq_len, max_encoder_input_len)
        num_tokens, num_rows = batch.num_tokens, batch.num_requests
        cuda = self.device.type == "cuda"
        self.allocate_kv_caches(blocks)
        try:
            if cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            inputs = self.stager.stage(batch)
            m = self.mapping
            hidden = None if m.is_first_stage else \
                torch.zeros(num_tokens, self.config["hidden_size"], dtype=self.dtype, device=self.device)
            hidden = self.forward(inputs, hidden)
            if m.is_last_stage:
                # A speculative verify step takes every token's logits (each row's 1 + k), others each row's last.
                logits = self.model.compute_logits(hidden, float32=True) if self._verify_logits else \
                    self.logits(inputs, hidden)  # [N, V] float32
                n, dev = logits.shape[0], self.device
                sample(logits, temperature=torch.ones(n, device=dev), top_k=torch.full((n,), 50, device=dev),
                       top_p=torch.full((n,), 0.9, device=dev), seeds=torch.arange(n, device=dev),
                       output_index=torch.zeros(n, dtype=torch.int32, device=dev),
                       suppress_offsets=torch.zeros(n + 1, dtype=torch.int32, device=dev),
                       suppress_ids=torch.zeros(0, dtype=torch.int32, device=dev))
                del logits
            del inputs, hidden
            if not cuda:
                return 0
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
        except torch.OutOfMemoryError as e:
            raise LLMAPIError(f"the largest step ({num_tokens} tokens over {num_rows} requests, with their logits) "
                              "does not fit in the GPU memory left after the weights: lower max_num_tokens or "
                              "max_batch_size") from e
        finally:
            self.kv_caches = []
            if self.spec is not None:
                self.spec.allocate(0)
            if cuda:
                torch.cuda.empty_cache()
        logger.info("profile step: %d tokens over %d requests took %.2f GiB at its peak", num_tokens, num_rows,
                    peak / 2**30)
        return int(peak)

    def _profile_batch(self, num_tokens: int, num_rows: int, max_seq_len: int,
                       max_encoder_input_len: int) -> tuple[SimpleNamespace, int]:
        """The profile step's batch (the fields of a Batch that staging reads) and the blocks it takes: decode rows
        and prompts (profile_query_lens) of at most `max_seq_len` tokens (0: the model's positions), every request
        sampled with top-k and top-p; for an encoder-decoder model, decoding rows (one token over one cross key) and
        starting rows (an encoder input of at most `max_encoder_input_len` tokens, 0: the model's, in the step's
        budget, with one decoder token)."""
        cfg = self.config
        tpb = self.tokens_per_block
        if self.encoder_decoder:
            max_encoder = min(max_encoder_input_len or int(cfg.get("max_encoder_input_len") or 1024),
                              num_tokens - 1)
            lens = profile_query_lens(num_tokens, num_rows, max_encoder + 1)
            encoder_lens = np.where(lens > 1, lens - 1, 0).astype(np.int32)
            query_lens, cross_lens = np.ones(len(lens), np.int32), np.maximum(encoder_lens, 1)
        else:
            max_len = int(cfg["max_position_embeddings"])
            if max_seq_len:  # a prompt is never longer than the LLM's max_seq_len
                max_len = min(max_len, max_seq_len)
            query_lens = profile_query_lens(num_tokens, num_rows, max_len)
        num_tokens, num_rows = int(query_lens.sum()), len(query_lens)
        tables, used = _block_tables(-(-query_lens // tpb), 0)
        positions = np.concatenate([np.arange(q) for q in query_lens]).astype(np.int32)
        rows = np.repeat(np.arange(num_rows), query_lens)
        batch = SimpleNamespace(
            num_tokens=num_tokens, num_requests=num_rows, input_ids=(np.arange(num_tokens) % cfg["vocab_size"])
            .astype(np.int32), positions=positions, slot_mapping=_slots(tables, rows, positions, tpb),
            query_lens=query_lens, context_lens=query_lens.copy(), block_tables=tables,
            prev_rows=np.full(num_tokens, -1, np.int32), seeds=np.arange(num_rows, dtype=np.int64),
            top_k=np.full(num_rows, 50, np.int32), output_index=np.zeros(num_rows, np.int32),
            suppress_offsets=np.zeros(num_rows + 1, np.int32), suppress_ids=np.zeros(0, np.int32),
            temperature=np.ones(num_rows, np.float32), top_p=np.full(num_rows, 0.9, np.float32))
        if self.encoder_decoder:
            cross_tables, used = _block_tables(-(-cross_lens // tpb), used)
            encoder_positions = np.concatenate([np.arange(n) for n in encoder_lens]).astype(np.int32)
            encoder_rows = np.repeat(np.arange(num_rows), encoder_lens)
            batch.encoder_lens, batch.cross_lens, batch.cross_block_tables = encoder_lens, cross_lens, cross_tables
            batch.encoder_input_ids = (np.arange(len(encoder_rows)) % cfg["encoder"]["vocab_size"]).astype(np.int32)
            batch.cross_slot_mapping = _slots(cross_tables, encoder_rows, encoder_positions, tpb)
        return batch, used

    def allocate_kv_caches(self, num_blocks: int) -> None:
        """(Re)allocate the cache of this rank's layers with `num_blocks` blocks (ranks agree on the smallest)."""
        self.num_blocks = num_blocks
        self.kv_caches = []  # the old cache goes first
        self.kv_caches = allocate_kv_caches(self.config, self.layers, num_blocks, self.tokens_per_block,
                                            self.device, self.kv_dtype, self.kv_heads)
        if self.spec is not None:
            self.spec.allocate(num_blocks)

    def queue_adapter(self, install) -> None:
        """From any thread: an adapter (llmapi.lora.runtime.AdapterInstall) to put in its device slot before the
        next step."""
        self.adapters.queue(install)

    @torch.inference_mode()
    def copy_blocks(self, copies: np.ndarray) -> None:
        """Copy-on-write of shared blocks: every layer's K and V of block src -> dst ([C, 2])."""
        if len(copies) == 0:
            return
        src = torch.tensor(copies[:, 0], dtype=torch.long, device=self.device)
        dst = torch.tensor(copies[:, 1], dtype=torch.long, device=self.device)
        drafter = [] if self.spec is None else self.spec.caches()
        for cache in self.kv_caches + drafter:  # [2, num_blocks, block, kv_heads, head_dim]
            cache = as_bytes(cache)  # a float8 cache is copied as bytes: some CPU index kernels lack float8
            cache[:, dst] = cache[:, src]

    @staticmethod
    def needs_decode(batch) -> bool:
        """Whether the batch uses a decoding feature beyond sample() (all host arrays: no device sync)."""
        def any_(name, test):
            return bool(test(np.asarray(getattr(batch, name))).any())
        return (len(batch.bias_ids) > 0 or any_("slots", lambda a: a >= 0)
                or any_("num_candidates", lambda a: a > 1) or any_("beam", lambda a: a != 0)
                or any_("logprobs", lambda a: a >= 0) or any_("min_p", lambda a: a > 0)
                or any_("prompt_logprobs", lambda a: a >= 0) or any_("context_logits", lambda a: a != 0)
                or any_("generation_logits", lambda a: a != 0)
                or any_("forced_token_ids", lambda a: a >= 0))

    @staticmethod
    def needs_prompt_rows(batch) -> bool:
        """Whether the batch asks for prompt logprobs or context logits (they need the step's hidden states)."""
        return bool((np.asarray(batch.prompt_logprobs) >= 0).any() or (np.asarray(batch.context_logits) != 0).any())

    @torch.inference_mode()
    def submit(self, batch):
        started = time.perf_counter()
        self.loop_thread, self.call_started = threading.get_ident(), time.monotonic()
        stats = self.stats
        graph_steps = stats.graph_steps
        try:
            step = self._submit(batch)
        finally:
            self.call_started = 0.0
        took = time.perf_counter() - started
        stats.steps, stats.tokens = stats.steps + 1, stats.tokens + int(batch.num_tokens)
        stats.submit_s += took
        stats.max_submit_s = max(stats.max_submit_s, took)
        if stats.graph_steps == graph_steps:
            stats.eager_submit_s += took
        return step

    def _submit(self, batch):
        if self.adapters is not None:
            self.adapters.apply_pending()  # adapters the user's side installed since the last step
        self.copy_blocks(np.asarray(batch.block_copies))
        self.stager.next_step()
        # Kept until this step succeeds: the executor's placeholders refer to the last step whose
        # submit succeeded.
        prev_ids = self._prev_ids
        if self.spec is not None and self.spec.handles(batch):  # draft tokens to verify
            handle = self.spec.submit(self, batch, prev_ids)
            self._prev_ids = handle.outputs["tokens"][:, 0]
            return handle
        size = self.graphs.size_for(batch) if self.graphs is not None else 0
        if self.needs_decode(batch):
            if size and not self.needs_prompt_rows(batch):
                # A decode batch (one token a row) with decoding features (logprobs, beams, penalties, grammars,
                # forced tokens, ...): the graph's logits, then decode() as after an eager forward.
                self.stats.graph_steps += 1
                logits, _ = self.graphs.run(batch, size, prev_ids)  # [R, V] model dtype, static
                logits = logits.to(torch.float32, copy=True)  # its own copy: decode() writes into it
                generation = generation_rows(batch, logits)
                out = decode(logits, batch, self.state, self.logits_processors)
                self.records.add([], generation)
            else:
                inputs = self.stager.stage(batch, prev_ids=prev_ids)
                out, prompt, generation = self.decode_step(batch, inputs, self.forward(inputs))
                self.records.add(prompt, generation)
            self._prev_ids = out["tokens"][:, 0]  # [R]: the next step's placeholders read column 0
            return out
        self.stats.graph_steps += bool(size)
        # What sample() gives greedy rows with nothing suppressed: the argmax of the model-dtype logits (their
        # widening to float32 is exact), with no float32 copies of [R, V].
        argmax_only = len(batch.suppress_ids) == 0 and self.stager.all_greedy(batch)
        if size:
            logits, greedy_ids = self.graphs.run(batch, size, prev_ids)  # [R, V] model dtype, [R]
            if argmax_only:
                ids = greedy_ids  # computed inside the graph
            else:
                sampling, all_greedy, any_filter = self.stager.sampling(batch)
                ids = sample(logits.float(), **sampling, all_greedy=all_greedy, any_top_k_top_p=any_filter)
        else:
            inputs = self.stager.stage(batch, prev_ids=prev_ids)
            hidden = self.forward(inputs)
            if argmax_only:
                ids = first_argmax(self.logits(inputs, hidden, float32=False))
            else:
                ids = self.sample(inputs, self.logits(inputs, hidden))  # [R]
        # Its own memory (a copy, also of int32 ids): the graphs' outputs are overwritten by the next
        # replay, and the next step reads these ids on the device.
        ids = ids.to(torch.int32, copy=True)
        if self.device.type != "cuda":
            self._prev_ids = ids
            return _Step(ids, None)
        # A buffer per step (from torch's pinned-memory cache): two steps may be in flight.
        host = torch.empty(ids.shape[0], dtype=torch.int32, pin_memory=True)
        host.copy_(ids, non_blocking=True)  # the step's one device-to-host copy
        event = torch.cuda.Event()
        event.record()
        self._prev_ids = ids
        return _Step(host, event)

    def collect(self, handle):
        self.call_started = time.monotonic()
        try:
            return self._collect(handle)
        finally:
            self.call_started = 0.0

    def _collect(self, handle):
        if hasattr(handle, "collect"):  # a speculative step (llmapi.speculative.step.SpeculativeHandle)
            return handle.collect()
        if isinstance(handle, dict):  # a decode() step
            host = {name: (t.to("cpu").numpy() if isinstance(t, torch.Tensor) else t) for name, t in handle.items()}
            return StepOutput(**host)
        if handle.event is not None:
            started = time.perf_counter()
            handle.event.synchronize()
            self.stats.wait_s += time.perf_counter() - started
        return handle.host_ids.numpy().copy()

    # ---------------------------------------------------------------- the parts, for a rank's driver
    @torch.inference_mode()
    def forward(self, inputs: StepInputs, hidden: Optional[torch.Tensor] = None) -> torch.Tensor:  # [T, H]
        """This rank's layers; `hidden` [T, H] is the previous pipeline stage's output."""
        if self.adapters is not None:
            self.adapters.begin(inputs.adapter_slots, inputs.adapter_slots_host)
        out = self.model(inputs.input_ids, inputs.positions, inputs.attn, self.kv_caches, hidden=hidden)
        if self.spec is not None:
            self.spec.after_forward(inputs, out)  # an EAGLE head keeps the target's hidden states
        return out

    @torch.inference_mode()
    def logits(self, inputs: StepInputs, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """[T, H] -> [R, V]: the sampled rows' logits, float32 (or in the model dtype)."""
        return self.model.compute_logits(hidden[inputs.last_rows], float32=float32)

    @torch.inference_mode()
    def decode_step(self, batch, inputs: StepInputs, hidden: torch.Tensor, samples: bool = True):
        """The decoding step of a batch that needs it (see needs_decode), at every world size: hidden [T, H]
        -> (decode()'s output, the step's prompt chunks, its generation rows) for the LLM's records.

        With several ranks every rank of the last stage calls it (the head's all-gather is a collective);
        only the sampling rank (`samples`) decodes, and the others get (None, [], [])."""
        query_start = np.concatenate([[0], np.cumsum(np.asarray(batch.query_lens))])
        prompt = prompt_chunks(batch, hidden, query_start, self.model.compute_logits)
        logits = self.logits(inputs, hidden)  # [R, V] float32
        if not samples:
            return None, [], []
        generation = generation_rows(batch, logits)  # copies: decoding writes into logits
        return decode(logits, batch, self.state, self.logits_processors), prompt, generation

    @torch.inference_mode()
    def sample(self, inputs: StepInputs, logits: torch.Tensor) -> torch.Tensor:  # [R, V] -> [R]
        return sample(logits, **inputs.sampling, all_greedy=inputs.all_greedy,
                      any_top_k_top_p=inputs.any_top_k_top_p)
