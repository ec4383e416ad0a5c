"""One rank's share of every step (its shard, its pipeline traffic), and the call loop of ranks other than 0."""

from __future__ import annotations

import gc
import json
import logging
import pickle
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from llmapi.config import KvCacheConfig
from llmapi.distributed.comm import ADAPTER, EXIT, INIT, RELEASE, STEP, ControlChannel, GroupComm, decode_batch
from llmapi.distributed.mapping import Mapping
from llmapi.distributed.pipeline import micro_batches, slice_batch
from llmapi.distributed.session import Session
from llmapi.distributed.step_reply import merge_outputs, pack_reply, unpack_reply
from llmapi.distributed.token_feed import TokenFeed
from llmapi.errors import CorruptEngineError
from llmapi.runtime.model_runner import ModelRunner
from llmapi.runtime.sampler import first_argmax, sample
from llmapi.runtime.watchdog import StepMarks, start_heartbeat
from llmapi.speculative.rejection import RowSettings
from llmapi.speculative.setup import SpeculativeSetup
from llmapi.speculative.step import SpeculativeDecoder, StepPlan, verify_step

DRAFTS_TAG = 1  # the drafts' messages on the tokens group (the answers to rank 0 go untagged)

logger = logging.getLogger(__name__)


@dataclass
class StepHandle:
    """Rank 0's view of a step in flight: its micro-batches' request ranges and, when it samples, their answers."""

    ranges: list
    decoding: bool = False  # the step runs decode(): its answers are step_reply buffers, else tokens [R_mb]
    replies: list = field(default_factory=list)  # the answers, when this rank samples (see _LocalIds)
    number: int = -1  # the runner's count of steps submitted before this one


class _LocalIds:
    """Sampled ids [R_mb] on their way to rank 0's host: on CUDA a copy into page-locked memory that an event
    marks done, so that submit never waits for the device."""

    def __init__(self, ids: torch.Tensor):
        self.event = None
        if ids.device.type == "cuda":
            self.host = torch.empty(ids.shape[0], dtype=torch.int32, pin_memory=True)
            self.host.copy_(ids, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = ids

    def result(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


class _LocalDecoded:
    """decode()'s output on rank 0's own device, moved to the host at collect (as the one-rank runner does)."""

    def __init__(self, decoded):
        self.decoded = decoded

    def result(self):
        return unpack_reply(pack_reply(*self.decoded))


class _Unloadable:
    """Stands in for a logits processor the sampling rank could not unpickle: it fails its request alone."""

    def __init__(self, error: BaseException):
        self.message = f"could not be loaded on the sampling rank ({type(error).__name__}: {error})"

    def __call__(self, prompt_ids, output_ids, logits):
        raise RuntimeError(self.message)


class RankWorker:
    """Runs this rank's layers on each step's micro-batches; receives and sends hidden states between stages.

    init: the INIT call's settings (engine_dir, engine_config, mapping, device_type, kv_cache_config,
    tokens_per_block, load_format; max_batch_size when known). Every rank builds one; the cache size is the
    smallest any rank can hold. On CUDA every rank then captures its layers' decode graphs (the same sizes on
    every rank), and a decode micro-batch replays the graph its size picks, on every rank of the stage alike.

    A batch's placeholders (async scheduling: tokens the step before samples) are filled on the first stage from
    that step's ids, which the sampling rank sends there on the device (TokenFeed).

    A step whose batch uses a decoding feature beyond sampling (see ModelRunner.needs_decode) runs the same
    ModelRunner.decode_step as one rank, on the sampling rank (the last stage's first TP rank), which keeps the
    requests' decoding state (penalty counts, token histories, logits processors); the last stage's other TP
    ranks take part in its collectives. Its answer crosses to rank 0 as a step_reply buffer. Such a step is
    cut into micro-batches too, unless a row forks another's state (a micro-batch would see the other's
    update of this step).

    Speculative decoding (init's `speculative`: SpeculativeSetup.to_dict; n-gram or a draft model): a step with
    speculating rows runs whole (one micro-batch) and answers as a decoding step. Every rank computes the
    target over the rows' 1 + k tokens; the sampling rank verifies them (llmapi.speculative.step.verify_step)
    and its reply carries each row's accepted tokens. A draft model runs whole, on the sampling rank alone (it
    follows every forward there, placeholders filled from its own sampled ids), and its drafts cross to the
    first stage's other ranks before the forward.
    """

    def __init__(self, session: Session, init: dict):
        self.session = session
        mapping = Mapping.from_dict(init["mapping"], session.rank)
        session.configure(mapping)
        self.mapping = mapping
        self.device = session.device(init["device_type"])
        self.samples = session.rank == mapping.sampler_rank
        spec = init.get("speculative")
        self.speculative = None if spec is None else SpeculativeSetup.from_dict(spec)
        drafter = self.speculative is not None and self.speculative.has_drafter
        self.drafts_here = drafter and self.samples  # this rank runs the draft model
        self.drafts_to = [r for r in mapping.stage_ranks(0) if r != mapping.sampler_rank] if self.drafts_here else []
        self.drafts_from = mapping.sampler_rank if drafter and mapping.is_first_stage and not self.samples else None
        error = None
        try:
            self.runner = ModelRunner(init["engine_dir"], init["engine_config"], self.device,
                                      KvCacheConfig(**init["kv_cache_config"]), init["tokens_per_block"],
                                      load_format=init["load_format"], mapping=mapping,
                                      comm=GroupComm(session.tp_group, mapping.tp_size),
                                      speculative=None if drafter and not self.samples else self.speculative,
                                      adapters=init.get("adapters"), attn_backend=init.get("attn_backend", "triton"),
                                      cuda_graph_batch_sizes=init.get("cuda_graph_batch_sizes"),
                                      max_batch_size=int(init.get("max_batch_size") or 1024),
                                      max_num_tokens=int(init.get("max_num_tokens") or 0),
                                      max_seq_len=int(init.get("max_seq_len") or 0),
                                      verify_logits=self.speculative is not None,
                                      max_encoder_input_len=int(init.get("max_encoder_input_len") or 0))
        except Exception as e:  # e.g. its file fails its checksum: every rank must learn it, or they hang
            error = e
        _agree_loaded(session, error)
        blocks = torch.tensor([self.runner.num_blocks], dtype=torch.int64)
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=session.control)
        if int(blocks) != self.runner.num_blocks:
            self.runner.allocate_kv_caches(int(blocks))
        self.num_blocks = int(blocks)
        if self.runner.graphs_supported and not drafter:  # a drafter follows every forward: no decode graphs
            # Every rank captures the same sizes (without the executor's max_batch_size, as under llmapi-launch:
            # a decode batch never has more requests than blocks), and a rank that fails tells the others.
            error = None
            try:
                self.runner.capture_graphs(int(init.get("max_batch_size") or self.num_blocks))
            except Exception as e:
                error = e
            _agree_loaded(session, error, "capture its decode graphs")
        self.hidden_size = init["engine_config"]["hidden_size"]
        self.feed = TokenFeed(session.feed, session.rank, mapping, self.device)
        self._sends = []  # (work, tensor): isends in flight; the tensor must live until they complete

    def install_adapter(self, install) -> None:
        """An adapter into its device slot on this rank (its shard of it), between steps."""
        self.runner.adapters.install(install)

    def _isend(self, tensor: torch.Tensor, dst: int, group=None, tag: int = 0) -> None:
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
        self._sends.append((dist.isend(tensor, dst, group=group, tag=tag), tensor))

    def _take_processors(self, batch) -> None:
        """The sampling rank: load the logits processors of requests new in this step, drop finished ones."""
        processors = self.runner.logits_processors
        for rid in batch.processors_dropped:
            processors.pop(rid, None)
        for rid, data in batch.processors_added.items():
            try:
                processors[rid] = pickle.loads(data)
            except Exception as e:  # e.g. its module is not importable here: its request fails alone
                processors[rid] = _Unloadable(e)

    def start(self, batch) -> StepHandle:
        """Run this rank's part of a step (a decode_batch). Stages overlap: a stage sends micro-batch i on
        while it runs i + 1. Nothing here waits for the device (but a step's block copies)."""
        m, runner = self.mapping, self.runner
        runner.copy_blocks(np.asarray(batch.block_copies))  # every rank's cache: forks share blocks
        if self.samples:
            self._take_processors(batch)
        decoding = runner.needs_decode(batch)
        speculating = self.speculative is not None and SpeculativeDecoder.handles(batch)
        forks = decoding and bool((np.asarray(batch.slot_copy_from) >= 0).any())
        ranges = micro_batches(np.asarray(batch.query_lens), 1 if forks or speculating else m.pp_size)
        self.feed.begin(batch, ranges)
        handle = StepHandle(ranges, decoding or speculating)
        if speculating:
            self._run_speculative(batch, handle)
            return handle
        for start, stop in ranges:
            self._run(batch if len(ranges) == 1 else slice_batch(batch, start, stop), handle)
        return handle

    @torch.inference_mode()
    def _run(self, mb, handle: StepHandle) -> None:
        """One micro-batch through this rank's layers: a decode graph's replay where one fits (every rank of
        the stage picks the same from the batch), else eagerly."""
        m, runner, stats = self.mapping, self.runner, self.runner.stats
        t = int(mb.num_tokens)
        stats.steps, stats.tokens = stats.steps + 1, stats.tokens + t
        # The draft model follows every forward on the sampling rank: its inputs have their placeholders filled.
        prev_ids = self.feed.prev_ids(mb) if m.is_first_stage or self.drafts_here else None
        runner.stager.next_step()  # host buffers in turn: a micro-batch's copies may still be queued
        size = runner.graphs.size_for(mb) if runner.graphs is not None and not handle.decoding else 0
        hidden = None
        if not m.is_first_stage:
            hidden = runner.graphs.hidden_input(t) if size else torch.empty(
                t, self.hidden_size, dtype=runner.dtype, device=self.device)
            dist.recv(hidden, m.peer(m.pp_rank - 1))
        # What sample() gives greedy rows with nothing suppressed: the argmax of the model-dtype logits.
        argmax_only = not handle.decoding and len(mb.suppress_ids) == 0 and runner.stager.all_greedy(mb)
        ids = inputs = None
        if size:
            stats.graph_steps += 1
            out = runner.graphs.run(mb, size, prev_ids)
            if not m.is_last_stage:
                self._isend(out.clone(), m.peer(m.pp_rank + 1))  # the next replay overwrites the graph's output
                return
            logits, greedy_ids = out  # [R, V] model dtype, [R]
            if self.samples and argmax_only:
                ids = greedy_ids
            elif self.samples:
                sampling, all_greedy, any_filter = runner.stager.sampling(mb)
                ids = sample(logits.float(), **sampling, all_greedy=all_greedy, any_top_k_top_p=any_filter)
        else:
            if not m.is_first_stage and prev_ids is None and (np.asarray(mb.prev_rows) >= 0).any():
                mb = SimpleNamespace(**vars(mb))  # a later stage embeds nothing: no placeholder to fill
                mb.prev_rows = np.full(t, -1, dtype=np.int32)
            inputs = runner.stager.stage(mb, prev_ids=prev_ids)
            hidden = runner.forward(inputs, hidden)  # [T_mb, H]
            if not m.is_last_stage:
                self._isend(hidden, m.peer(m.pp_rank + 1))
                return
            # Every TP rank of the last stage: the head all-gathers.
            if handle.decoding:
                decoded = runner.decode_step(mb, inputs, hidden, samples=self.samples)
                if self.samples:
                    self.feed.sampled(decoded[0]["tokens"][:, 0].contiguous())
                    self._reply(handle, decoded=decoded)
                return
            logits = runner.logits(inputs, hidden, float32=not argmax_only)
            if self.samples:
                ids = first_argmax(logits) if argmax_only else runner.sample(inputs, logits)  # [R]
        if self.samples:
            # Its own memory, int32: a graph's outputs are overwritten by the next replay.
            ids = ids.to(torch.int32, copy=True)
            self.feed.sampled(ids)
            self._reply(handle, ids=ids)

    @torch.inference_mode()
    def _run_speculative(self, batch, handle: StepHandle) -> None:
        """A step with speculating rows, whole: drafts (the batch's n-gram drafts, or the draft model's from the
        sampling rank), the target over every token on every rank, verification on the sampling rank."""
        m, runner, stats = self.mapping, self.runner, self.runner.stats
        t = int(batch.num_tokens)
        stats.steps, stats.tokens = stats.steps + 1, stats.tokens + t
        prev_ids = self.feed.prev_ids(batch) if m.is_first_stage or self.drafts_here else None
        runner.stager.next_step()
        mb = batch
        if prev_ids is None and (np.asarray(batch.prev_rows) >= 0).any():
            mb = SimpleNamespace(**vars(batch))  # a later stage embeds nothing: no placeholder to fill
            mb.prev_rows = np.full(t, -1, dtype=np.int32)
        inputs = runner.stager.stage(mb, prev_ids=prev_ids)
        plan = StepPlan(batch, self.device)
        settings = RowSettings.from_batch(batch, plan.rows, self.device) if self.samples else None
        drafts = draft_probs = None
        if self.drafts_here:
            drafts, draft_probs = runner.spec.drafter.propose(batch, inputs, settings, plan.num_draft)
            host = drafts.to("cpu", torch.int64).contiguous()
            for target in self.drafts_to:
                self._isend(host, target, group=self.session.tokens, tag=DRAFTS_TAG)
            plan.place(inputs, drafts)
        elif self.drafts_from is not None:
            host = torch.empty(len(plan.rows), plan.kmax, dtype=torch.int64)
            dist.recv(host, self.drafts_from, group=self.session.tokens, tag=DRAFTS_TAG)
            plan.place(inputs, host.to(self.device))
        elif self.samples:  # n-gram drafts: in the batch's input ids, on every rank
            drafts = plan.batch_drafts(inputs)
        hidden = None
        if not m.is_first_stage:
            hidden = torch.empty(t, self.hidden_size, dtype=runner.dtype, device=self.device)
            dist.recv(hidden, m.peer(m.pp_rank - 1))
        hidden = runner.forward(inputs, hidden)  # [T, H]
        if not m.is_last_stage:
            self._isend(hidden, m.peer(m.pp_rank + 1))
            return
        out, prompt, generation = verify_step(runner, batch, inputs, hidden, plan, settings, drafts, draft_probs,
                                              samples=self.samples)
        if self.samples:
            self.feed.sampled(out["tokens"][:, 0].contiguous())
            self._reply(handle, decoded=(out, prompt, generation))

    def _reply(self, handle: StepHandle, ids=None, decoded=None) -> None:
        """The sampling rank: a micro-batch's answer to rank 0 (kept, when this is rank 0)."""
        if self.session.rank == 0:
            handle.replies.append(_LocalIds(ids) if decoded is None else _LocalDecoded(decoded))
        elif decoded is not None:
            reply = torch.from_numpy(pack_reply(*decoded))
            self._isend(torch.tensor([reply.numel()], dtype=torch.int64), 0, group=self.session.tokens)
            self._isend(reply, 0, group=self.session.tokens)
        else:
            self._isend(ids.cpu(), 0, group=self.session.tokens)

    def _replies(self, handle: StepHandle) -> list:
        """Rank 0: each micro-batch's answer (tokens [R_mb], or unpack_reply's triple)."""
        if self.samples:
            return [reply.result() for reply in handle.replies]
        replies = []
        for start, stop in handle.ranges:
            if handle.decoding:
                size = torch.zeros(1, dtype=torch.int64)
                dist.recv(size, self.mapping.sampler_rank, group=self.session.tokens)
                reply = torch.empty(int(size), dtype=torch.uint8)
            else:
                reply = torch.empty(stop - start, dtype=torch.int32)
            dist.recv(reply, self.mapping.sampler_rank, group=self.session.tokens)
            replies.append(unpack_reply(reply.numpy()) if handle.decoding else reply.numpy())
        return replies

    def finish(self, handle: StepHandle):
        """Rank 0: the step's answer from itself or the sampling rank, as the in-process runner gives it: the
        sampled tokens [R], or (decoding) a StepOutput; and the step's logits records (prompt chunks,
        generation rows)."""
        replies = self._replies(handle)
        if not handle.decoding:
            return (replies[0] if len(replies) == 1 else np.concatenate(replies)), [], []
        outputs, prompt, generation = [], [], []
        for out, chunks, rows in replies:
            outputs.append(out)
            prompt += chunks
            generation += rows
        return merge_outputs(outputs), prompt, generation

    def release(self) -> None:
        """Wait for the sends and receives in flight, then drop the model and cache."""
        self.feed.close()
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()
        self.runner = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _agree_loaded(session: Session, error: Exception | None, what: str = "load the engine") -> None:
    """Every rank learns whether every rank loaded its shard (or did `what`). If one did not, rank 0 raises its
    error (rank 0's own, or the first failed rank's message, which crosses as bytes: a CorruptEngineError stays
    one, naming the file), and the other ranks raise theirs or RuntimeError."""
    codes = torch.zeros(session.world_size, dtype=torch.int64)  # per rank: 0 loaded, 1 corrupt engine, 2 other
    codes[session.rank] = 0 if error is None else 1 if isinstance(error, CorruptEngineError) else 2
    dist.all_reduce(codes, group=session.control)
    failed = [r for r in range(session.world_size) if codes[r]]
    if not failed:
        return
    if session.rank != 0:
        if error is None:
            raise RuntimeError(f"rank {failed[0]} could not {what}")
        text = str(error) if codes[session.rank] == 1 else f"{type(error).__name__}: {error}"
        data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)
        dist.send(torch.tensor([data.numel()], dtype=torch.int64), 0, group=session.control)
        dist.send(data, 0, group=session.control)
        raise error
    messages = {}
    for r in failed[1:] if failed[0] == 0 else failed:
        n = torch.zeros(1, dtype=torch.int64)
        dist.recv(n, r, group=session.control)
        data = torch.empty(int(n), dtype=torch.uint8)
        dist.recv(data, r, group=session.control)
        messages[r] = bytes(data.numpy()).decode(errors="replace")
    if error is not None:
        raise error
    r = failed[0]
    if codes[r] == 1:
        raise CorruptEngineError(f"{messages[r]} (rank {r})")
    raise RuntimeError(f"rank {r} could not {what}: {messages[r]}")


def serve(session: Session) -> None:
    """The loop of ranks other than 0: run rank 0's calls until it says EXIT."""
    channel = ControlChannel(session.control)
    worker = None
    marks = StepMarks()
    start_heartbeat(session.rank, marks)  # in a spawned job: the user's process sees this rank's steps
    while True:
        method, payload = channel.recv()
        if method == STEP:
            marks.call_started = time.monotonic()
            worker.start(decode_batch(payload))
            marks.call_started, marks.calls_done = 0.0, marks.calls_done + 1
        elif method == ADAPTER:
            from llmapi.lora.runtime import AdapterInstall

            worker.install_adapter(AdapterInstall.from_bytes(payload))
        elif method == INIT:
            try:
                worker = RankWorker(session, json.loads(payload))
            except Exception as e:  # rank 0 reports it to the user; this rank waits for rank 0's next call
                logger.warning("this rank did not load the engine: %s", e)
                worker = None
        elif method == RELEASE:
            if worker is not None:
                worker.release()
            worker = None
        elif method == EXIT:
            if worker is not None:
                worker.release()
            return
        else:
            raise RuntimeError(f"unknown call {method} from rank 0")
