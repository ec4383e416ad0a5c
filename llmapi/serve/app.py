"""The FastAPI app: routes, the API key, OpenAI-style errors, backpressure and draining."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Set

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..outputs import RequestOutput
from .metrics import ServerMetrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                       error_body, validation_error)

logger = logging.getLogger("llmapi.serve")

# Paths that need the API key; /health, /version and /metrics stay open (as in vLLM).
_PROTECTED = ("/v1/", "/tokenize", "/detokenize")
_HEALTH_TIMEOUT_S = 10.0


@dataclass
class ServeConfig:
    """What `llmapi serve` adds to the LLM: names, access, limits."""

    served_model_name: str
    """The model id clients send and /v1/models lists."""
    api_key: Optional[str] = None
    """When set, /v1/*, /tokenize and /detokenize need `Authorization: Bearer <api_key>`."""
    chat_template: Optional[str] = None
    """A Jinja chat template used instead of the tokenizer's own."""
    max_pending: int = 4096
    """Most requests handed to the LLM and not finished; beyond it a request gets 503 with Retry-After."""
    stream_interval: float = 0.0
    """Seconds a stream waits after each chunk, so that the next carries every token made meanwhile
    (0: a chunk per engine update). Fewer, larger chunks leave more of the process to the engine."""
    lora_modules: Dict[str, Any] = field(default_factory=dict)
    """LoRA adapters served as models of their own: name -> LoRARequest (a request's `model` naming one runs
    with it, as vLLM's --lora-modules)."""

    def __post_init__(self):
        if not isinstance(self.max_pending, int) or self.max_pending < 1:
            raise ValueError(f"max_pending={self.max_pending!r} is invalid: must be an int >= 1")
        if not isinstance(self.stream_interval, (int, float)) or not 0 <= self.stream_interval <= 10:
            raise ValueError(f"stream_interval={self.stream_interval!r} is invalid: must be seconds in [0, 10]")


class ServerState:
    """One LLM behind the app: the requests in flight (for backpressure, draining and aborts) and metrics."""

    def __init__(self, llm, config: ServeConfig):
        self.llm, self.config = llm, config
        self.created = int(time.time())
        self.metrics = ServerMetrics(config.served_model_name, llm.get_stats, getattr(llm, "num_kv_blocks", 0))
        self.live: Set[RequestOutput] = set()
        self.draining = False
        self.idle = asyncio.Event()  # set while nothing is in flight; made on the loop that serves
        self.idle.set()

    @property
    def pending(self) -> int:
        return len(self.live)

    def admit(self, count: int) -> None:
        """503 when `count` more requests would pass max_pending, or when the server is draining."""
        if self.draining:
            self.metrics.rejected.inc()
            raise APIError("the server is shutting down", status=503, type="service_unavailable")
        if self.pending + count > self.config.max_pending:
            self.metrics.rejected.inc()
            raise APIError(f"the server is overloaded: {self.pending} requests pending (--max-pending "
                           f"{self.config.max_pending}); retry later", status=503, type="server_overloaded")

    def track(self, out: RequestOutput) -> None:
        self.live.add(out)
        self.idle.clear()
        self.metrics.pending.set(len(self.live))

    def untrack(self, out: RequestOutput) -> None:
        self.live.discard(out)
        self.metrics.pending.set(len(self.live))
        if not self.live:
            self.idle.set()

    def check_model(self, name: Optional[str]):
        """The LoRARequest of the adapter `name` names, or None for the base model; 404 for another name."""
        if name is None or name == self.config.served_model_name:
            return None
        if name in self.config.lora_modules:
            return self.config.lora_modules[name]
        raise APIError(f"The model `{name}` does not exist.", "model", status=404, code="model_not_found")

    async def drain(self, timeout: float) -> None:
        """Let the requests in flight finish for up to `timeout` seconds, then abort the rest: their streams
        end with finish_reason "abort"."""
        self.draining = True
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except asyncio.TimeoutError:
            logger.warning("drain timeout: aborting %d requests", len(self.live))
            for out in list(self.live):
                out.abort()

    def alive(self) -> bool:
        try:
            self.llm.get_stats()  # raises once the LLM is dead (a rank died, a stalled step) or shut down
            return True
        except Exception:
            return False


class _ApiKey:
    """ASGI middleware: 401 on the protected paths without `Authorization: Bearer <key>`."""

    def __init__(self, app, key: str):
        self.app, self._expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(_PROTECTED):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self._expected):
                response = JSONResponse(error_body("invalid or missing API key (Authorization: Bearer ...)",
                                                   type="invalid_request_error", code="invalid_api_key"),
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error_response(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def create_app(llm, config: ServeConfig) -> FastAPI:
    """The OpenAI-compatible app over `llm` (one LLM per app; uvicorn with one worker)."""
    from . import completions

    app = FastAPI(title="llmapi", version=__version__)
    state = app.state.serve = ServerState(llm, config)
    if config.api_key:
        app.add_middleware(_ApiKey, key=config.api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return _error_response(validation_error(list(e.errors())))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):  # a bug in one request answers 500, nothing more
        logger.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", type="internal_error"),
                            status_code=500)

    @app.get("/health")
    async def health():
        # On a thread, with a bound: with several ranks the stats are a call to rank 0.
        try:
            alive = await asyncio.wait_for(asyncio.to_thread(state.alive), _HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            alive = False
        return Response(status_code=200 if alive and not state.draining else 503)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        body = await asyncio.to_thread(state.metrics.render)  # reads the executor's stats
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": config.served_model_name, "object": "model", "created": state.created, "owned_by": "llmapi",
            "root": str(llm.args.model), "max_model_len": llm.max_seq_len}] + [{
            "id": name, "object": "model", "created": state.created, "owned_by": "llmapi", "root": lora.lora_path,
            "parent": config.served_model_name, "max_model_len": llm.max_seq_len}
            for name, lora in config.lora_modules.items()]}

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request):
        return await completions.complete(state, body, request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        return await completions.chat(state, body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        state.check_model(body.model)
        body.check()
        tok = _tokenizer(llm)
        if body.messages is not None:
            ids = completions.chat_prompt_ids(state, body.messages, body.add_generation_prompt)
        else:
            ids = list(tok.encode(body.prompt, add_special_tokens=body.add_special_tokens))
        return {"count": len(ids), "max_model_len": llm.max_seq_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        state.check_model(body.model)
        tok = _tokenizer(llm)
        bad = [t for t in body.tokens if not 0 <= t < llm.vocab_size]
        if bad:
            raise APIError(f"token id {bad[0]} is not in [0, {llm.vocab_size})", "tokens")
        return {"prompt": tok.decode(body.tokens)}

    return app


def _tokenizer(llm):
    if llm.tokenizer is None:
        raise APIError("this model was loaded without a tokenizer", status=400)
    return llm.tokenizer


__all__ = ["ServeConfig", "ServerState", "create_app"]
