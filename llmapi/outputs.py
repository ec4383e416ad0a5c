"""RequestOutput / CompletionOutput: a request's result, usable as a future and as a stream."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union


@dataclass
class Logprob:
    """A token's log-probability under the model (raw log-softmax of its logits) and its rank
    (1 = most likely), as vLLM reports them."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


TokenLogprobs = Dict[int, Logprob]
"""The top-k tokens of one position, plus the token actually there (if not among them)."""


@dataclass
class CompletionOutput:
    """One generated sequence."""

    index: int = 0
    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    """None while running; then "stop", "length", "abort" or "error"."""
    stop_reason: Optional[Union[int, str]] = None
    """The stop token id or stop string that ended the sequence, if any."""
    text_diff: str = ""
    """Text added since the previous streamed update."""
    token_ids_diff: List[int] = field(default_factory=list)
    """Token ids added since the previous streamed update."""
    cumulative_logprob: Optional[float] = None
    """Sum of the generated tokens' logprobs (beam search: of the processed ones that rank beams);
    set when logprobs were asked for, for n / best_of > 1, and for beam search."""
    logprobs: Optional[List[TokenLogprobs]] = None
    """With SamplingParams.logprobs: one entry per generated token."""
    generation_logits: Optional[Any] = None
    """With return_generation_logits: [tokens, vocab] float32 tensor of the raw logits sampled from."""

    @property
    def length(self) -> int:
        return len(self.token_ids)


@dataclass
class SpeculativeDecodingMetrics:
    """A request's speculative decoding so far (TensorRT-LLM's names): draft tokens verified, and accepted."""

    total_draft_tokens: int = 0
    total_accepted_draft_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts per drafted token (0.0 before any draft)."""
        return self.total_accepted_draft_tokens / self.total_draft_tokens if self.total_draft_tokens else 0.0


@dataclass
class RequestMetrics:
    """Per-request metrics of a RequestOutput."""

    speculative_decoding: Optional[SpeculativeDecodingMetrics] = None
    """Set when the LLM decodes speculatively (LLM(speculative_config=...))."""


@dataclass
class _Update:
    seq_index: int
    token_ids: List[int]
    text: str


class RequestOutput:
    """The result of one request. `await` it, call `.result(timeout)`, or iterate it to stream:
    `async for out in llm.generate_async(p, streaming=True)` (or a plain `for`) yields this object
    after each update with each output's `text_diff` / `token_ids_diff` set to what that update added.

    `outputs` holds one CompletionOutput per sequence (n of them; best_of > n and beam search
    report only at the end); once finished, they are ordered best first by cumulative logprob."""

    def __init__(self, request_id: int, prompt: Optional[str], prompt_token_ids: List[int],
                 abort_fn: Optional[Callable[[int], None]] = None, streaming: bool = True,
                 num_sequences: int = 1):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.encoder_prompt: Optional[str] = None
        """Encoder-decoder models: the encoder prompt's text (None when it was given as ids); prompt /
        prompt_token_ids are then the decoder prompt's."""
        self.encoder_prompt_token_ids: Optional[List[int]] = None
        """Encoder-decoder models: the encoder input's token ids."""
        self.outputs = [CompletionOutput(index=i) for i in range(num_sequences)]
        self.prompt_logprobs: Optional[List[Optional[TokenLogprobs]]] = None
        """With SamplingParams.prompt_logprobs: None for the first prompt token, then one entry each."""
        self.context_logits: Optional[Any] = None
        """With return_context_logits: [prompt, vocab] float32 tensor, the logits at each prompt position."""
        self.finished = False
        self.num_cached_tokens = 0
        self.metrics: Optional[RequestMetrics] = None
        """Per-request metrics: speculative decoding's draft and accepted token counts."""
        self.error: Optional[BaseException] = None
        self._abort_fn = abort_fn
        self._streaming = streaming  # False: iteration yields once, when the request finishes
        self._cond = threading.Condition()
        self._pending: deque = deque()  # updates not yet handed out by the stream
        self._async_waiters: list = []  # (loop, future) pairs woken by the next update

    # ---- called by the LLM's response thread ----
    def _add(self, token_ids: List[int], text: str, finish_reason: Optional[str] = None,
             stop_reason=None, error: Optional[BaseException] = None, seq_index: int = 0,
             logprobs: Optional[List[TokenLogprobs]] = None, cumulative_logprob: Optional[float] = None,
             request_finished: Optional[bool] = None) -> None:
        """Append to sequence `seq_index`; finish it with `finish_reason` (the whole request too,
        unless request_finished says otherwise)."""
        if request_finished is None:
            request_finished = finish_reason is not None
        with self._cond:
            if self.finished:
                return
            out = self.outputs[seq_index]
            out.token_ids.extend(token_ids)
            out.text += text
            if logprobs is not None:
                out.logprobs = (out.logprobs or []) + list(logprobs)
            if cumulative_logprob is not None:
                out.cumulative_logprob = cumulative_logprob
            news = self._streaming and bool(token_ids or text)
            if news:
                self._pending.append(_Update(seq_index, list(token_ids), text))
            if finish_reason is not None and out.finish_reason is None:
                out.finish_reason = finish_reason
                out.stop_reason = stop_reason
            if error is not None:
                self.error = error
            if request_finished:
                self._finish_locked(finish_reason)
            if not (news or request_finished):
                return  # every waiter waits for an update or the finish: none to wake
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_set_done, fut)

    def _finish_locked(self, finish_reason: Optional[str]) -> None:
        for out in self.outputs:
            if out.finish_reason is None:
                out.finish_reason = finish_reason
        if not self._streaming:
            for out in self.outputs:
                self._pending.append(_Update(out.index, list(out.token_ids), out.text))
        self.finished = True

    def _rank_outputs(self, keep: int) -> None:
        """Order the outputs best first by cumulative logprob and keep `keep` of them."""
        with self._cond:
            ranked = sorted(self.outputs, key=lambda o: -(o.cumulative_logprob if o.cumulative_logprob
                                                          is not None else float("-inf")))
            self.outputs = ranked[:keep]

    # ---- the future ----
    def abort(self) -> None:
        """Stop this request; it finishes with finish_reason "abort" and keeps what it generated."""
        if not self.finished and self._abort_fn is not None:
            self._abort_fn(self.request_id)

    def done(self) -> bool:
        return self.finished

    def result(self, timeout: Optional[float] = None) -> "RequestOutput":
        """Block until the request finishes (raises TimeoutError after `timeout` seconds)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.finished, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
        return self._final()

    async def aresult(self) -> "RequestOutput":
        await self._wait_async(lambda: self.finished)
        return self._final()

    def __await__(self):
        return self.aresult().__await__()

    def _final(self) -> "RequestOutput":
        if self.error is not None:
            raise self.error
        for out in self.outputs:
            out.text_diff, out.token_ids_diff = out.text, list(out.token_ids)
        return self

    async def _wait_async(self, ready: Callable[[], bool]) -> None:
        """Wait without blocking the event loop until `ready()` holds (checked under the lock)."""
        loop = asyncio.get_running_loop()
        while True:
            fut = loop.create_future()
            with self._cond:
                if ready():
                    return
                self._async_waiters.append((loop, fut))
            await fut

    # ---- streaming ----
    def _take(self) -> Optional["RequestOutput"]:
        """Merge the pending updates into the diff fields; None when the stream is over."""
        with self._cond:
            if not self._pending:
                if self.finished:
                    if self.error is not None:
                        raise self.error
                    return None
                return self
            ups = list(self._pending)
            self._pending.clear()
        by_index = {out.index: out for out in self.outputs}
        for out in self.outputs:
            out.token_ids_diff, out.text_diff = [], ""
        for u in ups:
            out = by_index.get(u.seq_index)
            if out is not None:
                out.token_ids_diff = out.token_ids_diff + u.token_ids
                out.text_diff += u.text
        return self

    def __aiter__(self):
        return self

    async def __anext__(self) -> "RequestOutput":
        await self._wait_async(lambda: bool(self._pending) or self.finished)
        item = self._take()
        if item is None:
            raise StopAsyncIteration
        return item

    def __iter__(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending) or self.finished)
            item = self._take()
            if item is None:
                return
            yield item

    def __repr__(self) -> str:
        o = self.outputs[0]
        return (f"RequestOutput(request_id={self.request_id}, finished={self.finished}, "
                f"text={o.text!r}, token_ids={o.token_ids}, finish_reason={o.finish_reason!r})")


def _set_done(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


__all__ = ["CompletionOutput", "Logprob", "RequestOutput", "TokenLogprobs", "RequestMetrics",
           "SpeculativeDecodingMetrics"]
