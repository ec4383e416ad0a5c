"""RemoteExecutor: the executor of a spawned MPI job, seen from the user's process (the _core.Executor interface)."""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from typing import Optional

from llmapi import _core, errors
from llmapi.distributed import channel
from llmapi.distributed.session import MASTER_ADDR_ENV
from llmapi.distributed.spawn import MpiJob
from llmapi.distributed.worker import SYS_PATH_ENV
from llmapi.errors import ExecutorDeadError, LaunchError, StepTimeoutError, WorkerDiedError
from llmapi.runtime.watchdog import HEARTBEAT_ENV, Heartbeats, stalled_ranks

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0  # importing torch and loading a large shard on every rank


class _Call:
    def __init__(self):
        self.done = threading.Event()
        self.value = None
        self.error: Optional[BaseException] = None


class RemoteRecords:
    """The logits records (prompt logprobs, context and generation logits) rank 0 sends with a request's last
    response, kept until the LLM takes them; as LogitsRecords, only for requests opened and not yet taken."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: set[int] = set()
        self._arrived: dict = {}

    def open(self, request_id: int) -> None:
        with self._lock:
            self._open.add(request_id)

    def arrive(self, records: dict) -> None:
        """Rank 0's {request id: (context logits or None, {seq: {output index: logits}}, prompt logprobs)}."""
        import torch

        from llmapi.runtime.logits_records import PromptRecord

        with self._lock:
            records = {rid: r for rid, r in records.items() if rid in self._open}
        for rid, (context, generation, prompt_logprobs) in records.items():
            record = PromptRecord(logits=[torch.from_numpy(context)] if context is not None else [])
            generation = {seq: {i: torch.from_numpy(row) for i, row in rows.items()}
                          for seq, rows in generation.items()}
            with self._lock:
                if rid in self._open:  # not taken meanwhile (a request finished early on the Python side)
                    self._arrived[rid] = (record, generation, prompt_logprobs)

    def pop(self, request_id: int):
        with self._lock:
            self._open.discard(request_id)
            return self._arrived.pop(request_id, None)

    def take(self, request_id: int):
        """(PromptRecord or None, generation logits, prompt logprobs) as LogitsRecords.take gives them."""
        return self.pop(request_id) or (None, {}, ([], [], [], []))


class RemoteExecutor:
    """Spawns the ranks at once (they import torch while the engine converts), then `start` hands them the engine.

    A reader thread takes rank 0's messages: responses, replies to calls, and the job's end. If the job
    dies (a rank killed, rank 0 reporting a failed collective, mpiexec gone) every later call and
    await_responses raise WorkerDiedError, and the job's processes are stopped.

    It is also the step watchdog's probe of the job (check_stall, unstick): with requests or calls pending,
    progress is a response from rank 0 or a runner call that rank 0 finished (its heartbeat says); none for
    step_timeout is a stall, named from the ranks' heartbeats and process states, and the job is killed.

    `processors` ({request id: pickled logits processor}, filled by the LLM before it enqueues) go to rank 0
    with their requests; `records` receive the logits records that come with a request's last response.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._listener, env = channel.listen()
        env[MASTER_ADDR_ENV] = "127.0.0.1"  # one host: the rendezvous store listens on loopback only
        env[SYS_PATH_ENV] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
            env["GLOO_SOCKET_IFNAME"] = "lo"  # and so do the ranks' gloo connections
        self._board = Heartbeats.create(world_size)  # every rank's heartbeat: names a stalled rank
        env[HEARTBEAT_ENV] = self._board.path
        try:
            self.job = MpiJob(world_size, env)
        except BaseException:
            self._listener.close()
            self._board.close()
            raise
        self._conn = None
        self._send_lock = threading.Lock()
        self._cv = threading.Condition()
        self._responses: list = []
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count()
        self._dead: Optional[BaseException] = None
        self._closing = False
        self._reader: Optional[threading.Thread] = None
        self.num_blocks = 0
        self.processors: dict[int, bytes] = {}
        self.records = RemoteRecords()
        # For the step watchdog: requests not finished yet, response messages so far, and when it last saw
        # progress (None: nothing pending).
        self._outstanding: set[int] = set()
        self._responses_seen = 0
        self._progress_at: Optional[float] = None
        self._progress_marker = None

    @property
    def rank_pids(self) -> list[int]:
        """The pids of the ranks (rank 0 first), and mpiexec's as `job.proc.pid`."""
        return list(self.job.rank_pids)

    # ------------------------------------------------------------------ startup
    def start(self, init: dict, executor_kwargs: dict, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Wait for rank 0, send it the engine and executor settings, wait until every rank is ready."""
        self._conn = self._accept(timeout)
        self._conn.send(("init", init, executor_kwargs))
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.1):
            if not self.job.alive() or time.monotonic() > deadline:
                raise LaunchError(f"the ranks did not load the engine: {self.job.describe_exit()}")
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            raise LaunchError(f"the ranks did not load the engine: {self._wait_describe()}") from None
        if msg[0] != "ready":
            error = getattr(errors, msg[2], None) if len(msg) > 3 else None
            if isinstance(error, type) and issubclass(error, errors.LLMAPIError):  # e.g. a rank file's checksum
                raise error(f"{msg[3]} (the ranks did not load the engine; log {self.job.log_path})")
            raise LaunchError(f"the ranks did not load the engine: {msg[1]}\n{self._wait_describe()}")
        _, self.num_blocks, pids = msg
        # Rank 0's executor settings: each request is checked here against its rules before it is sent.
        self._config = _core.ExecutorConfig(num_blocks=self.num_blocks, **executor_kwargs)
        self.job.rank_pids = list(pids)
        self.job.remember_segments()
        self._reader = threading.Thread(target=self._read, name="llmapi-rank0-reader", daemon=True)
        self._reader.start()

    def _accept(self, timeout: float):
        result: dict = {}

        def accept():
            try:
                result["conn"] = self._listener.accept()  # HMAC challenge both ways before returning
            except BaseException as e:  # closed below, or a peer without the key
                result["error"] = e

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while thread.is_alive() and self.job.alive() and time.monotonic() < deadline:
            thread.join(0.1)
        if "conn" not in result:
            self._listener.close()  # ends a pending accept()
            thread.join(5)
            raise LaunchError(f"rank 0 did not connect: {result.get('error') or self._wait_describe()}")
        self._listener.close()  # one connection per session
        return result["conn"]

    def _wait_describe(self, wait: float = 1.0) -> str:
        """The job's end, once mpiexec had `wait` seconds to exit (its exit code and log say what happened)."""
        try:
            self.job.proc.wait(wait)
        except Exception:
            pass
        return self.job.describe_exit()

    # ------------------------------------------------------------------ messages from rank 0
    def _read(self) -> None:
        reason = None
        try:
            while True:
                if not self._conn.poll(0.2):
                    if not self.job.alive():
                        raise EOFError
                    continue
                msg = self._conn.recv()
                kind = msg[0]
                if kind == "responses":  # a step's, encoded (_core.encode_responses); or refused requests' errors
                    responses = _core.decode_responses(msg[1]) if isinstance(msg[1], bytes) else \
                        [channel.RemoteResponse(*t) for t in msg[1]]
                    self.records.arrive(msg[2])  # before the responses that finish their requests
                    self._outstanding.difference_update(r.request_id for r in responses if r.request_finished)
                    self._responses_seen += 1
                    with self._cv:
                        self._responses.extend(responses)
                        self._cv.notify_all()
                elif kind == "reply":
                    self._settle(msg[1], msg[2], msg[3])
                elif kind == "dead":
                    reason = f"rank 0 reports: {msg[1]}"
                    break
                elif kind == "bye":
                    break
        except (EOFError, OSError):
            reason = "the connection to rank 0 closed"
        if reason is not None and not self._closing:
            self._die(WorkerDiedError(f"{reason}; {self._wait_describe()}"))
            self.job.stop(grace=2.0)  # nothing may outlive a dead job
        else:
            self._die(ExecutorDeadError("the executor was shut down"))

    def _settle(self, call_id: int, error, value) -> None:
        with self._cv:
            call = self._calls.pop(call_id, None)
        if call is None:
            return
        if error is not None:
            kind, message = error
            call.error = getattr(errors, kind, None)
            call.error = (call.error if isinstance(call.error, type) and issubclass(call.error, errors.LLMAPIError)
                          else errors.ExecutorError)(message)
        call.value = value
        call.done.set()

    def _die(self, error: BaseException) -> None:
        with self._cv:
            if self._dead is not None:
                return
            self._dead = error
            calls, self._calls = list(self._calls.values()), {}
            self._cv.notify_all()
        if isinstance(error, WorkerDiedError):
            logger.error("%s", error)
        for call in calls:
            call.error = error
            call.done.set()

    def _raise_dead(self):
        error = self._dead
        raise type(error)(str(error))

    # ------------------------------------------------------------------ the executor interface
    def _call(self, kind: str, *args):
        with self._cv:
            if self._dead is not None:
                self._raise_dead()
            call_id = next(self._ids)
            call = self._calls[call_id] = _Call()
        try:
            with self._send_lock:
                self._conn.send((kind, call_id) + args)
        except OSError:
            pass  # the reader sees the closed connection and settles the call
        call.done.wait()
        if call.error is not None:
            raise type(call.error)(str(call.error))
        return call.value

    def enqueue(self, request) -> int:
        return self._send_requests([request])[0]

    def enqueue_many(self, requests) -> list:
        return self._send_requests(list(requests))

    def _send_requests(self, requests: list) -> list:
        """Enqueue `requests` (with their logits processors) on rank 0 without waiting for it: each is checked
        here against the executor's rules first (RequestError, as Executor.enqueue raises it), all or nothing,
        and a request rank 0 refuses after all ends with an "error" response. A round trip per request would
        wait on rank 0's interpreter lock, which its engine holds for a step's host work: a server's requests
        would queue behind the steps. They stay pending for the watchdog until their last response."""
        with self._cv:
            if self._dead is not None:
                self._raise_dead()
        for request in requests:
            _core.Scheduler.check_request(self._config, request)
        ids = [r.request_id for r in requests]
        processors = {rid: self.processors[rid] for rid in ids if rid in self.processors}
        payload = [channel.request_fields(r) for r in requests]
        self._outstanding.update(ids)
        try:
            with self._send_lock:
                self._conn.send(("enqueue_many", None, payload, processors))
        except OSError:
            pass  # the reader sees the closed connection: every pending request fails with WorkerDiedError
        return ids

    def queue_adapter(self, install) -> None:
        """An adapter (llmapi.lora.runtime.AdapterInstall) for rank 0 to hand every rank before its next step;
        returns once rank 0 has it, so a request enqueued after this finds it installed."""
        self._call("adapter", install.to_bytes())

    def abort(self, request_id: int, seq_index: int = -1) -> None:
        if self._dead is not None:
            return
        try:
            with self._send_lock:
                self._conn.send(("abort", request_id, seq_index))
        except OSError:
            pass

    def stats(self) -> dict:
        return self._call("stats")

    def runner_stats(self) -> dict:
        """Rank 0's DistributedRunner.runner_stats(): its steps, the order of their submit and collect, and its
        runner's stats."""
        return self._call("runner_stats")

    def await_responses(self, timeout_s: Optional[float] = None) -> list:
        with self._cv:
            self._cv.wait_for(lambda: self._responses or self._dead is not None, timeout_s)
            if self._responses:
                out, self._responses = self._responses, []
                return out
            if self._dead is not None:
                self._raise_dead()
            return []

    def shutdown(self) -> None:
        """Ask rank 0 to stop every rank, wait for the job to end, and kill whatever is left. Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._conn is not None and self._dead is None:
            try:
                with self._send_lock:
                    self._conn.send(("shutdown",))
            except OSError:
                pass
        clean = self._dead is None
        # A job that never connected (the engine failed to build) has nothing to finish: stop it now.
        self.job.stop(grace=10.0 if self._conn is not None else 0.0)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        self._die(ExecutorDeadError("the executor was shut down"))
        for closeable in (self._conn, self._listener):
            try:
                if closeable is not None:
                    closeable.close()
            except OSError:
                pass
        if clean and self.job.proc.returncode == 0:
            self.job.remove_log()
        self._board.close()

    # ------------------------------------------------------------------ the step watchdog's probe
    def busy(self) -> bool:
        """Requests or calls pending on a live job."""
        return bool(self._outstanding or self._calls) and self._dead is None and not self._closing

    def check_stall(self, timeout: float) -> Optional[StepTimeoutError]:
        """A StepTimeoutError naming the stalled rank once nothing progressed for `timeout` seconds while
        something was pending, else None (see the class docstring)."""
        if self._reader is None or not self.busy():
            self._progress_at = None
            return None
        now = time.monotonic()
        try:
            beats = self._board.read()
        except ValueError:  # shut down meanwhile: the board is closed
            return None
        marker = (self._responses_seen, beats[0][2])  # rank 0's finished runner calls
        if self._progress_at is None or marker != self._progress_marker:
            self._progress_at, self._progress_marker = now, marker
            return None
        stalled = now - self._progress_at
        if stalled <= timeout:
            return None
        pids = self.rank_pids
        named = stalled_ranks(pids, beats, timeout) or (
            f"rank 0 (pid {pids[0]}) made no progress, though every rank's heartbeat is live")
        return StepTimeoutError(
            f"no step finished for {stalled:.1f} s with requests pending, longer than step_timeout={timeout:g} s: "
            f"{named}. Every pending request fails, the MPI job is killed (log {self.job.log_path}) and the LLM "
            "is dead")

    def unstick(self, error) -> None:
        """After a stall: every call raises `error`, and the job is killed (stopped ranks included)."""
        self._die(error)
        self.job.kill()

    def stuck(self) -> bool:
        return False  # after unstick() nothing is left running

    def on_loop_thread(self) -> bool:
        return False
