"""The step watchdog: a step that makes no progress for `step_timeout` seconds fails every pending request with
StepTimeoutError naming the stalled rank (or the request whose logits processor hung), and the LLM dies instead
of waiting forever. Also the ranks' heartbeats, through which a spawned job's stalled rank is named."""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
import tempfile
import threading
import time
import weakref
from typing import Callable, List, Optional, Sequence

from ..errors import StepTimeoutError

logger = logging.getLogger(__name__)

GIVE_UP_S = 1.0  # how long shutdown() waits for a loop thread still stuck in the step the watchdog gave up on
BEAT_S = 0.25  # a rank's heartbeat period
STALE_S = 2.0  # a heartbeat older than this: the rank does not run (stopped, or frozen holding the GIL)
HEARTBEAT_ENV = "LLMAPI_HEARTBEAT_FILE"


def poll_interval(timeout: float) -> float:
    return min(1.0, timeout / 4)


class StepAbandoned(BaseException):
    """Raised inside the executor's loop thread (PyThreadState_SetAsyncExc) in the step the watchdog gave up on.
    A BaseException, so that no `except Exception` around a user's logits processor takes it; fatal, so the
    executor stops at once (see _core's runner contract)."""

    fatal = True

    def __str__(self) -> str:
        return "the step watchdog abandoned this step (it ran past step_timeout)"


class StepMarks:
    """Where a rank's runner stands, as the runners keep it in plain attributes: when the current step call
    began (monotonic seconds; 0.0 between calls) and how many calls finished."""

    __slots__ = ("call_started", "calls_done")

    def __init__(self):
        self.call_started, self.calls_done = 0.0, 0


# ---------------------------------------------------------------------------------------------- the watchdog
class StepWatchdog:
    """A daemon thread ("llmapi-watchdog") that asks `probe.check_stall(timeout)` every poll; at the first
    StepTimeoutError it calls `on_stall(error)`, a bound method of the LLM held by weakref.WeakMethod (the
    watchdog keeps no LLM alive), which fails the requests and calls `abandon`.

    `target` is the probe itself (an object with check_stall, busy, unstick, stuck, on_loop_thread: the
    RemoteExecutor of a spawned job) or an in-process runner, watched through its marks (RunnerProbe).
    Idle (no step under way, nothing pending) never trips. The thread ends on `stop()`, after a trip, or
    once the LLM is collected and no step is under way.
    """

    def __init__(self, target, on_stall: Callable[[StepTimeoutError], None], timeout: float):
        self.probe = target if hasattr(target, "check_stall") else RunnerProbe(target)
        self.timeout = float(timeout)
        self.interval = poll_interval(self.timeout)
        self.error: Optional[StepTimeoutError] = None
        self._tripped_at: Optional[float] = None
        self._stopped = False
        self._wake, self._gone = threading.Event(), threading.Event()
        self._on_stall = weakref.WeakMethod(
            on_stall, lambda _, gone=self._gone, wake=self._wake: (gone.set(), wake.set()))
        self._closer: Optional[threading.Thread] = None
        self._close_error: List[BaseException] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="llmapi-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stopped:
                return
            try:
                error = self.probe.check_stall(self.timeout)
            except Exception:  # a bug here must not end the watch silently
                logger.exception("the step watchdog's check failed")
                if self._gone.is_set():
                    return
                continue
            if error is None:
                if self._gone.is_set() and not self.probe.busy():
                    return
                continue
            self.error, self._tripped_at = error, time.monotonic()
            logger.error("%s", error)
            handler = self._on_stall()
            try:
                if handler is not None:
                    handler(error)  # the LLM: fails its requests, marks itself dead, then abandon()
                else:
                    self.probe.unstick(error)  # the LLM is gone; its close waits on this step
            except Exception:
                logger.exception("the LLM's stall handler failed")
            return

    def abandon(self, close: Callable[[], None]) -> None:
        """After a trip: unstick the step (an exception raised in the loop thread, or the MPI job killed), then
        run `close` (the LLM's finalizer) in a helper thread; returns at once."""
        self.probe.unstick(self.error)
        self._start_closer(close)

    def close(self, close: Callable[[], None]) -> None:
        """Run `close` (the LLM's finalizer) and wait for it, but not forever: once the watchdog has given up on
        a step whose loop thread is still stuck (a C call that never returns), wait GIVE_UP_S more, then leave
        that thread behind with a warning. Then stop watching."""
        if self.probe.on_loop_thread():  # shutdown() from inside a step: the executor only asks its loop to stop
            try:
                close()
            finally:
                self.stop()
            return
        closer = self._start_closer(close)
        try:
            while closer.is_alive():
                closer.join(0.1)
                if (closer.is_alive() and self._tripped_at is not None and self.probe.stuck()
                        and time.monotonic() - self._tripped_at > GIVE_UP_S):
                    logger.warning("the executor's loop thread is still stuck in the step abandoned after "
                                   "step_timeout=%g s; shutdown() leaves it behind (%s)", self.timeout, self.error)
                    break
        finally:
            self.stop()
        if self._close_error:
            raise self._close_error.pop()

    def _start_closer(self, close: Callable[[], None]) -> threading.Thread:
        with self._lock:
            if self._closer is None:
                def run():
                    try:
                        close()
                    except BaseException as e:  # handed to the thread that waits in close()
                        self._close_error.append(e)
                self._closer = threading.Thread(target=run, name="llmapi-close", daemon=True)
                self._closer.start()
            return self._closer

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)


class RunnerProbe:
    """Watches an in-process runner (the ModelRunner at world size 1; rank 0's DistributedRunner under
    llmapi-launch) through the marks its submit and collect keep: `call_started` (monotonic seconds, 0.0
    between calls), `loop_thread` (the executor's loop thread), and the request whose logits processor runs
    (`state.processor_request`). Holds the runner by weakref."""

    def __init__(self, runner):
        self._runner = weakref.ref(runner)
        self._tripped_call = 0.0

    def busy(self) -> bool:
        runner = self._runner()
        return runner is not None and bool(runner.call_started)

    def check_stall(self, timeout: float) -> Optional[StepTimeoutError]:
        runner = self._runner()
        started = 0.0 if runner is None else runner.call_started
        ran = time.monotonic() - started
        if not started or ran <= timeout:
            return None
        self._tripped_call = started
        rid = getattr(getattr(runner, "state", None), "processor_request", None)
        if rid is not None:
            what = f"the logits_processor of request {rid} has run for {ran:.1f} s"
        else:
            what = f"rank 0 (pid {os.getpid()}, this process) has been in one step for {ran:.1f} s"
        detail = runner.stall_detail() if hasattr(runner, "stall_detail") else ""
        return StepTimeoutError(f"{what}, longer than step_timeout={timeout:g} s{detail}. Every pending request "
                                "fails and the LLM is dead")

    def stuck(self) -> bool:
        """Whether the call the watchdog tripped on still runs."""
        runner = self._runner()
        return runner is not None and runner.call_started == self._tripped_call != 0.0

    def on_loop_thread(self) -> bool:
        runner = self._runner()
        return (runner is not None and bool(runner.call_started)
                and getattr(runner, "loop_thread", None) == threading.get_ident())

    def unstick(self, error) -> None:
        """Raise StepAbandoned in the loop thread if it is still in the call the watchdog tripped on: a
        Python-level loop stops at once; a C call (time.sleep, a collective) only when it returns."""
        runner = self._runner()
        if runner is None or not self.stuck():
            return
        thread_id = ctypes.c_ulong(runner.loop_thread)
        set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
        if set_async_exc(thread_id, ctypes.py_object(StepAbandoned)) > 1:
            set_async_exc(thread_id, None)  # as documented: more than one thread state got it, undo


# ---------------------------------------------------------------------------------------------- heartbeats
_SLOT = struct.Struct("<dddd")  # beat (monotonic s), call started (0.0 between calls), calls done, pid


class Heartbeats:
    """A small shared file, one slot per rank of a spawned job (all on this host, so monotonic clocks agree).
    Each rank's "llmapi-heartbeat" thread writes its slot every BEAT_S seconds: the time, and its runner's
    marks. A stopped or frozen rank's beat goes stale; a rank inside a collective keeps beating."""

    def __init__(self, path: str, world_size: int, owner: bool):
        self.path, self.world_size, self._owner = path, world_size, owner
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), world_size * _SLOT.size)

    @classmethod
    def create(cls, world_size: int) -> "Heartbeats":
        """The user's process: a zeroed file in /dev/shm (else the temporary directory)."""
        folder = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        fd, path = tempfile.mkstemp(prefix="llmapi-heartbeats-", dir=folder)
        try:
            os.write(fd, bytes(world_size * _SLOT.size))
        finally:
            os.close(fd)
        return cls(path, world_size, owner=True)

    def read(self) -> List[tuple]:
        """(beat, call_started, calls_done, pid) of every rank; a rank that never beat has beat 0.0."""
        return [_SLOT.unpack_from(self._map, r * _SLOT.size) for r in range(self.world_size)]

    def beat(self, rank: int, marks) -> None:
        _SLOT.pack_into(self._map, rank * _SLOT.size, time.monotonic(), marks.call_started, marks.calls_done,
                        os.getpid())

    def close(self) -> None:
        try:
            self._map.close()
        except (BufferError, ValueError):
            pass
        if self._owner:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def start_heartbeat(rank: int, marks) -> None:
    """In a rank of a spawned job: a daemon thread beating `marks` into this rank's slot of the file named by
    $LLMAPI_HEARTBEAT_FILE, for the life of the process. Nothing without it (llmapi-launch)."""
    path = os.environ.get(HEARTBEAT_ENV)
    if not path:
        return
    board = Heartbeats(path, os.path.getsize(path) // _SLOT.size, owner=False)

    def run():
        while True:
            board.beat(rank, marks)
            time.sleep(BEAT_S)

    threading.Thread(target=run, name="llmapi-heartbeat", daemon=True).start()


# ---------------------------------------------------------------------------------------------- naming a rank
def process_state(pid: int) -> str:
    """The state letter in /proc/<pid>/stat ("R", "S", "T" stopped, "Z", ...), "" if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def stalled_ranks(pids: Sequence[int], beats: Optional[Sequence[tuple]] = None, timeout: float = 0.0) -> str:
    """Which ranks hold a step up, "" if none can be told: stopped processes (/proc state T), then ranks
    whose heartbeat is stale, then (all beating: a collective that never completes) the ranks still inside
    their step call after `timeout` seconds."""
    now = time.monotonic()
    stopped = [f"rank {r} (pid {p})" for r, p in enumerate(pids) if process_state(p) in ("T", "t")]
    if stopped:
        return f"{', '.join(stopped)} {'is' if len(stopped) == 1 else 'are'} stopped (process state T, e.g. SIGSTOP)"
    if not beats:
        return ""
    stale = [f"rank {r} (pid {p}) has not run for {now - b[0]:.1f} s" if b[0] else f"rank {r} (pid {p}) never beat"
             for r, (p, b) in enumerate(zip(pids, beats)) if not b[0] or now - b[0] > STALE_S]
    if stale:
        return f"{', '.join(stale)} (its heartbeat stopped)"
    inside = [f"rank {r} (pid {p})" for r, (p, b) in enumerate(zip(pids, beats)) if b[1] and now - b[1] > timeout]
    if inside:
        return (f"{', '.join(inside)} {'has' if len(inside) == 1 else 'have'} not finished the current step (every "
                "rank's heartbeat is live: a collective that never completes?)")
    return ""
