"""`llmapi-launch script.py [args]` (or `python -m llmapi.launch`) under mpirun / srun: rank 0 runs the
script, whose LLM(...) uses the job's ranks; every other rank serves rank 0 until the script ends."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmapi-launch",
        description="Run a script that uses llmapi.LLM(tensor_parallel_size=..., pipeline_parallel_size=...) "
                    "over the ranks of an MPI job: mpirun -n 4 llmapi-launch script.py [args]")
    parser.add_argument("script", help="the Python script rank 0 runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    a = parser.parse_args(argv)

    from llmapi.distributed import session as sessions
    from llmapi.distributed.comm import EXIT, ControlChannel
    from llmapi.distributed.worker import limit_threads, setup_rank

    # As `python script.py` would: the script's directory first, on every rank (a logits processor's module
    # beside the script imports on the sampling rank).
    sys.path.insert(0, os.path.dirname(os.path.abspath(a.script)))
    session = sessions.Session()
    setup_rank(str(session.rank))
    limit_threads(session.local_size)
    if session.rank != 0:
        from llmapi.distributed.rank_worker import serve

        try:
            serve(session)
        finally:
            session.close()
        return 0
    sessions.set_current(session)
    sys.argv = [a.script] + a.args
    try:
        runpy.run_path(a.script, run_name="__main__")
    finally:
        for hook in session.shutdown_hooks:  # LLMs the script left running
            hook()
        sessions.set_current(None)
        if session.broken:  # a stalled rank would never take the exit call: end the whole job
            from mpi4py import MPI

            print(f"llmapi-launch: aborting the MPI job: {session.broken}", file=sys.stderr, flush=True)
            MPI.COMM_WORLD.Abort(1)
        calls = ControlChannel(session.control)
        calls.send(EXIT)
        calls.flush()
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
