"""Start the ranks as one MPI job: mpiexec as a child of the user's process, in its own process group."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmapi.errors import LaunchError

logger = logging.getLogger(__name__)

MPIEXEC_ENV = "LLMAPI_MPIEXEC"
WORKER_MODULE = "llmapi.distributed.worker"


def refuse_bare_mpirun() -> None:
    """Under a bare mpirun every rank would run the whole script and start a job of its own: point to the launcher."""
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):  # set in every rank by Open MPI and by MPICH's Hydra
        size = os.environ.get(name, "")
        if size.isdigit() and int(size) > 1:
            raise LaunchError(f"this script runs as one of {size} MPI ranks ({name}={size}); start it with "
                              "`mpirun -n N llmapi-launch script.py` so that rank 0 runs it and the other "
                              "ranks serve the model")


def find_mpiexec() -> Path:
    """$LLMAPI_MPIEXEC, else the mpiexec beside this Python (a venv with the mpich wheel), else one on PATH."""
    if os.environ.get(MPIEXEC_ENV):
        path = Path(os.environ[MPIEXEC_ENV])
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LaunchError(f"{MPIEXEC_ENV}={path} is not an executable file")
        return path
    bins = [Path(sys.executable).parent, Path(sys.prefix) / "bin"]
    for name in ("mpiexec", "mpirun"):
        for folder in bins:
            if (folder / name).is_file() and os.access(folder / name, os.X_OK):
                return folder / name
    for name in ("mpiexec", "mpirun"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise LaunchError("tensor/pipeline parallelism runs its ranks as an MPI job, but no mpiexec was found: "
                      f"`pip install mpich mpi4py` (or install Open MPI), or set {MPIEXEC_ENV}")


@functools.lru_cache(maxsize=8)
def mpi_flavor(mpiexec: Path) -> str:
    """"openmpi" or "mpich" (Hydra, and the default for launchers that do not say)."""
    try:
        out = subprocess.run([str(mpiexec), "--version"], capture_output=True, text=True, timeout=30)
        text = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"{mpiexec} --version failed: {e}") from e
    return "openmpi" if any(s in text for s in ("Open MPI", "OpenRTE", "PRRTE", "prterun")) else "mpich"


def job_command(mpiexec: Path, world_size: int, flavor: str, passed_env: list[str]) -> list[str]:
    cmd = [str(mpiexec), "-n", str(world_size)]
    if flavor == "openmpi":
        # Open MPI binds each rank to one core by default, which starves torch's threads; and it refuses
        # more ranks than slots (cores) unless told.
        cmd += ["--bind-to", "none", "--oversubscribe"]
        for name in passed_env:
            cmd += ["-x", name]  # the value comes from the environment, so the key is not on the command line
    return cmd + [sys.executable, "-m", WORKER_MODULE]


def job_env(mpiexec: Path, flavor: str, extra: dict) -> dict:
    env = dict(os.environ)
    # The launcher starts helpers (hydra_pmi_proxy, prted) found on PATH: put its own bin/ first.
    env["PATH"] = os.pathsep.join([str(mpiexec.parent), env.get("PATH", "")])
    if flavor == "openmpi" and hasattr(os, "geteuid") and os.geteuid() == 0:
        for prefix in ("OMPI", "PRTE"):  # Open MPI 4 reads OMPI_*, Open MPI 5 (PRRTE) PRTE_*
            env[f"{prefix}_ALLOW_RUN_AS_ROOT"] = "1"
            env[f"{prefix}_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env.update(extra)
    return env


class MpiJob:
    """A running `mpiexec -n N python -m llmapi.distributed.worker`; its output goes to a log file."""

    def __init__(self, world_size: int, extra_env: dict):
        mpiexec = find_mpiexec()
        flavor = mpi_flavor(mpiexec)
        passed = sorted(set(extra_env) | {"PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "LLMAPI_CACHE_DIR",
                                          "CUDA_VISIBLE_DEVICES", "OMPI_ALLOW_RUN_AS_ROOT",
                                          "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "LLMAPI_DECODE_GRAPHS_ON_CPU"})
        env = job_env(mpiexec, flavor, extra_env)
        passed = [name for name in passed if name in env]
        fd, self.log_path = tempfile.mkstemp(prefix="llmapi-ranks-", suffix=".log")
        self.command = job_command(mpiexec, world_size, flavor, passed)
        logger.info("starting %d ranks: %s (log %s)", world_size, " ".join(self.command), self.log_path)
        try:
            # A session of its own: the whole job can be signalled as one process group, and a Ctrl-C
            # in the user's terminal reaches the user's process only (it then shuts the job down).
            self.proc = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL, stdout=fd,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            raise LaunchError(f"cannot start {mpiexec}: {e}") from e
        finally:
            os.close(fd)
        self.rank_pids: list[int] = []
        self.segments: set[str] = set()  # MPICH's shared-memory files: see remember_segments

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - chars))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def describe_exit(self) -> str:
        """Why the job ended, with the end of its log."""
        code = self.proc.poll()
        state = "is still running" if code is None else f"exited with code {code}"
        tail = self.log_tail().strip()
        return f"the MPI job {state} (log {self.log_path})" + (f"; its output ends with:\n{tail}" if tail else "")

    def stop(self, grace: float = 10.0) -> None:
        """Wait up to `grace` seconds for the job to end by itself, then terminate it, then kill what is left."""
        deadline = time.monotonic() + grace
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            if not self._anything_left():
                break
            self._signal_all(sig)
            deadline = time.monotonic() + wait
            while self._anything_left() and time.monotonic() < deadline:
                time.sleep(0.05)
        self.proc.poll()
        self._remove_segments()

    def kill(self, wait: float = 5.0) -> None:
        """End the job now: SIGCONT first, so that a stopped process takes the SIGKILL that follows."""
        for sig in (signal.SIGCONT, signal.SIGKILL):
            self._signal_all(sig)
        deadline = time.monotonic() + wait
        while self._anything_left() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.proc.poll()
        self._remove_segments()

    def remember_segments(self) -> None:
        """Note the MPICH shared-memory files the ranks map (once they are up): ranks that are killed cannot
        remove them, so stop() and kill() do, once no rank is left."""
        self.segments = {path for pid in self.rank_pids for path in _mpi_segments(pid)}

    def _remove_segments(self) -> None:
        if self._anything_left():
            return
        for path in self.segments:
            try:
                os.unlink(path)
            except OSError:
                pass  # a rank that exited normally removed it
        self.segments = set()

    def _anything_left(self) -> bool:
        return self.alive() or any(_exists(pid) for pid in self.rank_pids)

    def _signal_all(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # mpiexec leads the group its helpers and ranks inherit
        except ProcessLookupError:
            pass
        for pid in self.rank_pids:  # in case a launcher put a rank in another group
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def remove_log(self) -> None:
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


def _mpi_segments(pid: int) -> set:
    """The MPICH shared-memory files (/dev/shm/mpich_*) that process `pid` maps and nobody removed yet."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return {line.split(None, 5)[5].strip() for line in f
                    if " /dev/shm/mpich_" in line and not line.rstrip().endswith("(deleted)")}
    except (OSError, IndexError):
        return set()


def _exists(pid: int) -> bool:
    """True while `pid` runs (a zombie, already dead but not yet reaped by its parent, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
