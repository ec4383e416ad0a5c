"""`llmapi serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one LLM.

`create_app(llm, ServeConfig(...))` builds the FastAPI app; `llmapi serve MODEL` (llmapi.serve.cli) starts an LLM
and serves it with uvicorn, draining on SIGINT/SIGTERM. Needs the `serve` extra: pip install "llmapi[serve]".
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str) -> Any:
    # FastAPI loads on first use: `llmapi --help` and the other commands do not import it.
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'llmapi.serve' has no attribute {name!r}")
