"""uvicorn around the app: a SIGINT/SIGTERM drains the requests in flight before the server stops; a thread
runner for tests and notebooks."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from typing import Optional

import uvicorn

_GRACE_S = 10.0  # after the drain's abort: how long the aborted streams get to end before uvicorn cancels them


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain: on the first SIGINT/SIGTERM it stops accepting connections, lets the
    requests in flight finish for up to `drain_timeout` seconds, aborts the rest (their streams end with
    finish_reason "abort") and returns; a second signal stops at once. The LLM is the caller's to shut down."""

    def __init__(self, app, drain_timeout: float = 30.0, **config):
        config.setdefault("timeout_graceful_shutdown", int(drain_timeout + _GRACE_S))
        super().__init__(uvicorn.Config(app, workers=1, **config))
        self.state = app.state.serve
        self.drain_timeout = drain_timeout

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own version raises the signal again once serving ends, which would kill the process before
        # the LLM shuts down its ranks: the handlers here only ask the server to stop.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        drain = asyncio.ensure_future(self.state.drain(self.drain_timeout))
        try:
            await super().shutdown(sockets)
        finally:
            drain.cancel()

    @property
    def port(self) -> Optional[int]:
        """The port bound (useful with port=0)."""
        for server in self.servers:
            for sock in server.sockets:
                return sock.getsockname()[1]
        return None


class ServerThread:
    """Serve an app on a background thread: `with ServerThread(app) as url: ...` (port 0: a free port).
    Leaving the block drains and stops the server (not the LLM)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, drain_timeout: float = 5.0, **config):
        config.setdefault("log_level", "warning")
        self.server = DrainingServer(app, drain_timeout=drain_timeout, host=host, port=port, **config)
        self.thread: Optional[threading.Thread] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None  # the server's loop, once it runs

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve()

    def __enter__(self) -> str:
        self.thread = threading.Thread(target=self._run, name="llmapi-serve", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped before serving (see its log)")
            self.thread.join(0.02)
        return f"http://{self.server.config.host}:{self.server.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(self.server.drain_timeout + _GRACE_S + 5)
