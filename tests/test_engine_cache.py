"""Engine builds and the engine cache: layout, hits, rebuilds on changed or damaged files, concurrent builders."""

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmapi.engine import build_engine, cache, check_engine, save_engine
from llmapi.engine import convert as convert_mod
from llmapi.errors import CorruptEngineError, UnsupportedModelError
from llmapi.models import convert_hf
from tiny_models import make_tiny_gpt2, make_tiny_llama
from tiny_tokenizer import save_tiny_tokenizer


def _model_dir(path: Path, make=make_tiny_llama, seed: int = 0, **kwargs) -> Path:
    model = make(path, seed=seed, **kwargs)
    save_tiny_tokenizer(path)
    return path, model


@pytest.fixture
def llama_dir(tmp_path):
    return _model_dir(tmp_path / "llama")[0]


def _build(model, cache_dir, **kwargs):
    return build_engine(model, device_type="cpu", cache_dir=cache_dir, **kwargs)


def test_build_writes_engine_then_hits_cache(tmp_path, caplog):
    src, hf_model = _model_dir(tmp_path / "llama")
    builds = cache.stats.builds
    info = _build(src, tmp_path / "cache")
    assert info.built and cache.stats.builds == builds + 1
    assert sorted(os.listdir(info.path)) == ["build_config.json", "config.json", "generation_config.json",
                                             "manifest.json", "rank0.safetensors", "tokenizer.json",
                                             "tokenizer_config.json"]
    cfg = info.config
    assert (cfg["architecture"], cfg["dtype"], cfg["eos_token_id"]) == ("LlamaForCausalLM", "float32", [2])
    assert cfg["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert cfg["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}
    assert info.build_config["tokens_per_block"] == 32 and info.build_config["format_version"] == 1
    assert info.build_config["source"]["kind"] == "hf_dir"
    manifest = json.loads((info.path / "manifest.json").read_text())["files"]
    assert manifest["rank0.safetensors"]["size"] == (info.path / "rank0.safetensors").stat().st_size

    # The engine holds exactly what the family converter makes of the HF weights.
    hf_config = json.loads((src / "config.json").read_text())
    _, expected = convert_hf(hf_config, hf_model.state_dict(), torch.float32)
    got = load_file(str(info.path / "rank0.safetensors"))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)

    with caplog.at_level(logging.INFO, logger="llmapi.engine"):
        again = _build(src, tmp_path / "cache")
    assert not again.built and again.path == info.path
    assert cache.stats.builds == builds + 1
    assert "engine cache hit" in caplog.text


def test_changed_weights_at_same_path_rebuild(tmp_path, llama_dir):
    first = _build(llama_dir, tmp_path / "cache")
    time.sleep(0.01)
    make_tiny_llama(llama_dir, seed=1)  # same names, shapes and file size: only content and mtime differ
    second = _build(llama_dir, tmp_path / "cache")
    assert second.built and second.path != first.path
    a, b = (load_file(str(i.path / "rank0.safetensors")) for i in (first, second))
    assert not torch.equal(a["transformer.ln_f.weight"], b["transformer.ln_f.weight"])


def test_weight_settings_are_in_the_key(tmp_path, llama_dir):
    fp32 = _build(llama_dir, tmp_path / "cache")
    bf16 = _build(llama_dir, tmp_path / "cache", dtype="bfloat16")
    dummy = _build(llama_dir, tmp_path / "cache", load_format="dummy")
    assert bf16.built and dummy.built and len({fp32.path, bf16.path, dummy.path}) == 3
    assert load_file(str(bf16.path / "rank0.safetensors"))["transformer.ln_f.weight"].dtype == torch.bfloat16
    # "auto" on CPU is float32: the same engine as asking for float32.
    assert not _build(llama_dir, tmp_path / "cache", dtype=torch.float32).built


def test_runtime_limits_do_not_rebuild(tmp_path, llama_dir):
    """LLM(...) with other max_batch_size / max_num_tokens / KV size reuses the engine."""
    from llmapi import LLM, KvCacheConfig

    llm = LLM(str(llama_dir), cache_dir=str(tmp_path / "cache"), max_batch_size=4, max_num_tokens=64)
    assert llm.engine_built
    llm.shutdown()
    builds = cache.stats.builds
    llm = LLM(str(llama_dir), cache_dir=str(tmp_path / "cache"), max_batch_size=2, max_num_tokens=128,
              kv_cache_config=KvCacheConfig(max_tokens=512))
    assert not llm.engine_built and cache.stats.builds == builds
    llm.shutdown()


def test_dummy_engine_has_config_and_no_weights(tmp_path, llama_dir):
    (llama_dir / "model.safetensors").unlink()  # dummy reads the config only
    info = _build(llama_dir, tmp_path / "cache", load_format="dummy")
    assert not (info.path / "rank0.safetensors").exists()
    assert info.build_config["load_format"] == "dummy" and info.config["num_hidden_layers"] == 3
    check_engine(info.path, full=True)


def _corrupt_header_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:10] = b"X!"  # the JSON header starts at byte 8
    path.write_bytes(bytes(data))


def _corrupt_header_length(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0:8] = (len(data) * 2).to_bytes(8, "little")
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)


@pytest.mark.parametrize("damage, message", [
    (_truncate, "rank0.safetensors is .* bytes, manifest says"),
    (_corrupt_header_bytes, "rank0.safetensors has a damaged safetensors header: not JSON"),
    (_corrupt_header_length, "rank0.safetensors has a damaged safetensors header: header length"),
])
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, llama_dir, caplog, damage, message):
    info = _build(llama_dir, tmp_path / "cache")
    damage(info.path / "rank0.safetensors")
    with pytest.raises(CorruptEngineError, match=message):
        check_engine(info.path)
    builds = cache.stats.builds
    with caplog.at_level(logging.WARNING, logger="llmapi.engine"):
        again = _build(llama_dir, tmp_path / "cache")
    assert again.built and again.path == info.path and cache.stats.builds == builds + 1
    assert "fails its check, rebuilding" in caplog.text
    check_engine(again.path, full=True)


def test_full_check_finds_a_flipped_byte_the_cheap_check_misses(tmp_path, llama_dir):
    info = _build(llama_dir, tmp_path / "cache")
    path = info.path / "rank0.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data: sizes and header unchanged
    path.write_bytes(bytes(data))
    check_engine(info.path)
    with pytest.raises(CorruptEngineError, match="rank0.safetensors fails its sha256 check"):
        check_engine(info.path, full=True)
    assert not _build(llama_dir, tmp_path / "cache").built  # cheap check: still used
    assert _build(llama_dir, tmp_path / "cache", full_check=True).built  # full check: rebuilt


def test_concurrent_threads_build_once(tmp_path, llama_dir, monkeypatch):
    real = convert_mod.build_engine_dir

    def slow_build(*args, **kwargs):  # widen the race window: the second builder arrives mid-build
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_mod, "build_engine_dir", slow_build)
    builds = cache.stats.builds
    results = []
    threads = [threading.Thread(target=lambda: results.append(_build(llama_dir, tmp_path / "cache")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.stats.builds == builds + 1
    assert sorted(r.built for r in results) == [False, False, True]
    assert len({r.path for r in results}) == 1


def test_concurrent_processes_build_once(tmp_path, llama_dir):
    script = ("import sys; from llmapi.engine import build_engine; "
              "print('BUILT' if build_engine(sys.argv[1], device_type='cpu', cache_dir=sys.argv[2]).built else 'HIT')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(llama_dir), str(tmp_path / "cache")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert sorted(out.strip() for out, _ in outs) == ["BUILT", "HIT"]
    assert len(os.listdir(tmp_path / "cache" / "engines")) == 1
    assert not os.listdir(tmp_path / "cache" / "tmp")  # no temporary dir left behind


def test_saved_engine_is_used_in_place(tmp_path, llama_dir):
    info = _build(llama_dir, tmp_path / "cache")
    saved = save_engine(info.path, tmp_path / "saved")
    builds = cache.stats.builds
    loaded = build_engine(saved, device_type="cpu")
    assert loaded.path == saved and not loaded.built and loaded.source.kind == "engine"
    assert cache.stats.builds == builds and loaded.config == info.config
    with pytest.raises(ValueError, match="saved engine .* is float32"):
        build_engine(saved, dtype="float16", device_type="cpu")
    with pytest.raises(FileExistsError):
        save_engine(info.path, tmp_path / "saved")
    (saved / "tokenizer.json").write_text("{}")
    with pytest.raises(CorruptEngineError, match="tokenizer.json is"):
        build_engine(saved, device_type="cpu")


def test_gpt2_and_bin_checkpoints(tmp_path):
    src, _ = _model_dir(tmp_path / "gpt2", make=make_tiny_gpt2)
    st = _build(src, tmp_path / "cache")
    assert st.config["architecture"] == "GPT2LMHeadModel" and st.config["tie_word_embeddings"]
    assert "lm_head.weight" not in load_file(str(st.path / "rank0.safetensors"))

    model = make_tiny_llama(seed=3)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    model.save_pretrained(tmp_path / "st")
    from_bin, from_st = _build(tmp_path / "bin", tmp_path / "cache"), _build(tmp_path / "st", tmp_path / "cache")
    a, b = (load_file(str(i.path / "rank0.safetensors")) for i in (from_bin, from_st))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unsupported_architecture_is_named(tmp_path, llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="FancyNewForCausalLM"):
        _build(llama_dir, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # the failed build left nothing behind


def test_resolve_dtype():
    from llmapi.engine.convert import resolve_dtype

    assert resolve_dtype("auto", "bfloat16", "cpu") == "float32"
    assert resolve_dtype("auto", "bfloat16", "cuda") == "bfloat16"
    assert resolve_dtype("auto", None, "cuda") == "bfloat16"
    assert resolve_dtype("fp16", "bfloat16", "cpu") == "float16"
    assert resolve_dtype(torch.bfloat16, None, "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8", None, "cpu")


def test_cache_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMAPI_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "llmapi"
    monkeypatch.setenv("LLMAPI_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("LLMAPI_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.cache_root() == Path.home() / ".cache" / "llmapi"
