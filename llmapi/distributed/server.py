"""Rank 0 of a spawned job: runs the executor and serves the user's process over the authenticated channel.

A request's pickled logits processor comes with it (rank 0 hands it to the sampling rank with the next step);
its logits records (prompt logprobs, context and generation logits) go back with its last response.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback

import torch

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
        # The ranks capture decode graphs for the batch sizes the executor may schedule.
        runner = DistributedRunner(session, dict(init, max_batch_size=executor_kwargs["max_batch_size"]))
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
                    send(("responses", _core.encode_responses(responses), _finished_records(runner, responses)))
                except OSError:
                    return  # the user's process is gone; the main loop sees it too

    pumper = threading.Thread(target=pump, name="llmapi-responses", daemon=True)
    pumper.start()
    try:
        _serve_calls(conn, executor, runner, send)
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


def _finished_records(runner: DistributedRunner, responses) -> dict:
    """{request id: (context logits [P, V] or None, {seq: {output index: logits [V]}}, prompt logprobs)} of the
    requests these responses finish that asked for logits outputs, as numpy arrays and lists (the channel would
    pass torch tensors as shared memory); their processors are dropped."""
    records = {}
    for r in responses:
        if r.request_finished:
            runner.processors.pop(r.request_id, None)
            record, generation, prompt_logprobs = runner.records.take(r.request_id)
            if record is not None or generation:
                context = torch.cat(record.logits).numpy() if record is not None and record.logits else None
                generation = {seq: {i: row.numpy() for i, row in rows.items()} for seq, rows in generation.items()}
                records[r.request_id] = (context, generation, prompt_logprobs)
    return records


def _register(runner: DistributedRunner, requests: list, processors: dict) -> None:
    """Before the executor sees `requests` (their constructor fields): their logits processors (pickled by
    the user's process) and the records of those that asked for logits outputs."""
    for fields in requests:
        rid = fields["request_id"]
        if rid in processors:
            runner.processors[rid] = processors[rid]
        if fields["prompt_logprobs"] >= 0 or fields["context_logits"] or fields["generation_logits"]:
            runner.records.open(rid)


def _unregister(runner: DistributedRunner, requests: list) -> None:
    for fields in requests:
        runner.processors.pop(fields["request_id"], None)
        runner.records.pop(fields["request_id"])


def _serve_calls(conn, executor, runner: DistributedRunner, send) -> None:
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            logger.warning("the user's process went away; stopping the job")
            return
        kind = msg[0]
        if kind == "enqueue_many":  # sent without waiting: the user's process checked them (RemoteExecutor)
            requests = msg[2]
            _register(runner, requests, msg[3])
            try:
                executor.enqueue_many([_core.Request(**fields) for fields in requests])
            except LLMAPIError as e:  # e.g. the executor died meanwhile: each request ends with the error
                _unregister(runner, requests)
                send(("responses", [channel.error_response(f, f"{type(e).__name__}: {e}") for f in requests], {}))
        elif kind == "adapter":
            from llmapi.lora.runtime import AdapterInstall

            runner.queue_adapter(AdapterInstall.from_bytes(msg[2]))
            send(("reply", msg[1], None, None))
        elif kind == "abort":
            executor.abort(msg[1], msg[2])
        elif kind == "stats":
            send(("reply", msg[1], None, dict(executor.stats())))
        elif kind == "runner_stats":
            send(("reply", msg[1], None, runner.runner_stats()))
        elif kind == "shutdown":
            return
        else:
            raise RuntimeError(f"unknown message {kind!r} from the user's process")
