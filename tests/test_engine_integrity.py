"""Every load checks what it loads, at no extra read: a byte flipped in a rank's weights, a rank file swapped for
another model's (same size and header) or an edited config.json is found on a plain load at TP 1 and 2. A cache
entry is then rebuilt and gives the tokens it gave before; a saved engine raises CorruptEngineError naming the
file. Engines written before the fast checksum still load, with one warning."""

import json
import logging
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmapi import LLM, SamplingParams
from llmapi.engine import build_engine, cache, check_engine, save_engine
from llmapi.engine.format import FAST_HASH, MANIFEST_FILE
from llmapi.engine.loader import load_into
from llmapi.errors import CorruptEngineError

PROMPTS = [[5, 9, 17, 33, 4, 100, 7], [3, 60, 61], [250, 12, 8, 8, 40]]
TPS = [1, 2]


def _greedy(llm):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _mapping(tp: int) -> dict:
    return {"world_size": tp, "tp_size": tp, "pp_size": 1}


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory):
    """The tiny Llama's shapes with other random weights: its engine files have the same sizes and headers."""
    from tiny_models import make_tiny_llama
    from tiny_tokenizer import save_tiny_tokenizer

    path = tmp_path_factory.mktemp("other-llama")
    model = make_tiny_llama(path, seed=7)
    save_tiny_tokenizer(path, vocab_size=model.config.vocab_size)
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_llama_dir, other_llama_dir):
    """Per TP size: a cache root holding the tiny Llama's entry, the greedy tokens it gives, and the other
    model's engine (whose rank files replace the entry's in the swap case)."""
    out = {}
    for tp in TPS:
        root = tmp_path_factory.mktemp(f"cache-tp{tp}")
        with LLM(str(tiny_llama_dir), tensor_parallel_size=tp, cache_dir=str(root)) as llm:
            tokens, entry = _greedy(llm), llm.engine_info.path
        other = build_engine(other_llama_dir, device_type="cpu", mapping=_mapping(tp),
                             cache_dir=tmp_path_factory.mktemp(f"other-cache-tp{tp}")).path
        out[tp] = SimpleNamespace(root=root, entry=entry, tokens=tokens, other=other)
    return out


def _flip(engine: Path, rank: int, other: Path) -> str:
    path = engine / f"rank{rank}.safetensors"
    data = bytearray(path.read_bytes())
    data[(_header_len(path) + len(data)) // 2] ^= 0x10  # inside a tensor's bytes: sizes and header unchanged
    path.write_bytes(bytes(data))
    return path.name


def _swap(engine: Path, rank: int, other: Path) -> str:
    path, theirs = engine / f"rank{rank}.safetensors", other / f"rank{rank}.safetensors"
    mine = path.read_bytes()
    n = _header_len(path)
    assert theirs.stat().st_size == len(mine) and theirs.read_bytes()[:n] == mine[:n]  # same size and header
    shutil.copyfile(theirs, path)
    return path.name


def _edit_config(engine: Path, rank: int, other: Path) -> str:
    path = engine / "config.json"
    config = json.loads(path.read_text())
    assert config["rotary_base"] == 10000.0
    config["rotary_base"] = 20000.0  # still a valid config, of the same size: only its checksum tells
    size = path.stat().st_size
    path.write_text(json.dumps(config, indent=2) + "\n")
    assert path.stat().st_size == size
    return path.name


# The flipped byte is in the last rank's file, the swapped file is rank 0's: at TP 2 both ranks' reports cross.
DAMAGES = {"flip": (_flip, -1), "swap": (_swap, 0), "config": (_edit_config, 0)}


def _damage(kind: str, engine: Path, tp: int, other: Path) -> str:
    damage, rank = DAMAGES[kind]
    return damage(engine, rank % tp, other)


@pytest.mark.parametrize("kind", list(DAMAGES))
@pytest.mark.parametrize("tp", TPS)
def test_damaged_cache_entry_is_rebuilt(tp, kind, pristine, tiny_llama_dir, tmp_path, caplog):
    p = pristine[tp]
    root = tmp_path / "cache"
    shutil.copytree(p.root, root)
    entry = root / "engines" / p.entry.name
    name = _damage(kind, entry, tp, p.other)
    if kind != "config":
        check_engine(entry)  # sizes and headers are intact: only the loader's checksum finds it
    rebuilds = cache.stats.rebuilds_after_corruption
    with caplog.at_level(logging.WARNING, logger="llmapi"):
        with LLM(str(tiny_llama_dir), tensor_parallel_size=tp, cache_dir=str(root)) as llm:
            assert llm.engine_built and llm.engine_info.path == entry
            assert _greedy(llm) == p.tokens
    assert cache.stats.rebuilds_after_corruption == rebuilds + 1
    assert f"{name} fails its {FAST_HASH} checksum" in caplog.text and "rebuilding" in caplog.text
    check_engine(entry, full=True)


@pytest.mark.parametrize("kind", list(DAMAGES))
@pytest.mark.parametrize("tp", TPS)
def test_damaged_saved_engine_is_refused(tp, kind, pristine, tmp_path):
    p = pristine[tp]
    saved = save_engine(p.entry, tmp_path / "saved")
    name = _damage(kind, saved, tp, p.other)
    builds = cache.stats.builds
    with pytest.raises(CorruptEngineError,
                       match=rf"(?s){saved}: {name} fails its {FAST_HASH} checksum.*save the engine directory again"):
        LLM(str(saved), tensor_parallel_size=tp)
    assert cache.stats.builds == builds  # a saved engine is never rebuilt behind the user's back


def test_old_manifest_loads_with_one_warning(pristine, tiny_llama_dir, tmp_path, caplog):
    p = pristine[1]
    root = tmp_path / "cache"
    shutil.copytree(p.root, root)
    entry = root / "engines" / p.entry.name
    manifest = json.loads((entry / MANIFEST_FILE).read_text())
    for meta in manifest["files"].values():
        del meta[FAST_HASH]
    (entry / MANIFEST_FILE).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="llmapi"):
        with LLM(str(tiny_llama_dir), cache_dir=str(root)) as llm:
            assert not llm.engine_built
            assert _greedy(llm) == p.tokens
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "older llmapi" in warnings[0].getMessage(), [r.getMessage() for r in warnings]

    # Saving it again writes the checksums: the saved copy is checked in full on every load.
    saved = save_engine(entry, tmp_path / "saved")
    assert all(FAST_HASH in meta for meta in json.loads((saved / MANIFEST_FILE).read_text())["files"].values())
    _flip(saved, 0, None)
    with pytest.raises(CorruptEngineError, match="rank0.safetensors fails its"):
        LLM(str(saved))


def test_save_refuses_a_copy_that_differs_from_the_build(pristine, tmp_path):
    p = pristine[1]
    entry = tmp_path / "entry"
    shutil.copytree(p.entry, entry)
    _flip(entry, 0, None)
    with pytest.raises(CorruptEngineError, match="rank0.safetensors fails its sha256 check"):
        save_engine(entry, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("piece", [None, 1000])
def test_loader_checksum_is_the_whole_files(tmp_path, monkeypatch, piece):
    """The bytes the loader streams (header, then the tensors in file order) are the whole file; with small
    pieces the file is hashed on the second thread, in pieces and batches."""
    from safetensors.torch import save_file

    from llmapi.engine import loader

    if piece is not None:
        monkeypatch.setattr(loader, "HASH_PIECE", piece)

    from llmapi.engine.format import file_checksums

    path = tmp_path / "rank0.safetensors"
    save_file({"a": torch.randn(300, 7), "c": torch.zeros(0, 3), "b": torch.arange(5, dtype=torch.int32)}, str(path))
    params = {"a": torch.zeros(300, 7), "b": torch.zeros(5, dtype=torch.int32), "c": torch.zeros(0, 3)}
    good = file_checksums(path)[FAST_HASH]
    load_into(path, params, checksum=good)
    assert torch.equal(params["b"], torch.arange(5, dtype=torch.int32))
    _flip(tmp_path, 0, None)
    with pytest.raises(CorruptEngineError, match=f"rank0.safetensors fails its {FAST_HASH} checksum"):
        load_into(path, params, checksum=good)
