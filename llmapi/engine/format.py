"""The on-disk engine format: config, build config, per-rank safetensors, tokenizer files and a checked manifest."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmapi.engine.loader import FAST_HASH, fast_hasher, read_header
from llmapi.errors import CorruptEngineError, EngineCacheError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TOKENS_PER_BLOCK = 32
CONFIG_FILE = "config.json"
BUILD_CONFIG_FILE = "build_config.json"
MANIFEST_FILE = "manifest.json"
# Copied from the source when present; the engine is then self-contained for tokenization and chat.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "chat_template.jinja", "chat_template.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_RANK_FILE = re.compile(r"rank\d+\.safetensors")

@dataclass(frozen=True)
class BuildSettings:
    """The settings that change an engine's weights, and so its cache key (runtime limits are not here)."""

    dtype: str = "float32"
    """Weight dtype: "float32", "bfloat16" or "float16" (already resolved from "auto")."""
    load_format: str = "auto"
    """"auto" reads the checkpoint's weights; "dummy" makes random weights from the config alone."""
    quantization: dict = field(default_factory=lambda: {"quant_algo": None, "kv_cache_quant_algo": None})
    """QuantConfig.to_dict() (TensorRT-LLM QuantAlgo names), or all None for an unquantized engine."""
    mapping: dict = field(default_factory=lambda: {"world_size": 1, "tp_size": 1, "pp_size": 1})
    """How the engine is split over ranks: {world_size, tp_size, pp_size}; one rank{r}.safetensors each."""
    embedding_sharding_dim: int = 0
    """With tp_size > 1: the embedding is split along the vocabulary (0) or the hidden size (1)."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        from llmapi.distributed.mapping import Mapping

        mapping = Mapping.from_dict(self.mapping)  # validates the sizes
        if self.mapping != mapping.to_dict():
            raise ValueError(f"mapping={self.mapping!r} is invalid: expected {mapping.to_dict()}")
        from llmapi.quantization.config import UNQUANTIZED, QuantConfig

        quant = QuantConfig.from_dict(self.quantization)  # validates the section
        object.__setattr__(self, "quantization", dict(UNQUANTIZED) if quant is None else quant.to_dict())
        if self.embedding_sharding_dim not in (0, 1):
            raise ValueError(f"embedding_sharding_dim must be 0 or 1, got {self.embedding_sharding_dim!r}")
        if mapping.tp_size == 1:
            object.__setattr__(self, "embedding_sharding_dim", 0)  # meaningless on one rank: one cache entry

    @property
    def world_size(self) -> int:
        return self.mapping["world_size"]


def library_version() -> str:
    """The installed llmapi version; part of the cache key so an upgrade never reuses an old conversion."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmapi")
    except PackageNotFoundError:
        return "0+unknown"


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_rank_weights(engine_dir: Path, rank: int, weights: dict[str, torch.Tensor]) -> None:
    """Write one rank's tensors; safetensors wants contiguous, unshared CPU tensors."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in weights.items()}
    save_file(tensors, str(Path(engine_dir) / rank_file(rank)), metadata={"format": "pt"})


def load_rank_weights(engine_dir: Path, rank: int = 0, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read one rank's tensors onto `device` as a dict (a model loads its own with loader.load_into)."""
    from safetensors.torch import load_file

    return load_file(str(Path(engine_dir) / rank_file(rank)), device=str(device))


def copy_tokenizer_files(src_dir: Path, engine_dir: Path) -> list[str]:
    """Copy the tokenizer/generation files the source has; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copyfile(Path(src_dir) / name, Path(engine_dir) / name)
            copied.append(name)
    return copied


def sha256_file(path: Path) -> str:
    """The file's SHA-256, hex."""
    return file_checksums(path, ("sha256",))["sha256"]


def file_checksums(path: Path, kinds=("sha256", FAST_HASH)) -> dict[str, str]:
    """The file's checksums ("sha256", FAST_HASH), hex, from one read."""
    hashers = {kind: fast_hasher() if kind == FAST_HASH else hashlib.new(kind) for kind in kinds}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            for h in hashers.values():
                h.update(chunk)
    return {kind: h.hexdigest() for kind, h in hashers.items()}


def copy_with_checksums(src: Path, dest: Path) -> dict:
    """Copy a file; returns the manifest entry (size, sha256, FAST_HASH) of the bytes written."""
    hashers = {"sha256": hashlib.sha256(), FAST_HASH: fast_hasher()}
    size = 0
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        for chunk in iter(lambda: fin.read(8 << 20), b""):
            fout.write(chunk)
            size += len(chunk)
            for h in hashers.values():
                h.update(chunk)
    return {"size": size, **{kind: h.hexdigest() for kind, h in hashers.items()}}


def is_rank_file(name: str) -> bool:
    """rank{r}.safetensors: checked by the loader as it streams it; every other engine file is small."""
    return _RANK_FILE.fullmatch(name) is not None


def write_manifest(engine_dir: Path, files: dict | None = None) -> dict:
    """Record size, sha256 and FAST_HASH of every file in the engine (or the given entries); written last,
    so its presence means complete."""
    engine_dir = Path(engine_dir)
    if files is None:
        files = {p.name: {"size": p.stat().st_size, **file_checksums(p)}
                 for p in sorted(engine_dir.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    manifest = {"format_version": FORMAT_VERSION, "files": files}
    write_json(engine_dir / MANIFEST_FILE, manifest)
    return manifest


def weights_checksum(engine_dir: str | os.PathLike, rank: int) -> str | None:
    """The manifest's FAST_HASH of rank `rank`'s weights file (None for an engine written before it had one)."""
    engine_dir = Path(engine_dir)
    files = _read_json(engine_dir / MANIFEST_FILE, "written last by a complete build").get("files")
    entry = files.get(rank_file(rank)) if isinstance(files, dict) else None
    if not isinstance(entry, dict):
        raise CorruptEngineError(f"engine {engine_dir}: manifest.json does not list {rank_file(rank)}")
    return entry.get(FAST_HASH)


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptEngineError(f"engine {path.parent}: {path.name} is missing ({what})") from None
    except (OSError, ValueError) as e:
        raise CorruptEngineError(f"engine {path.parent}: {path.name} is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CorruptEngineError(f"engine {path.parent}: {path.name} is not a JSON object")
    return obj


def _check_safetensors(path: Path, size: int) -> None:
    """Header parses, and every tensor's byte range lies inside the file and matches its shape."""
    read_header(path, size)


def check_engine(engine_dir: str | os.PathLike, full: bool = False) -> dict:
    """Check an engine directory; returns its manifest. Raises CorruptEngineError naming the bad file.

    Always: every manifest file present with its recorded size, configs parse, safetensors headers parse and
    their tensor byte ranges fit the file, and every small file (all but rank{r}.safetensors) has its
    manifest's FAST_HASH. The rank files' FAST_HASH is checked by the loader as it streams them (no extra
    read). full=True also compares every file's sha256: a cold read of the whole engine.
    An engine whose manifest predates FAST_HASH gets the size and header checks only, with a warning.
    """
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise CorruptEngineError(f"engine {engine_dir} does not exist or is not a directory")
    manifest = _read_json(engine_dir / MANIFEST_FILE, "written last by a complete build")
    files = manifest.get("files")
    if not isinstance(files, dict) or CONFIG_FILE not in files or BUILD_CONFIG_FILE not in files \
            or not all(isinstance(meta, dict) for meta in files.values()):
        raise CorruptEngineError(f"engine {engine_dir}: manifest.json does not list config.json and build_config.json")
    if not is_dummy_engine(engine_dir):
        config = _read_json(engine_dir / CONFIG_FILE, "engine config")
        world_size = int((config.get("mapping") or {}).get("world_size", 1))
        for rank in range(world_size):
            if rank_file(rank) not in files:
                raise CorruptEngineError(f"engine {engine_dir}: manifest.json does not list {rank_file(rank)}")
    fast = all(FAST_HASH in meta for meta in files.values())
    if not fast:
        logger.warning("engine %s was written by an older llmapi: its manifest has no %s checksums, so only file "
                       "sizes and safetensors headers are checked on load. Save it again (LLM.save or llmapi build "
                       "--output), or delete it from the engine cache, to have it checked in full on every load",
                       engine_dir, FAST_HASH)
    for name, meta in files.items():
        path = engine_dir / name
        if not path.is_file():
            raise CorruptEngineError(f"engine {engine_dir}: {name} is missing")
        size = path.stat().st_size
        if size != meta.get("size"):
            raise CorruptEngineError(
                f"engine {engine_dir}: {name} is {size} bytes, manifest says {meta.get('size')} (truncated or altered)")
        if name.endswith(".safetensors"):
            _check_safetensors(path, size)
        elif name.endswith(".json"):
            _read_json(path, "listed in the manifest")
        if fast and not is_rank_file(name) and file_checksums(path, (FAST_HASH,))[FAST_HASH] != meta[FAST_HASH]:
            raise CorruptEngineError(f"engine {engine_dir}: {name} fails its {FAST_HASH} checksum "
                                     "(its content changed after it was built)")
    if full:
        for name, meta in files.items():
            if sha256_file(engine_dir / name) != meta.get("sha256"):
                raise CorruptEngineError(f"engine {engine_dir}: {name} fails its sha256 check (content altered)")
    return manifest


def is_dummy_engine(engine_dir: str | os.PathLike) -> bool:
    """True for a load_format="dummy" engine: config and tokenizer only, weights made at load time."""
    return _read_json(Path(engine_dir) / BUILD_CONFIG_FILE, "build config").get("load_format") == "dummy"


def read_engine(engine_dir: str | os.PathLike) -> tuple[dict, dict]:
    """Read (config, build_config) of a checked engine; a newer format than this library reads is refused."""
    engine_dir = Path(engine_dir)
    config = _read_json(engine_dir / CONFIG_FILE, "engine config")
    build_config = _read_json(engine_dir / BUILD_CONFIG_FILE, "build config")
    version = build_config.get("format_version")
    if version != FORMAT_VERSION:
        raise EngineCacheError(
            f"engine {engine_dir} has format version {version}; this llmapi ({library_version()}) reads version "
            f"{FORMAT_VERSION}: rebuild it from its model")
    if "architecture" not in config:
        raise CorruptEngineError(f"engine {engine_dir}: config.json has no 'architecture'")
    return config, build_config
