"""One rank's share of every step (its shard, its pipeline traffic), and the call loop of ranks other than 0."""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from llmapi.config import KvCacheConfig
from llmapi.distributed.comm import (EXIT, INIT, RELEASE, STEP, ControlChannel, GroupComm, decode_batch,
                                     pack_sampled, sampled_width, unpack_sampled)
from llmapi.distributed.mapping import Mapping
from llmapi.distributed.pipeline import micro_batches, slice_batch
from llmapi.distributed.session import Session
from llmapi.errors import CorruptEngineError
from llmapi.runtime.decode import logprob_outputs
from llmapi.runtime.model_runner import ModelRunner
from llmapi.runtime.watchdog import StepMarks, start_heartbeat

logger = logging.getLogger(__name__)


@dataclass
class StepHandle:
    """Rank 0's view of a step in flight: its micro-batches' request ranges and, when it samples, their tokens."""

    ranges: list
    top: int = -1  # the step's top logprobs per row; -1: nobody asked for logprobs
    tokens: list = field(default_factory=list)  # [R_mb, W] device tensors (pack_sampled), when this rank samples


class RankWorker:
    """Runs this rank's layers on each step's micro-batches; receives and sends hidden states between stages.

    init: the INIT call's settings (engine_dir, engine_config, mapping, device_type, kv_cache_config,
    tokens_per_block, load_format). Every rank builds one; the cache size is the smallest any rank can hold.
    """

    def __init__(self, session: Session, init: dict):
        self.session = session
        mapping = Mapping.from_dict(init["mapping"], session.rank)
        session.configure(mapping)
        self.mapping = mapping
        self.device = session.device(init["device_type"])
        error = None
        try:
            self.runner = ModelRunner(init["engine_dir"], init["engine_config"], self.device,
                                      KvCacheConfig(**init["kv_cache_config"]), init["tokens_per_block"],
                                      load_format=init["load_format"], mapping=mapping,
                                      comm=GroupComm(session.tp_group, mapping.tp_size))
        except Exception as e:  # e.g. its file fails its checksum: every rank must learn it, or they hang
            error = e
        _agree_loaded(session, error)
        blocks = torch.tensor([self.runner.num_blocks], dtype=torch.int64)
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=session.control)
        if int(blocks) != self.runner.num_blocks:
            self.runner.allocate_kv_caches(int(blocks))
        self.num_blocks = int(blocks)
        self.hidden_size = init["engine_config"]["hidden_size"]
        self._sends = []  # (work, tensor): isends in flight; the tensor must live until they complete

    def _isend(self, tensor: torch.Tensor, dst: int, group=None) -> None:
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
        self._sends.append((dist.isend(tensor, dst, group=group), tensor))

    def start(self, batch) -> StepHandle:
        """Run this rank's part of a step. Stages overlap: a stage sends micro-batch i on while it runs i + 1."""
        m, runner = self.mapping, self.runner
        ranges = micro_batches(np.asarray(batch.query_lens), m.pp_size)
        handle = StepHandle(ranges, top=int(np.asarray(batch.logprobs).max(initial=-1)))
        for start, stop in ranges:
            mb = batch if len(ranges) == 1 else slice_batch(batch, start, stop)
            inputs = runner.prepare(mb)
            hidden = None
            if not m.is_first_stage:
                hidden = torch.empty(int(mb.num_tokens), self.hidden_size, dtype=runner.dtype, device=self.device)
                dist.recv(hidden, m.peer(m.pp_rank - 1))
            hidden = runner.forward(inputs, hidden)  # [T_mb, H]
            if not m.is_last_stage:
                self._isend(hidden, m.peer(m.pp_rank + 1))
                continue
            logits = runner.logits(inputs, hidden)  # every TP rank: the head all-gathers
            if self.session.rank == m.sampler_rank:
                packed = self._sample(runner, inputs, logits, np.asarray(mb.logprobs), handle.top)  # [R_mb, W]
                if self.session.rank == 0:
                    handle.tokens.append(packed)
                else:
                    self._isend(packed.cpu(), 0, group=self.session.tokens)
        return handle

    @staticmethod
    def _sample(runner, inputs, logits: torch.Tensor, want: np.ndarray, top: int) -> torch.Tensor:
        """The sampled tokens, with the logprob outputs of the rows that asked (from the raw logits, taken
        before sampling processes them), packed for rank 0."""
        lp_rows = np.nonzero(want >= 0)[0]
        raw = logits[torch.as_tensor(lp_rows, device=logits.device)].log_softmax(dim=-1) if len(lp_rows) else None
        tokens = runner.sample(inputs, logits)  # [R_mb]
        outputs = None
        if top >= 0:
            outputs = (logprob_outputs(raw, lp_rows, want, tokens[:, None], top=top) if raw is not None else
                       _no_logprobs(len(want), top, logits.device))
        return pack_sampled(tokens, outputs, top)

    def finish(self, handle: StepHandle) -> np.ndarray:
        """Rank 0: the step's sampled tokens [R] (or a StepOutput with logprobs), from itself or the last stage."""
        if self.session.rank == self.mapping.sampler_rank:
            return unpack_sampled(torch.cat(handle.tokens).cpu().numpy(), handle.top)
        parts = []
        for start, stop in handle.ranges:
            packed = torch.empty(stop - start, sampled_width(handle.top), dtype=torch.int32)
            dist.recv(packed, self.mapping.sampler_rank, group=self.session.tokens)
            parts.append(packed)
        return unpack_sampled(torch.cat(parts).numpy(), handle.top)

    def release(self) -> None:
        """Wait for the sends in flight, then drop the model and cache."""
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()
        self.runner = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _agree_loaded(session: Session, error: Exception | None) -> None:
    """Every rank learns whether every rank loaded its shard. If one did not, rank 0 raises its error (rank 0's
    own, or the first failed rank's message, which crosses as bytes: a CorruptEngineError stays one, naming
    the file), and the other ranks raise theirs or RuntimeError."""
    codes = torch.zeros(session.world_size, dtype=torch.int64)  # per rank: 0 loaded, 1 corrupt engine, 2 other
    codes[session.rank] = 0 if error is None else 1 if isinstance(error, CorruptEngineError) else 2
    dist.all_reduce(codes, group=session.control)
    failed = [r for r in range(session.world_size) if codes[r]]
    if not failed:
        return
    if session.rank != 0:
        if error is None:
            raise RuntimeError(f"rank {failed[0]} could not load the engine")
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
    raise RuntimeError(f"rank {r} could not load the engine: {messages[r]}")


def _no_logprobs(num_rows: int, top: int, device) -> dict:
    """logprob_outputs' answer for a micro-batch none of whose rows asked (another micro-batch's did)."""
    out = {"logprobs": torch.full((num_rows, 1), float("nan"), device=device),
           "ranks": torch.zeros(num_rows, 1, dtype=torch.int32, device=device)}
    if top > 0:
        out["top_ids"] = torch.full((num_rows, top), -1, dtype=torch.int32, device=device)
        out["top_logprobs"] = torch.zeros(num_rows, top, device=device)
    return out


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
