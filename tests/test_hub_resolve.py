"""Model sources: local directories, GGUF paths, saved engines and hub ids through an offline HF cache."""

import shutil
import time
from pathlib import Path

import pytest

from llmapi.engine import build_engine, cache
from llmapi.errors import ModelNotFoundError
from llmapi.hub import resolve_source
from tiny_models import make_tiny_llama
from tiny_tokenizer import save_tiny_tokenizer

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


@pytest.fixture
def llama_dir(tmp_path):
    path = tmp_path / "llama"
    make_tiny_llama(path)
    save_tiny_tokenizer(path)
    return path


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An HF cache laid out by hand under HF_HOME, with HF_HUB_OFFLINE=1; returns the hub cache folder."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


def _publish(hub: Path, repo_id: str, commit: str, files_from: Path) -> Path:
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_resolves_offline_and_keys_on_the_commit(tmp_path, llama_dir, offline_hub):
    snapshot = _publish(offline_hub, "tiny-org/tiny-llama", COMMIT_A, llama_dir)
    source = resolve_source("tiny-org/tiny-llama")
    assert source.kind == "hf_dir" and source.path == snapshot
    assert source.identity == {"kind": "hub", "repo_id": "tiny-org/tiny-llama", "commit": COMMIT_A}

    first = build_engine("tiny-org/tiny-llama", device_type="cpu", cache_dir=tmp_path / "cache")
    assert first.built and first.build_config["source"]["commit"] == COMMIT_A
    assert first.path.name.startswith("tiny-org--tiny-llama-")
    builds = cache.stats.builds
    assert not build_engine("tiny-org/tiny-llama", device_type="cpu", cache_dir=tmp_path / "cache").built
    assert not build_engine("tiny-org/tiny-llama", revision=COMMIT_A, device_type="cpu",
                            cache_dir=tmp_path / "cache").built
    assert cache.stats.builds == builds

    # A new commit on main is a new engine, even with identical files.
    _publish(offline_hub, "tiny-org/tiny-llama", COMMIT_B, llama_dir)
    second = build_engine("tiny-org/tiny-llama", device_type="cpu", cache_dir=tmp_path / "cache")
    assert second.built and second.path != first.path and second.build_config["source"]["commit"] == COMMIT_B


def test_unknown_repo_offline_is_model_not_found(offline_hub):
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-model.*HF_HUB_OFFLINE"):
        resolve_source("no-such-org/no-such-model")
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-model"):
        build_engine("no-such-org/no-such-model", device_type="cpu")


@pytest.mark.parametrize("name", ["./missing-model", "/nonexistent/dir/model", "weights/model.gguf", "a/b/c"])
def test_missing_path_is_model_not_found(name):
    with pytest.raises(ModelNotFoundError, match=name.lstrip("./")):
        resolve_source(name)


def test_local_directory_identity_follows_content(llama_dir):
    first = resolve_source(llama_dir).identity
    assert resolve_source(str(llama_dir)).identity == first
    names = [f["name"] for f in first["files"]]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    time.sleep(0.01)
    make_tiny_llama(llama_dir, seed=1)
    assert resolve_source(llama_dir).identity != first
    (llama_dir / "config.json").touch()
    with pytest.raises(ModelNotFoundError, match="no weights"):
        (llama_dir / "model.safetensors").unlink()
        resolve_source(llama_dir)
    assert resolve_source(llama_dir, weights=False).kind == "hf_dir"  # enough for load_format="dummy"


def test_gguf_paths_and_engine_dirs(tmp_path, llama_dir):
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    (gguf_dir / "m.gguf").write_bytes(b"GGUF" + bytes(64))
    by_dir, by_file = resolve_source(gguf_dir), resolve_source(gguf_dir / "m.gguf")
    assert by_dir.kind == by_file.kind == "gguf" and by_dir.path == by_file.path == gguf_dir / "m.gguf"
    assert by_file.identity["size"] == 68 and "head_sha256" in by_file.identity
    (gguf_dir / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="2 .gguf files"):
        resolve_source(gguf_dir)
    with pytest.raises(ModelNotFoundError, match="not a model"):
        resolve_source(tmp_path / "gguf" / ".." / "gguf" / "..")  # tmp_path itself: no config, no gguf

    info = build_engine(llama_dir, device_type="cpu", cache_dir=tmp_path / "cache")
    assert resolve_source(info.path).kind == "engine"
