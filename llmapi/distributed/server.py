"""Rank 0 of a spawned job: runs the executor and serves the user's process over the authenticated channel."""

from __future__ import annotations

import logging
import os
import threading
import traceback

from llmapi import _core
from llmapi.distributed import channel
from llmapi.distributed.comm import EXIT, ControlChannel
from llmapi.distributed.runner import DistributedRunner
from llmapi.distributed.session import Session
from llmapi.errors import ExecutorDeadError, LLMAPIError
from llmapi.runtime.watchdog import start_heartbeat

logger = logging.getLogger(__name__)


def serve_user(session: Session) -> None:
    """Load the engine on every rank, then take the user's calls until it says shutdown or goes away."""
    conn = channel.connect_from_env()
    try:
        _, init, executor_kwargs = conn.recv()
        runner = DistributedRunner(session, init)
        executor = _core.Executor(_core.ExecutorConfig(num_blocks=runner.num_blocks, **executor_kwargs), runner)
    except Exception as e:  # the error's type and message cross, so the user gets e.g. CorruptEngineError
        conn.send(("dead", traceback.format_exc(), type(e).__name__, str(e)))
        raise
    conn.send(("ready", runner.num_blocks, session.pids))
    start_heartbeat(session.rank, runner)  # the user's process watches its runner calls
    send_lock = threading.Lock()
    stopping = threading.Event()

    def send(msg) -> None:
        with send_lock:
            conn.send(msg)

    def pump() -> None:
        while True:
            try:
                responses = executor.await_responses(0.05)
            except ExecutorDeadError as e:
                if stopping.is_set():
                    return
                # A rank failed: this job is over. Tell the user's process why, and end the job here
                # (the launcher then stops the other ranks).
                logger.error("the executor died: %s", e)
                try:
                    send(("dead", str(e)))
                finally:
                    os._exit(1)
            if responses:
                try:
                    send(("responses", [channel.response_tuple(r) for r in responses]))
                except OSError:
                    return  # the user's process is gone; the main loop sees it too

    pumper = threading.Thread(target=pump, name="llmapi-responses", daemon=True)
    pumper.start()
    try:
        _serve_calls(conn, executor, send)
    finally:
        stopping.set()
        executor.shutdown()
        pumper.join()
        runner.close()
        calls = ControlChannel(session.control)
        calls.send(EXIT)
        calls.flush()
        try:
            send(("bye",))
        except OSError:
            pass
        conn.close()


def _serve_calls(conn, executor, send) -> None:
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            logger.warning("the user's process went away; stopping the job")
            return
        kind = msg[0]
        if kind == "enqueue":
            try:
                executor.enqueue(_core.Request(**msg[2]))
                send(("reply", msg[1], None, msg[2]["request_id"]))
            except LLMAPIError as e:
                send(("reply", msg[1], (type(e).__name__, str(e)), None))
        elif kind == "enqueue_many":
            try:
                ids = executor.enqueue_many([_core.Request(**fields) for fields in msg[2]])
                send(("reply", msg[1], None, list(ids)))
            except LLMAPIError as e:
                send(("reply", msg[1], (type(e).__name__, str(e)), None))
        elif kind == "abort":
            executor.abort(msg[1], msg[2])
        elif kind == "stats":
            send(("reply", msg[1], None, dict(executor.stats())))
        elif kind == "shutdown":
            return
        else:
            raise RuntimeError(f"unknown message {kind!r} from the user's process")
