"""The on-disk engine cache: one converted engine per (source content, weight settings), built once, checked on load."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmapi.engine import format as fmt
from llmapi.errors import CorruptEngineError, EngineCacheError, EngineLockTimeoutError
from llmapi.hub import ModelSource

logger = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 3600.0  # LlmArgs.cache_lock_timeout's default
LOCK_REPORT_S = 30.0  # a waiter repeats its warning at most this often
SAVE_AGAIN = "save the engine directory again (LLM.save, or llmapi build --output)"


@dataclass
class CacheStats:
    """Counters of this process's cache traffic; tests read `builds` to prove a second LLM converted nothing."""

    builds: int = 0
    hits: int = 0
    rebuilds_after_corruption: int = 0


stats = CacheStats()
_stats_lock = threading.Lock()


def _count(**increments: int) -> None:
    with _stats_lock:
        for name, n in increments.items():
            setattr(stats, name, getattr(stats, name) + n)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """$LLMAPI_CACHE_DIR, else $XDG_CACHE_HOME/llmapi, else ~/.cache/llmapi (an explicit cache_dir wins)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("LLMAPI_CACHE_DIR"):
        return Path(os.environ["LLMAPI_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "llmapi"
    return Path.home() / ".cache" / "llmapi"


def cache_key(identity: dict, settings: fmt.BuildSettings) -> str:
    """sha256 over what determines the engine's bytes; runtime limits (batch, tokens, KV size) stay out."""
    payload = {
        "source": identity,
        "dtype": settings.dtype,
        "quantization": settings.quantization,
        "mapping": settings.mapping,
        "embedding_sharding_dim": settings.embedding_sharding_dim,
        "load_format": settings.load_format,
        "library_version": fmt.library_version(),
        "format_version": fmt.FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _slug(source: ModelSource) -> str:
    """A readable prefix for the entry's directory name (the key alone decides reuse)."""
    name = source.identity.get("repo_id") or source.path.name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.replace("/", "--"))[:64]


def _not_writable(root: Path, e: OSError, name: str, why: str | None = None) -> EngineCacheError:
    what = f"its entry for {name} fails its check ({why}) and" if why else f"the engine for {name}"
    return EngineCacheError(f"the engine cache directory {root} is not writable ({e}), so {what} cannot be built "
                            "there; it serves only engines already in it. Set LLMAPI_CACHE_DIR (or "
                            "LLM(cache_dir=...)) to a writable directory")


def _holder(f) -> dict:
    """{pid, host} the lock's holder wrote into the lock file ({} while it has not yet written them)."""
    try:
        f.seek(0)
        holder = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if "pid" not in holder:
        return "another process"
    return f"process {holder['pid']}" + (f" on {holder['host']}" if holder.get("host") else "")


@contextmanager
def _key_lock(root: Path, key: str, name: str, timeout: float = LOCK_TIMEOUT_S, why: str | None = None):
    """Exclusive flock per key: concurrent builders (threads or processes) of one engine build it once.

    The holder writes its pid and host into the lock file; a waiter names it in a warning (repeated every
    LOCK_REPORT_S) and in the EngineLockTimeoutError it gets after `timeout` seconds. The kernel drops the
    flock of a process that dies, so a dead holder's lock is taken over at once. `why`: why the entry at hand
    fails its check, for the error when the cache directory is not writable.
    """
    lock_path = root / "locks" / f"{key}.lock"
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a+")
    except OSError as e:
        raise _not_writable(root, e, name, why) from e
    # flock locks belong to the open file description, so two threads opening the file exclude each other too.
    with f:
        deadline, reported, pause = time.monotonic() + timeout, None, 0.02
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            now = time.monotonic()
            holder = _holder(f)
            if now >= deadline:
                raise EngineLockTimeoutError(
                    f"{_describe(holder)} has held the build lock of the engine for {name} longer than "
                    f"cache_lock_timeout={timeout:g} s (lock file {lock_path}); if it is stalled, stop it, "
                    "or raise cache_lock_timeout")
            if reported is None or now - reported >= LOCK_REPORT_S:
                logger.warning("waiting for %s that is building this engine (%s; lock file %s)",
                               _describe(holder), name, lock_path)
                reported = now
            time.sleep(min(pause, max(deadline - now, 0.0)))
            pause = min(pause * 2, 0.5)
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
            f.flush()
            yield
        finally:
            try:
                f.truncate(0)
                f.flush()
            except OSError:
                pass
            fcntl.flock(f, fcntl.LOCK_UN)


def _check(engine_dir: Path, full: bool) -> str | None:
    """None when the engine passes its check, else why it fails."""
    try:
        fmt.check_engine(engine_dir, full=full)
        fmt.read_engine(engine_dir)
    except EngineCacheError as e:
        return str(e)
    return None


def get_or_build(source: ModelSource, settings: fmt.BuildSettings, full_check: bool = False,
                 cache_dir: str | os.PathLike | None = None,
                 lock_timeout: float = LOCK_TIMEOUT_S) -> tuple[Path, bool]:
    """The engine directory for (source, settings), and whether this call converted it.

    A saved engine is used in place (checked, never copied). Otherwise the cache entry is checked
    (cheap check; full sha256 check when asked) and used, or built into a temporary directory under
    the root and renamed into place, so a reader never sees half an engine. A failing entry is logged
    and rebuilt. A hit takes no lock and writes nothing, so a cache the user can only read serves hits;
    a miss there raises EngineCacheError. Builders of one engine wait for each other up to
    `lock_timeout` seconds (EngineLockTimeoutError).
    """
    name = source.name or str(source.path)
    if source.kind == "engine":
        try:
            fmt.check_engine(source.path, full=full_check)
        except CorruptEngineError as e:
            raise CorruptEngineError(f"{e}; {SAVE_AGAIN}") from e
        return source.path, False

    root = cache_root(cache_dir)
    key = cache_key(source.identity, settings)
    final = root / "engines" / f"{_slug(source)}-{key}"

    # Entries are published by rename, complete: a hit needs neither the lock nor any write.
    exists = final.exists()
    why = _check(final, full_check) if exists else None
    if exists and why is None:
        _count(hits=1)
        logger.info("engine cache hit for %s: %s", name, final)
        return final, False
    with _key_lock(root, key, name, lock_timeout, why):
        if final.exists():
            why = _check(final, full_check)
            if why is None:  # built by the process we waited for
                _count(hits=1)
                logger.info("engine cache hit for %s: %s", name, final)
                return final, False
            logger.warning("engine cache entry for %s fails its check, rebuilding: %s", name, why)
            _count(rebuilds_after_corruption=1)
            _discard(final, root)
        logger.info("building engine for %s (dtype %s, load_format %s) into %s",
                    name, settings.dtype, settings.load_format, final)
        _build(source, settings, final, root, key, name)
        _count(builds=1)
        return final, True


def discard_corrupt(engine_dir: str | os.PathLike, error: CorruptEngineError, saved: bool,
                    lock_timeout: float = LOCK_TIMEOUT_S) -> None:
    """A load found `engine_dir` corrupt (`error`, e.g. a rank's checksum). A saved engine raises
    CorruptEngineError saying it must be saved again. A cache entry is deleted, so that building it again
    rebuilds it: under its lock, and only if it still fails a full check of its files' checksums (another
    process may have rebuilt it already)."""
    engine_dir = Path(engine_dir)
    if saved:
        raise CorruptEngineError(f"{error}; {SAVE_AGAIN}") from error
    root, key = engine_dir.parent.parent, engine_dir.name[-64:]
    try:
        with _key_lock(root, key, str(engine_dir), lock_timeout):
            if not engine_dir.exists() or verify_checksums(engine_dir):
                return
            logger.warning("engine cache entry %s fails its check on load, rebuilding: %s", engine_dir, error)
            _count(rebuilds_after_corruption=1)
            _discard(engine_dir, root)
    except EngineLockTimeoutError:
        raise
    except (EngineCacheError, OSError) as e:  # a cache the user can only read
        raise CorruptEngineError(f"{error}; the cache entry cannot be rebuilt: {e}") from e


def verify_checksums(engine_dir: Path) -> bool:
    """True when every file of the engine has its manifest's checksum (FAST_HASH, else sha256): a full read."""
    try:
        files = fmt.check_engine(engine_dir)["files"]
        for name, meta in files.items():
            kind = fmt.FAST_HASH if fmt.FAST_HASH in meta else "sha256"
            if fmt.file_checksums(engine_dir / name, (kind,))[kind] != meta.get(kind):
                return False
    except (EngineCacheError, OSError):
        return False
    return True


def _build(source: ModelSource, settings: fmt.BuildSettings, final: Path, root: Path, key: str, name: str) -> None:
    from llmapi.engine.convert import build_engine_dir

    tmp_root = root / "tmp"
    tmp = tmp_root / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        tmp_root.mkdir(parents=True, exist_ok=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        # We hold the key's lock, so any temporary dir of this key is a crashed build's leftover.
        for stale in tmp_root.glob(f"{key}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise _not_writable(root, e, name) from e
    try:
        build_engine_dir(source, settings, tmp)
        os.rename(tmp, final)  # atomic publish: same filesystem, and `final` does not exist
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _discard(engine_dir: Path, root: Path) -> None:
    # Rename first, then delete: a process that still maps the old files keeps them, and the final
    # name is free at once for the rebuilt engine.
    trash = root / "tmp" / f"trash.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    os.rename(engine_dir, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_engine(engine_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy an engine to `dest` (new or empty directory), e.g. for LLM.save.

    Every file's copy must have the sha256 the source's manifest records (the saved engine is what was
    built); the copy's manifest gets the current checksums, FAST_HASH included, even for an older engine.
    """
    engine_dir, dest = Path(engine_dir), Path(dest).expanduser()
    manifest = fmt.check_engine(engine_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"cannot save the engine to {dest}: it exists and is not an empty directory")
    dest.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, meta in manifest["files"].items():
        files[name] = fmt.copy_with_checksums(engine_dir / name, dest / name)
        if files[name]["sha256"] != meta.get("sha256"):
            shutil.rmtree(dest, ignore_errors=True)
            raise CorruptEngineError(f"engine {engine_dir}: {name} fails its sha256 check (content altered); "
                                     "nothing was saved")
    fmt.write_manifest(dest, files)
    try:
        fmt.check_engine(dest)
    except CorruptEngineError as e:
        raise EngineCacheError(f"the engine copy at {dest} fails its check: {e}") from e
    return dest
