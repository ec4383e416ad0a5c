"""The on-disk engine cache: one converted engine per (source content, weight settings), built once, checked on load."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmapi.engine import format as fmt
from llmapi.errors import CorruptEngineError, EngineCacheError
from llmapi.hub import ModelSource

logger = logging.getLogger(__name__)


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


@contextmanager
def _key_lock(root: Path, key: str, name: str):
    """Exclusive flock per key: concurrent builders (threads or processes) of one engine build it once."""
    lock_path = root / "locks" / f"{key}.lock"
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a+")
    except OSError as e:
        raise EngineCacheError(f"cannot write to the engine cache at {root} ({e}); set LLMAPI_CACHE_DIR") from e
    # flock locks belong to the open file description, so two threads opening the file exclude each other too.
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process building the engine for %s", name)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
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
                 cache_dir: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """The engine directory for (source, settings), and whether this call converted it.

    A saved engine is used in place (checked, never copied). Otherwise the cache entry is checked
    (cheap check; full sha256 check when asked) and used, or built into a temporary directory under
    the root and renamed into place, so a reader never sees half an engine. A failing entry is logged
    and rebuilt.
    """
    name = source.name or str(source.path)
    if source.kind == "engine":
        fmt.check_engine(source.path, full=full_check)
        return source.path, False

    root = cache_root(cache_dir)
    key = cache_key(source.identity, settings)
    final = root / "engines" / f"{_slug(source)}-{key}"

    with _key_lock(root, key, name):
        if final.exists():
            why = _check(final, full_check)
            if why is None:
                _count(hits=1)
                logger.info("engine cache hit for %s: %s", name, final)
                return final, False
            logger.warning("engine cache entry for %s fails its check, rebuilding: %s", name, why)
            _count(rebuilds_after_corruption=1)
            _discard(final, root)
        logger.info("building engine for %s (dtype %s, load_format %s) into %s",
                    name, settings.dtype, settings.load_format, final)
        _build(source, settings, final, root, key)
        _count(builds=1)
        return final, True


def _build(source: ModelSource, settings: fmt.BuildSettings, final: Path, root: Path, key: str) -> None:
    from llmapi.engine.convert import build_engine_dir

    tmp_root = root / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    # We hold the key's lock, so any temporary dir of this key is a crashed build's leftover.
    for stale in tmp_root.glob(f"{key}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tmp_root / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
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
    """Copy an engine to `dest` (new or empty directory), e.g. for LLM.save; the copy is checked."""
    engine_dir, dest = Path(engine_dir), Path(dest).expanduser()
    manifest = fmt.check_engine(engine_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"cannot save the engine to {dest}: it exists and is not an empty directory")
    dest.mkdir(parents=True, exist_ok=True)
    for name in list(manifest["files"]) + [fmt.MANIFEST_FILE]:
        shutil.copyfile(engine_dir / name, dest / name)
    try:
        fmt.check_engine(dest)
    except CorruptEngineError as e:
        raise EngineCacheError(f"the engine copy at {dest} fails its check: {e}") from e
    return dest
