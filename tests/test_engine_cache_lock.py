"""The engine cache's build lock (a timeout naming the holder's pid, a dead holder's lock taken over) and a
cache directory the user can only read (hits serve, a miss says the directory is not writable)."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from llmapi import LLM, SamplingParams
from llmapi.engine import build_engine
from llmapi.errors import EngineLockTimeoutError

# A builder that takes the lock, says so, and never finishes.
STALLED_BUILDER = textwrap.dedent("""
    import sys, time
    from llmapi.engine import build_engine, convert

    def stall(*args, **kwargs):
        print("BUILDING", flush=True)
        time.sleep(600)

    convert.build_engine_dir = stall
    build_engine(sys.argv[1], device_type="cpu", cache_dir=sys.argv[2])
""")


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def _start_builder(model_dir, cache_dir) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", STALLED_BUILDER, str(model_dir), str(cache_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    line = child.stdout.readline()
    assert line.strip() == "BUILDING", child.stderr.read()
    return child


def _end(child: subprocess.Popen) -> None:
    if child.poll() is None:
        os.kill(child.pid, signal.SIGCONT)
        child.kill()
    child.wait(30)
    child.stdout.close()
    child.stderr.close()


def test_stalled_builder_times_out_naming_its_pid(tiny_llama_dir, tmp_path, caplog):
    child = _start_builder(tiny_llama_dir, tmp_path / "cache")
    try:
        os.kill(child.pid, signal.SIGSTOP)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="llmapi.engine"):
            with pytest.raises(EngineLockTimeoutError, match=rf"process {child.pid} on \S+ has held the build lock"):
                build_engine(tiny_llama_dir, device_type="cpu", cache_dir=tmp_path / "cache", cache_lock_timeout=1.0)
        assert 1.0 <= time.monotonic() - started < 10
        waits = [r.getMessage() for r in caplog.records if "that is building this engine" in r.getMessage()]
        assert len(waits) == 1 and f"waiting for process {child.pid} " in waits[0]  # once, then every 30 s

        with pytest.raises(EngineLockTimeoutError, match=f"process {child.pid} "):
            LLM(str(tiny_llama_dir), cache_dir=str(tmp_path / "cache"), cache_lock_timeout=0.5)
    finally:
        _end(child)


def test_dead_builders_lock_is_taken_over(tiny_llama_dir, tmp_path):
    child = _start_builder(tiny_llama_dir, tmp_path / "cache")
    child.kill()
    _end(child)
    info = build_engine(tiny_llama_dir, device_type="cpu", cache_dir=tmp_path / "cache", cache_lock_timeout=5.0)
    assert info.built


# Root ignores permission bits, so as root the reader drops to uid 65534 (nobody) before it touches the cache.
# The interpreter may live where nobody can read it (under root's home): a first LLM, on a scratch cache, imports
# every module the hit path needs while still root.
READER = textwrap.dedent("""
    import json, os, sys
    from llmapi import LLM, SamplingParams
    from llmapi.errors import EngineCacheError

    model, cache_dir, scratch = sys.argv[1:]

    def run(dtype):
        try:
            with LLM(model, cache_dir=cache_dir, dtype=dtype) as llm:
                out = llm.generate([[5, 9, 17, 33]], SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)
                return {"built": llm.engine_built, "tokens": out[0].outputs[0].token_ids}
        except EngineCacheError as e:
            return {"error": type(e).__name__, "message": str(e)}

    if os.geteuid() == 0:
        with LLM(model, cache_dir=scratch) as llm:
            llm.generate([[5, 9]], SamplingParams(max_tokens=2), use_tqdm=False)
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    print(json.dumps({"uid": os.geteuid(), "hit": run("float32"), "miss": run("bfloat16")}))
""")


def _chmod_tree(root: Path, dirs: int, files: int) -> None:
    for path, subdirs, names in os.walk(root):
        os.chmod(path, dirs)
        for name in names:
            os.chmod(os.path.join(path, name), files)


@pytest.fixture
def world_readable_dir():
    """A directory another uid can read (pytest's own tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="llmapi-ro-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    _chmod_tree(path, 0o755, 0o644)
    shutil.rmtree(path, ignore_errors=True)


def test_read_only_cache_serves_hits_and_names_itself_on_a_miss(tiny_llama_dir, world_readable_dir, tmp_path):
    model, cache_dir = world_readable_dir / "model", world_readable_dir / "cache"
    shutil.copytree(tiny_llama_dir, model)
    with LLM(str(model), cache_dir=str(cache_dir)) as llm:  # an admin fills the cache
        assert llm.engine_built
        want = llm.generate([[5, 9, 17, 33]], SamplingParams(max_tokens=6, temperature=0),
                            use_tqdm=False)[0].outputs[0].token_ids
    _chmod_tree(model, 0o555, 0o444)
    _chmod_tree(cache_dir, 0o555, 0o444)
    before = sorted(str(p.relative_to(cache_dir)) for p in cache_dir.rglob("*"))

    home = world_readable_dir / "home"  # nobody's HOME: writable, as a real user's is
    home.mkdir()
    os.chmod(home, 0o777)
    env = dict(_env(), HOME=str(home), HF_HOME=str(home / "hf"), XDG_CACHE_HOME=str(home / "xdg"))
    child = subprocess.run([sys.executable, "-c", READER, str(model), str(cache_dir), str(tmp_path / "scratch")],
                           capture_output=True, text=True, timeout=300, env=env, cwd=str(home))
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["uid"] != 0
    assert result["hit"] == {"built": False, "tokens": want}, child.stderr[-3000:]
    assert result["miss"]["error"] == "EngineCacheError"
    assert f"the engine cache directory {cache_dir} is not writable" in result["miss"]["message"]
    assert sorted(str(p.relative_to(cache_dir)) for p in cache_dir.rglob("*")) == before  # nothing written
