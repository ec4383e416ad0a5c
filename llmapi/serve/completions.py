"""/v1/completions and /v1/chat/completions: requests into generate_async, outputs into OpenAI's JSON and SSE.

Each prompt becomes one streaming RequestOutput, consumed by the request's own asyncio task. A client that
goes away (a closed stream, or a dropped connection while a non-streamed answer is computed) aborts its
requests in the engine, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import itertools
import secrets
from typing import Any, Callable, Dict, List

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import ExecutorDeadError, GuidedDecodingError, RequestError
from ..outputs import CompletionOutput, RequestOutput
from ..sampling_params import SamplingParams
from .metrics import RequestTimer
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, field_of

logger = logging.getLogger("llmapi.serve")

_MIN_LOGPROB = -9999.0  # JSON has no -inf (vLLM's clamp)
# Response ids: a random prefix per process and a counter (no read of the OS's random source per request).
_ID_PREFIX, _ID_COUNTER = secrets.token_hex(6), itertools.count()


def _response_id(kind: str) -> str:
    return f"{kind}-{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _sse(obj: Any) -> str:
    return f"data: {_json(obj)}\n\n"


def _chunk_writer(rid: str, kind: str, created: int, model: str, include_usage: bool) -> Callable[[dict], str]:
    """The SSE event of one streamed choice: OpenAI's chunk object (usage null until the last, when asked)."""
    def chunk(choice: dict) -> str:
        obj = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
        if include_usage:
            obj["usage"] = None
        return _sse(obj)
    return chunk


def _engine_error(e: BaseException) -> APIError:
    if isinstance(e, ExecutorDeadError):
        return APIError(f"the model is not serving: {e}", status=503, type="service_unavailable")
    if isinstance(e, RequestError):
        return APIError(str(e))
    return APIError(f"{type(e).__name__}: {e}", status=500, type="internal_error")


class _Job:
    """The engine requests of one HTTP request: submitted together, counted against max_pending, aborted
    together when the client goes, settled into the metrics once."""

    def __init__(self, state, prompts: list, params: SamplingParams, prompt_field: str, renamed: Dict[str, str],
                 lora_request=None):
        self.state, self.params = state, params
        self.start = time.perf_counter()
        self.outs: List[RequestOutput] = []
        self.timers: List[RequestTimer] = []
        self.closed = False
        state.admit(len(prompts))
        llm = state.llm
        try:
            for prompt in prompts:
                out = llm.generate_async(prompt, params, streaming=True, lora_request=lora_request)
                self.outs.append(out)
                self.timers.append(RequestTimer(self.start))
                state.track(out)
                state.metrics.enqueued(len(out.prompt_token_ids))
        except GuidedDecodingError as e:  # an invalid schema, regex or grammar: the field that gave it
            self.close()
            raise APIError(str(e), renamed.get("guided_decoding", prompt_field)) from None
        except RequestError as e:
            self.close()
            raise APIError(str(e), prompt_field) from None
        except ValueError as e:
            self.close()
            raise field_of(e, renamed) from None
        except ExecutorDeadError as e:
            self.close()
            raise _engine_error(e) from None
        except BaseException:
            self.close()
            raise
        # Sequences arrive in index order 0..n-1 while they stream; best_of > n reports the n kept at the end.
        self.dense = params.num_sequences == params.n

    def choice_index(self, i: int, out: RequestOutput, o: CompletionOutput) -> int:
        k = o.index if self.dense else out.outputs.index(o)
        return i * self.params.n + k

    def saw(self, i: int, out: RequestOutput) -> None:
        self.timers[i].saw(max(len(o.token_ids) for o in out.outputs))

    def usage(self) -> dict:
        prompt = sum(len(out.prompt_token_ids) for out in self.outs)
        completion = sum(len(o.token_ids) for out in self.outs for o in out.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def close(self) -> None:
        """Abort what is unfinished (the client left, or the server gave up on it) and settle the metrics."""
        if self.closed:
            return
        self.closed = True
        metrics = self.state.metrics
        for out, timer in zip(self.outs, self.timers):
            if not out.finished:
                out.abort()
            reasons = [o.finish_reason for o in out.outputs] if out.finished else ["abort"] * len(out.outputs)
            metrics.finished(timer, reasons, len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs))
            self.state.untrack(out)

    async def results(self, request: Request) -> List[RequestOutput]:
        """Every output once finished; the requests are aborted if the client disconnects meanwhile."""
        async def consume(i: int, out: RequestOutput) -> RequestOutput:
            async for _ in out:
                self.saw(i, out)
            return await out  # raises the request's error

        work = asyncio.ensure_future(asyncio.gather(*(consume(i, out) for i, out in enumerate(self.outs))))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise APIError("the client disconnected", status=499)
            return work.result()
        except APIError:
            raise
        except Exception as e:
            raise _engine_error(e) from None
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
            self.close()

    async def updates(self, render: Callable[[int, RequestOutput], List[str]]):
        """The rendered SSE events of every update of every output, as they come (one string per update);
        then, once each output has finished, render(i, out, final=True)'s. An engine error ends the stream
        with an error event."""
        interval = self.state.config.stream_interval
        if len(self.outs) == 1:
            out = self.outs[0]
            try:
                async for _ in out:
                    self.saw(0, out)
                    events = render(0, out)
                    if events:
                        yield "".join(events)
                    if interval:
                        await asyncio.sleep(interval)
            except Exception as e:
                yield _sse(_engine_error(e).body())
                return
            yield "".join(render(0, out, final=True))
            return
        # Several prompts: one task each, their pieces merged through a queue in arrival order.
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, out: RequestOutput) -> None:
            try:
                async for _ in out:
                    self.saw(i, out)
                    queue.put_nowait(render(i, out))  # rendered now: the diffs change at the next update
                    if interval:
                        await asyncio.sleep(interval)
                queue.put_nowait(render(i, out, final=True))
                queue.put_nowait(None)
            except Exception as e:
                queue.put_nowait(e)

        tasks = [asyncio.ensure_future(pump(i, out)) for i, out in enumerate(self.outs)]
        try:
            left = len(tasks)
            while left:
                item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, Exception):
                    yield _sse(_engine_error(item).body())
                    return
                else:
                    if item:
                        yield "".join(item)
        finally:
            for t in tasks:
                t.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: what comes next is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _EventStream(StreamingResponse):
    """text/event-stream whose end, however it comes (done, client gone, server shutting down), closes the job."""

    def __init__(self, body, job: _Job):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.close()
            try:
                await self.body_iterator.aclose()
            except RuntimeError:  # still running in a task being cancelled: it closes itself
                pass


def _stream(job: _Job, head: Callable[[], List[str]], render, tail: Callable[[], List[str]]) -> _EventStream:
    """The event stream of a job: head()'s events, every update's, tail()'s, then [DONE]. Everything runs
    inside the response, whose end closes the job."""
    async def body():  # one write per update: its events (one per choice) joined
        events = head()
        if events:
            yield "".join(events)
        async for events in job.updates(render):
            yield events
        yield "".join(tail()) + "data: [DONE]\n\n"

    return _EventStream(body(), job)


def _lp(value: float) -> float:
    return max(value, _MIN_LOGPROB)


# ---------------------------------------------------------------------------------------------- /v1/completions
def _completion_logprobs(entries, token_ids: List[int], offset: int) -> dict:
    """OpenAI's legacy logprobs object; each position's top_logprobs holds the token and its top k (vLLM)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries):
        if entry is None:  # the first prompt token has no logprob
            tokens.append(None)
            token_logprobs.append(None)
            top.append(None)
            offsets.append(offset)
            continue
        token = entry[tid].decoded_token or ""
        tokens.append(token)
        token_logprobs.append(_lp(entry[tid].logprob))
        top.append({(e.decoded_token or ""): _lp(e.logprob) for e in entry.values()})
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


async def complete(state, body: CompletionRequest, request: Request):
    llm = state.llm
    lora = state.check_model(body.model)  # a LoRA adapter's name runs with it
    body.check(has_tokenizer=llm.tokenizer is not None)
    _log_ignored(body)
    params = body.sampling_params(llm.get_default_sampling_params())
    job = _Job(state, body.prompts(), params, "prompt", body.renamed(), lora)
    rid, created = _response_id("cmpl"), int(time.time())
    model = lora.lora_name if lora is not None else state.config.served_model_name

    def prompt_text(out: RequestOutput) -> str:
        return out.prompt if out.prompt is not None else llm.tokenizer.decode(out.prompt_token_ids)

    def choice(index: int, text: str, logprobs=None, finish=None, stop=None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop}

    if not body.stream:
        outs = await job.results(request)
        choices = []
        for i, out in enumerate(outs):
            for o in out.outputs:
                head = prompt_text(out) if body.echo else ""
                lps = None
                if body.logprobs is not None:
                    lps = _completion_logprobs(o.logprobs or [], o.token_ids, len(head))
                    if body.echo:
                        pre = _completion_logprobs(out.prompt_logprobs or [], out.prompt_token_ids, 0)
                        lps = {k: pre[k] + lps[k] for k in lps}
                choices.append(choice(job.choice_index(i, out, o), head + o.text, lps, o.finish_reason,
                                      o.stop_reason))
        choices.sort(key=lambda c: c["index"])
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": choices, "usage": job.usage()})

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    sent: Dict[int, int] = {}  # choice index -> tokens whose logprobs were sent
    offsets: Dict[int, int] = {}
    chunk = _chunk_writer(rid, "text_completion", created, model, include_usage)

    def render(i: int, out: RequestOutput, final: bool = False) -> List[str]:
        pieces = []
        for o in out.outputs:
            index = job.choice_index(i, out, o)
            if final:
                pieces.append(chunk(choice(index, "", None, o.finish_reason, o.stop_reason)))
                continue
            if not (o.text_diff or o.token_ids_diff):
                continue
            lps = None
            if body.logprobs is not None:
                start, new = sent.get(index, 0), o.token_ids_diff
                lps = _completion_logprobs((o.logprobs or [])[start:start + len(new)], new, offsets.get(index, 0))
                sent[index] = start + len(new)
                offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lps["tokens"])
            pieces.append(chunk(choice(index, o.text_diff, lps)))
        return pieces

    def echoed() -> List[str]:
        return [chunk(choice(i * params.n + k, prompt_text(out)))
                for i, out in enumerate(job.outs) for k in range(params.n)] if body.echo else []

    def tail() -> List[str]:
        if not include_usage:
            return []
        return [_sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                      "choices": [], "usage": job.usage()})]

    return _stream(job, echoed, render, tail)


# ----------------------------------------------------------------------------------------- /v1/chat/completions
def _chat_logprobs(entries, token_ids: List[int], k: int) -> dict:
    """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [the top k]}]}."""
    def item(e) -> dict:
        token = e.decoded_token or ""
        return {"token": token, "logprob": _lp(e.logprob), "bytes": list(token.encode("utf-8"))}

    content = []
    for tid, entry in zip(token_ids, entries):
        top = sorted((e for e in entry.values() if e.rank is not None and e.rank <= k), key=lambda e: e.rank)
        content.append({**item(entry[tid]), "top_logprobs": [item(e) for e in top]})
    return {"content": content}


def chat_prompt_ids(state, messages, add_generation_prompt: bool) -> List[int]:
    """The chat template applied to `messages` (the server's --chat-template, else the tokenizer's)."""
    llm = state.llm
    template = state.config.chat_template
    if llm.is_encoder_decoder:
        raise APIError("chat completions apply a chat template to a decoder-only model; this model is "
                       "encoder-decoder: use /v1/completions with the text to encode", "messages")
    if llm.tokenizer is None:
        raise APIError("this model was loaded without a tokenizer", "messages")
    if template is None and not getattr(llm.tokenizer, "chat_template", None):
        raise APIError("the model has no chat template: start the server with --chat-template", "messages")
    kwargs = {} if template is None else {"chat_template": template}
    try:
        return llm.chat_token_ids([m.template_dict() for m in messages], add_generation_prompt, **kwargs)
    except Exception as e:  # the template's own raise_exception(), or a message it cannot render
        raise APIError(f"the chat template failed on these messages: {type(e).__name__}: {e}", "messages") from None


async def chat(state, body: ChatCompletionRequest, request: Request):
    llm = state.llm
    lora = state.check_model(body.model)  # a LoRA adapter's name runs with it
    body.check()
    _log_ignored(body)
    params = body.sampling_params(llm.get_default_sampling_params())
    ids = chat_prompt_ids(state, body.messages, body.add_generation_prompt)
    job = _Job(state, [{"prompt_token_ids": ids}], params, "messages",
               {"max_tokens": body.max_tokens_field, "logprobs": "top_logprobs", **body.renamed()}, lora)
    rid, created = _response_id("chatcmpl"), int(time.time())
    model = lora.lora_name if lora is not None else state.config.served_model_name
    k = body.top_logprobs or 0

    if not body.stream:
        (out,) = await job.results(request)
        choices = [{"index": job.choice_index(0, out, o),
                    "message": {"role": "assistant", "content": o.text},
                    "logprobs": _chat_logprobs(o.logprobs or [], o.token_ids, k) if body.logprobs else None,
                    "finish_reason": o.finish_reason, "stop_reason": o.stop_reason} for o in out.outputs]
        choices.sort(key=lambda c: c["index"])
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                             "choices": choices, "usage": job.usage()})

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    sent: Dict[int, int] = {}
    chunk = _chunk_writer(rid, "chat.completion.chunk", created, model, include_usage)

    def render(i: int, out: RequestOutput, final: bool = False) -> List[str]:
        pieces = []
        for o in out.outputs:
            index = job.choice_index(i, out, o)
            if final:
                pieces.append(chunk({"index": index, "delta": {}, "logprobs": None,
                                     "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}))
                continue
            if not (o.text_diff or o.token_ids_diff):
                continue
            lps = None
            if body.logprobs:
                start, new = sent.get(index, 0), o.token_ids_diff
                lps = _chat_logprobs((o.logprobs or [])[start:start + len(new)], new, k)
                sent[index] = start + len(new)
            pieces.append(chunk({"index": index, "delta": {"content": o.text_diff}, "logprobs": lps,
                                 "finish_reason": None}))
        return pieces

    def first() -> List[str]:
        return [chunk({"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None}) for j in range(params.n)]

    def tail() -> List[str]:
        if not include_usage:
            return []
        return [_sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                      "choices": [], "usage": job.usage()})]

    return _stream(job, first, render, tail)


def _log_ignored(body) -> None:
    ignored = body.ignored_fields()
    if ignored:
        logger.warning("ignoring request fields this server does not know: %s", ", ".join(ignored))
