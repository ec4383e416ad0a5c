"""DistributedRunner: rank 0's runner for the executor; each step is broadcast, then every rank runs its shard."""

from __future__ import annotations

import collections
import logging
import threading
import time

import numpy as np

from llmapi.distributed.comm import ADAPTER, INIT, RELEASE, STEP, ControlChannel, decode_batch, encode_batch
from llmapi.distributed.rank_worker import RankWorker, StepHandle
from llmapi.distributed.session import Session
from llmapi.errors import WorkerDiedError
from llmapi.runtime.logits_records import LogitsRecords
from llmapi.runtime.watchdog import stalled_ranks

logger = logging.getLogger(__name__)

EVENTS_KEPT = 4096  # submit / collect events kept for runner_stats()


class ProcessorTable:
    """Rank 0's list of the requests' logits processors (pickled by reference: they run on the sampling
    rank), handed on with the next step: those added since the last one, and those whose request finished."""

    def __init__(self):
        self._lock = threading.Lock()  # the LLM adds and drops from its threads; submit takes on the loop thread
        self._added: dict[int, bytes] = {}
        self._dropped: list[int] = []
        self._sent: set[int] = set()

    def __setitem__(self, request_id: int, pickled: bytes) -> None:
        with self._lock:
            self._added[request_id] = pickled

    def pop(self, request_id: int, default=None):
        with self._lock:
            if self._added.pop(request_id, None) is None and request_id in self._sent:
                self._sent.discard(request_id)
                self._dropped.append(request_id)
        return default

    def take(self) -> tuple[dict, list]:
        """({request id: pickled processor} to load, [request id] to drop) before the next step."""
        with self._lock:
            added, dropped = self._added, self._dropped
            self._added, self._dropped = {}, []
            self._sent.update(added)
        return added, dropped


class DistributedRunner:
    """The executor's runner on rank 0 (submit / collect), driving every rank through call(method, payload).

    More than one step may be in flight: with async scheduling the executor submits step k + 1 before it
    collects step k (whose sampled ids the ranks that embed them take on the device: TokenFeed), and without it
    pipeline stages overlap (ExecutorConfig.max_inflight_batches = pp_size): while the last stage finishes
    step k, stage 0 already runs step k + 1. submit never waits for the device; collect waits for its step's
    tokens. A failed collective means a rank is gone: the error is fatal (WorkerDiedError), so the executor
    fails every request at once.

    `events` keeps the latest submit and collect calls in order (("submit", step, steps in flight, placeholder
    tokens) and ("collect", step)); `runner_stats()` gives them with the counts and rank 0's runner stats.

    `processors` takes the requests' pickled logits processors (for the sampling rank) and `records` their
    prompt logprobs and logits outputs, which arrive from the sampling rank with each step's answer; the
    LLM (or, in a spawned job, rank 0's server) opens and takes them as with the in-process runner.
    """

    def __init__(self, session: Session, init: dict):
        self.session = session
        self.channel = ControlChannel(session.control)
        self.channel.send_json(INIT, init)
        self.worker = RankWorker(session, init)
        self.num_blocks = self.worker.num_blocks
        self.processors = ProcessorTable()
        self.records = LogitsRecords()
        self._adapters: list = []  # AdapterInstalls queued by the user's side, handed out before the next step
        self._adapters_lock = threading.Lock()
        self._closed = False
        self._inflight: dict[int, StepHandle] = {}  # submitted, not collected: drained before a release
        self.events = collections.deque(maxlen=EVENTS_KEPT)
        self._submitted = self._overlapped = 0  # steps submitted; of them, submitted with another in flight
        # The step watchdog's marks: when the current submit/collect began (monotonic s; 0.0 between calls),
        # calls finished, the executor's loop thread (RunnerProbe here; the heartbeat in a spawned job).
        self.call_started, self.calls_done, self.loop_thread = 0.0, 0, None

    def submit(self, batch) -> StepHandle:
        self.loop_thread, self.call_started = threading.get_ident(), time.monotonic()
        number, inflight = self._submitted, len(self._inflight)
        self.events.append(("submit", number, inflight, int((np.asarray(batch.prev_rows) >= 0).sum())))
        try:
            self._send_adapters()
            payload = encode_batch(batch, *self.processors.take())
            self.channel.send(STEP, payload)  # on its way to the ranks while this rank stages its part
            handle = self.worker.start(decode_batch(payload))
        except Exception as e:
            raise _rank_failure("submit", e) from e
        finally:
            self.call_started, self.calls_done = 0.0, self.calls_done + 1
        handle.number = number
        self._submitted, self._overlapped = number + 1, self._overlapped + bool(inflight)
        self._inflight[id(handle)] = handle
        return handle

    def queue_adapter(self, install) -> None:
        """From any thread: an adapter (llmapi.lora.runtime.AdapterInstall) every rank puts in its device slot
        before the next step."""
        with self._adapters_lock:
            self._adapters.append(install)

    def _send_adapters(self) -> None:
        with self._adapters_lock:
            installs, self._adapters = self._adapters, []
        for install in installs:
            self.channel.send(ADAPTER, install.to_bytes())
            self.worker.install_adapter(install)

    def collect(self, handle: StepHandle):
        """The step's tokens [R], or a StepOutput: what the in-process runner's collect gives."""
        self._inflight.pop(id(handle), None)
        self.events.append(("collect", handle.number))
        self.call_started = time.monotonic()
        try:
            out, prompt, generation = self.worker.finish(handle)
        except Exception as e:
            raise _rank_failure("collect", e) from e
        finally:
            self.call_started, self.calls_done = 0.0, self.calls_done + 1
        self.records.add(prompt, generation)
        return out

    def runner_stats(self) -> dict:
        """Steps submitted, of them those submitted while another was in flight (overlapped), the latest
        submit / collect events in order, rank 0's runner stats (steps, graph_steps, tokens, ...) and the batch
        sizes of its decode graphs (None: none captured)."""
        graphs = self.worker.runner.graphs
        return dict(steps=self._submitted, overlapped_steps=self._overlapped, events=list(self.events),
                    rank0=self.worker.runner.stats.as_dict(), graph_sizes=None if graphs is None else graphs.sizes)

    def stall_detail(self) -> str:
        """For the in-process watchdog (llmapi-launch): the ranks that hold rank 0's step up, told by their
        process states when every rank runs on this host."""
        session = self.session
        named = stalled_ranks(session.pids) if session.local_size == session.world_size else ""
        return f"; {named or 'a rank is stopped, or a collective never completes'}"

    def close(self) -> None:
        """Tell every rank to drop this model (the job stays up for the next LLM)."""
        if self._closed:
            return
        self._closed = True
        try:
            # A shut-down executor drops its steps in flight; their tokens are on the way all the same,
            # and must not be taken for the next model's.
            for handle in self._inflight.values():
                self.worker.finish(handle)
            self._inflight.clear()
            self.channel.send(RELEASE)
            self.worker.release()
            self.channel.flush()
        except Exception:
            logger.warning("a rank did not take the release call", exc_info=True)


def _rank_failure(call: str, error: Exception) -> WorkerDiedError:
    logger.error("runner.%s failed on rank 0", call, exc_info=error)
    return WorkerDiedError(f"a rank of the MPI job failed or died during a step ({type(error).__name__}: {error})")
