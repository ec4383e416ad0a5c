"""Entry point of every rank of a spawned job (`python -m llmapi.distributed.worker`): library code only,
so the user's script is never re-imported and needs no `if __name__ == "__main__"` guard."""

from __future__ import annotations

import logging
import os
import sys


# The user's sys.path: what imports there (a logits processor's module) imports on the sampling rank too.
SYS_PATH_ENV = "LLMAPI_SYS_PATH"


def extend_sys_path() -> None:
    """Append the user's sys.path entries this rank lacks (after its own, so library code is never shadowed)."""
    for entry in os.environ.get(SYS_PATH_ENV, "").split(os.pathsep):
        if entry and entry not in sys.path:
            sys.path.append(entry)


def setup_rank(rank_hint: str = "?") -> None:
    """Logging tagged with the rank, and torch's CPU threads shared among the ranks of this host."""
    logging.basicConfig(level=os.environ.get("LLMAPI_LOG_LEVEL", "WARNING").upper(), stream=sys.stderr,
                        format=f"[llmapi rank {rank_hint}] %(levelname)s %(name)s: %(message)s")


def limit_threads(local_size: int) -> None:
    import torch

    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_size, 1)))


def main() -> int:
    from llmapi.distributed import channel
    from llmapi.distributed.session import Session

    key = os.environ.pop(channel.KEY_ENV, None)  # only rank 0 uses it; nothing started later inherits it
    session = Session()
    setup_rank(str(session.rank))
    extend_sys_path()
    limit_threads(session.local_size)
    try:
        if session.rank == 0:
            from llmapi.distributed.server import serve_user

            if key is None:
                raise RuntimeError(f"{channel.KEY_ENV} is not set: this module is started by LLM(...), not by hand")
            os.environ[channel.KEY_ENV] = key
            serve_user(session)
        else:
            from llmapi.distributed.rank_worker import serve

            serve(session)
    finally:
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
