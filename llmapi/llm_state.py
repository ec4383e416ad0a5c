"""LLMState: what an LLM owns and must release (executor, runner, live requests, response thread).

It holds no reference to its LLM, so an LLM nobody references any more is collected, and a
`weakref.finalize` on the LLM runs `close` (as `shutdown()` does). The response thread and every
RequestOutput reach this object only, never the LLM.
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any, Dict, Optional

from .errors import ExecutorDeadError, WorkerDiedError, runner_error
from .live_request import LiveRequest

logger = logging.getLogger("llmapi.llm")

_POLL_S = 0.05  # how often the response thread looks at `closed` while nothing arrives


class LLMState:
    """The executor side of one LLM. `executor` and `runner` are set once started; `local` is the
    in-process ModelRunner at world size 1. `processors` takes the requests' logits processors (request id ->
    the callable at one rank, its pickled bytes at several) and `records` keeps their prompt logprobs and
    logits outputs (open(id) before enqueueing, take(id) when finished): the in-process runner's, rank 0's
    DistributedRunner's, or a spawned job's RemoteExecutor's. `adapters` (llmapi.lora.manager.AdapterManager,
    with LoRA or prompt tables) hands a request's adapter slots back when the executor is done with it, and
    holds the requests waiting for a slot."""

    def __init__(self):
        self.executor = None
        self.runner = None
        self.local = None
        self.processors = None
        self.records = None
        self.adapters = None
        self.device = None
        self.live: Dict[int, LiveRequest] = {}
        self.lock = threading.Lock()  # held while requests are enqueued
        self.thread: Optional[threading.Thread] = None
        self.closed = False
        self.death: Optional[BaseException] = None  # why the LLM died (a rank, a stalled step)
        self._close_lock = threading.Lock()

    # ------------------------------------------------------------------ requests
    def abort(self, request_id: int, seq_index: int = -1) -> None:
        """Stop a request (or one of its sequences); a no-op once the LLM is shut down or collected."""
        adapters = self.adapters
        if adapters is not None and seq_index < 0 and adapters.cancel(request_id):
            self.finish(request_id, "abort", None)  # it was waiting for an adapter slot: never enqueued
            return
        executor = self.executor
        if executor is not None and not self.closed:
            executor.abort(request_id, seq_index)

    # ------------------------------------------------------------------ responses
    def start_responses(self) -> None:
        self.thread = threading.Thread(target=self._response_loop, name="llmapi-responses", daemon=True)
        self.thread.start()

    def _response_loop(self) -> None:
        executor = self.executor
        while not self.closed:
            try:
                responses = executor.await_responses(_POLL_S)
            except ExecutorDeadError as e:
                if not self.closed:  # close() settles what is left itself
                    self.fail_all(e)
                    if isinstance(e, WorkerDiedError):
                        self.death = e
                        self.close()  # a multi-rank LLM cannot go on without a rank: stop the rest
                return
            for r in responses:
                try:
                    self._on_response(r)
                except Exception as e:  # a bug here must not leave the request hanging
                    logger.exception("failed to process a response")
                    self.finish(r.request_id, "error", runner_error(str(e)))

    def _on_response(self, r) -> None:
        if r.request_finished and self.adapters is not None:
            self.adapters.release(r.request_id)  # the executor is done with it: its adapter slots may serve others
        live = self.live.get(r.request_id)
        if live is None:
            return
        if live.on_response(r):
            error = runner_error(r.error) if r.finish_reason == "error" else None
            self.finish(r.request_id, r.finish_reason or None, error)

    def finish(self, rid: int, reason, error) -> None:
        if self.adapters is not None:
            self.adapters.cancel(rid)  # no longer waiting for an adapter slot, if it was
        live = self.live.pop(rid, None)
        processors, records = self.processors, self.records
        if processors is not None:
            processors.pop(rid, None)
        taken = records.take(rid) if records is not None else None
        if live is not None:
            try:
                if taken is not None:
                    live.attach_records(*taken)
            finally:
                live.finish(reason, error)

    def fail_all(self, error: BaseException) -> None:
        for rid in list(self.live):
            self.finish(rid, "error", error)

    # ------------------------------------------------------------------ the end
    def close(self) -> None:
        """Stop the executor and the ranks; unfinished requests finish with "abort". Idempotent, from any
        thread (the executor's loop thread and the response thread included)."""
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        executor, self.executor = self.executor, None
        if executor is not None:
            executor.shutdown()
        runner, self.runner = self.runner, None
        if runner is not None and hasattr(runner, "close"):
            runner.close()  # launched mode: the other ranks drop this model and wait for the next one
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        for rid in list(self.live):
            self.finish(rid, "abort", None)
        # Outputs keep this object for their abort(): let go of the model and KV cache now, and hand
        # their GPU memory back for the next LLM or other processes.
        self.local = self.processors = self.records = None
        device: Any = self.device
        if device is not None and device.type == "cuda":
            import torch

            gc.collect()
            torch.cuda.empty_cache()


__all__ = ["LLMState"]
