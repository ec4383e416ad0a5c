"""Engines: resolve a model, convert it once into a cached on-disk engine, and hand back where it lies."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from llmapi.engine import cache
from llmapi.engine.cache import LOCK_TIMEOUT_S, cache_root, discard_corrupt, get_or_build, save_engine, stats
from llmapi.engine.format import BuildSettings, check_engine, load_rank_weights, read_engine
from llmapi.hub import ModelSource, resolve_source

__all__ = ["EngineInfo", "BuildSettings", "build_engine", "check_engine", "read_engine", "load_rank_weights",
           "save_engine", "cache_root", "get_or_build", "discard_corrupt", "stats", "cache"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineInfo:
    """A ready engine: its directory, its config.json and build_config.json, and how it was obtained."""

    path: Path
    """The engine directory (a cache entry, or the saved engine the user passed)."""
    config: dict
    """config.json: architecture, sizes, dtype, mapping, quantization, eos ids."""
    build_config: dict
    """build_config.json: max_seq_len, tokens_per_block, source identity, versions."""
    built: bool
    """True when this call converted the model; False on a cache hit or a saved engine."""
    source: ModelSource
    """Where the model came from."""


def _default_device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_engine(
    model: str | os.PathLike,
    *,
    dtype: str = "auto",
    load_format: str = "auto",
    revision: str | None = None,
    token: str | bool | None = None,
    device_type: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    full_check: bool = False,
    mapping: dict | None = None,
    embedding_sharding_dim: int = 0,
    quantization: dict | None = None,
    cache_lock_timeout: float = LOCK_TIMEOUT_S,
) -> EngineInfo:
    """Resolve `model` (hub id, HF directory, .gguf file or saved engine) and return its engine, building it if needed.

    dtype: "auto" | "float32" | "bfloat16" | "float16" ("auto": float32 on CPU, the checkpoint's dtype on GPU).
    load_format: "auto" reads the weights; "dummy" builds random weights from the config alone.
    revision, token: for hub ids (HF_HOME / HF_HUB_OFFLINE are honoured). device_type: "cpu" or "cuda"
    (default: cuda when available), used only to resolve dtype="auto". full_check: verify every file's
    sha256 (a cold read of the whole engine); without it, sizes, headers and the small files' checksums are
    checked here, and each rank file's checksum by the loader as it streams it. mapping: {world_size, tp_size,
    pp_size} (default one rank) and embedding_sharding_dim: how the engine is split into rank{r}.safetensors (a saved engine's must match).
    quantization: a QuantConfig.to_dict() section (default unquantized, or a GPTQ checkpoint's own; a saved
    engine's must match when given). cache_lock_timeout: seconds to wait for another process building the
    same engine.
    Raises ModelNotFoundError, UnsupportedModelError, CorruptEngineError (a saved engine that fails its check),
    EngineLockTimeoutError, EngineCacheError (a miss in a cache directory the user cannot write).
    """
    from llmapi.engine.convert import check_architecture, checkpoint_dtype, checkpoint_quantization, resolve_dtype

    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    device_type = device_type or _default_device_type()
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    source = resolve_source(model, revision=revision, token=token, weights=load_format != "dummy",
                            check_config=check_architecture)

    if source.kind == "engine":
        # A saved engine is final: its dtype and weights are what they are.
        path, built = get_or_build(source, BuildSettings(), full_check=full_check)
        config, build_config = read_engine(path)
        requested = resolve_dtype(dtype, config["dtype"], device_type) if dtype != "auto" else config["dtype"]
        if requested != config["dtype"]:
            raise ValueError(f"dtype={dtype!r} but the saved engine {model!s} is {config['dtype']}; "
                             "rebuild it from the model with that dtype")
        if load_format == "dummy":
            raise ValueError(f"load_format='dummy' needs a model checkpoint, but {model!s} is a saved engine")
        wanted = BuildSettings(mapping=mapping or BuildSettings().mapping).mapping
        if config.get("mapping", BuildSettings().mapping) != wanted:
            raise ValueError(f"the saved engine {model!s} is split as {config.get('mapping')}, but "
                             f"tensor_parallel_size={wanted['tp_size']}, pipeline_parallel_size={wanted['pp_size']} "
                             "was asked; pass its sizes or rebuild it from the model")
        if quantization is not None:
            wanted_quant = BuildSettings(quantization=quantization).quantization
            if config.get("quantization", BuildSettings().quantization) != wanted_quant:
                raise ValueError(f"the saved engine {model!s} has quantization {config.get('quantization')}, but "
                                 f"{wanted_quant} was asked; rebuild it from the model with that quant")
        return EngineInfo(path, config, build_config, built, source)

    quantization = checkpoint_quantization(source, quantization, load_format)  # a GPTQ checkpoint sets its own
    settings = BuildSettings(quantization=quantization or BuildSettings().quantization,
                             dtype=resolve_dtype(dtype, checkpoint_dtype(source), device_type), load_format=load_format,
                             mapping=mapping or BuildSettings().mapping, embedding_sharding_dim=embedding_sharding_dim)
    path, built = get_or_build(source, settings, full_check=full_check, cache_dir=cache_dir,
                               lock_timeout=cache_lock_timeout)
    config, build_config = read_engine(path)
    return EngineInfo(path, config, build_config, built, source)
