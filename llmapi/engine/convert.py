"""Convert a model source (HF directory, Meta checkpoint, NeMo .nemo file, GGUF file or fairseq checkpoint) into an
engine directory through its family's convert_hf."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from llmapi.distributed.mapping import Mapping as RankMapping
from llmapi.distributed.mapping import check_mapping
from llmapi.engine import format as fmt
from llmapi.errors import ModelNotFoundError
from llmapi.hub import ModelSource, weight_files
from llmapi.quantization.config import QuantConfig

logger = logging.getLogger(__name__)

_DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
                  "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: str | None, device_type: str) -> str:
    """The engine dtype for a requested `dtype` ("auto", a name, or a torch.dtype).

    "auto" is float32 on CPU: CPU bf16/fp16 matmuls are many times slower than fp32 there, and the
    CPU tier checks logits against transformers in fp32. On a GPU "auto" keeps the checkpoint's
    torch_dtype; a checkpoint without one (GGUF holds quantized blocks) gets bfloat16, the native
    half type of the GPUs this targets, with fp32's exponent range.
    """
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if not isinstance(dtype, str) or (dtype != "auto" and dtype.lower() not in _DTYPE_ALIASES):
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    if dtype != "auto":
        return _DTYPE_ALIASES[dtype.lower()]
    if device_type == "cpu":
        return "float32"
    return _DTYPE_ALIASES.get(str(checkpoint_dtype).removeprefix("torch."), "bfloat16")


def checkpoint_dtype(source: ModelSource) -> str | None:
    """The torch_dtype an HF directory's config.json declares, a Meta checkpoint's tensor dtype, a .nemo file's
    training precision (None for GGUF or when absent)."""
    if source.kind == "nemo":
        from llmapi.engine import nemo

        return nemo.checkpoint_dtype(source.path)
    if source.kind == "meta":
        from llmapi.engine import meta

        return meta.checkpoint_dtype(source.path)
    if source.kind != "hf_dir":
        return None
    config = _read_hf_config(source.path)
    return config.get("dtype") or config.get("torch_dtype")


def checkpoint_quantization(source: ModelSource, requested: dict | None, load_format: str) -> dict | None:
    """The quantization section to build: a GPTQ checkpoint's own (detected from its quantization_config; any
    other quantized layout is refused), else the `requested` one. W*_GPTQ on a float checkpoint is refused
    unless its weights are dummy (a benchmark of the quantized shapes)."""
    from llmapi.quantization.config import GPTQ_ALGOS
    from llmapi.quantization.gptq import gptq_quant_config

    found = gptq_quant_config(_read_hf_config(source.path)) if source.kind == "hf_dir" else None
    wanted = QuantConfig.from_dict(requested)
    if found is not None:
        if wanted is not None and wanted != found:
            raise ValueError(f"quant={wanted.to_dict()} was asked, but {source.name or source.path} is a GPTQ "
                             f"checkpoint ({found.to_dict()}): load it with quant=None")
        return found.to_dict()
    if wanted is not None and wanted.quant_algo in GPTQ_ALGOS and load_format != "dummy":
        raise ValueError(f"quant_algo={wanted.quant_algo!r} needs a GPTQ checkpoint (config.json "
                         "quantization_config with quant_method 'gptq'); quantize a float model with "
                         "'int4_weight_only' or 'int4_awq'")
    return requested


def family(hf_config: dict) -> str:
    """The engine architecture of an HF config; UnsupportedModelError names an unsupported one."""
    from llmapi import models

    return models.family(hf_config).ENGINE_ARCHITECTURE


def check_architecture(hf_config: dict) -> None:
    """Raise UnsupportedModelError unless the HF config's architecture has a model family."""
    family(hf_config)


def _read_hf_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path} has no config.json") from None


class LazyStateDict(Mapping):
    """HF-named checkpoint tensors read on first access (safetensors via safe_open, .bin via torch.load).

    convert_hf pulls tensors one by one, so a model is never held twice in memory; a tqdm bar counts
    the tensors read.
    """

    def __init__(self, files: list[Path], desc: str = "Converting"):
        from safetensors import safe_open
        from tqdm.auto import tqdm

        self._where: dict[str, object] = {}  # name -> open safetensors handle, or the loaded tensor (.bin)
        self._handles = []
        for path in files:
            if path.suffix == ".safetensors":
                handle = safe_open(str(path), framework="pt", device="cpu")
                self._handles.append(handle)
                self._where.update(dict.fromkeys(handle.keys(), handle))
            else:
                self._where.update(_load_bin(path))
        self._seen: set[str] = set()
        self._bar = tqdm(total=len(self._where), desc=desc, unit="tensor", leave=False)

    def __getitem__(self, name: str) -> torch.Tensor:
        where = self._where[name]
        tensor = where if isinstance(where, torch.Tensor) else where.get_tensor(name)
        if name not in self._seen:
            self._seen.add(name)
            self._bar.update(1)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        self._bar.close()
        self._handles.clear()
        self._where.clear()


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: a pickle from the internet must not run code. mmap avoids a second copy in RAM,
    # but only the zip format supports it.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)


def save_sharded(out_dir: Path, engine_config: dict, mapping: RankMapping, weights: dict) -> None:
    """Write rank{r}.safetensors for every rank: the full weights on one rank, else each rank's cut."""
    if mapping.world_size == 1:
        fmt.save_rank_weights(out_dir, 0, weights)
        return
    from llmapi.distributed.sharding import build_rank_model, shard_weights

    for rank in range(mapping.world_size):
        model = build_rank_model(engine_config, mapping.for_rank(rank), "meta", fmt.DTYPES[engine_config["dtype"]])
        fmt.save_rank_weights(out_dir, rank, shard_weights(model, weights))


def _quantize(engine_config: dict, weights: dict, quant: QuantConfig | None, tokenizer_dir: Path) -> dict:
    """The engine weights quantized as `quant` asks, calibrating the float model first when the mode needs it."""
    from llmapi.quantization.apply import calibrate, quantize_engine_weights

    stats = None
    if quant is not None and quant.needs_calibration:
        logger.info("calibrating %s on %d texts", quant.quant_algo, quant.calibration_samples)
        # AWQ and FP8 round with each linear's mean x^T x (its output error), the other modes need input ranges.
        stats = calibrate(engine_config, weights, tokenizer_dir, quant, hessians=quant.needs_hessians)
    return quantize_engine_weights(engine_config, weights, quant, stats)


def _read_hf_dir(source: ModelSource, out_dir: Path, dummy: bool, check) -> tuple[dict, Mapping | None, dict]:
    hf_config = _read_hf_config(source.path)
    check(hf_config)  # fail fast, before any weight is read
    fmt.copy_tokenizer_files(source.path, out_dir)
    gen_path = source.path / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    if dummy:
        return hf_config, None, generation
    files = weight_files(source.path)
    if not files:
        raise ModelNotFoundError(f"{source.name or source.path}: no weights (*.safetensors or pytorch_model*.bin)")
    return hf_config, LazyStateDict(files, desc=f"Converting {source.path.name}"), generation


def _read_gguf(source: ModelSource, out_dir: Path, dummy: bool, check) -> tuple[dict, Mapping | None, dict]:
    from llmapi.engine import gguf

    state_dict = None
    with gguf.parsed_once():  # the config, the tensors and the tokenizer from one parse of the file
        if dummy:
            hf_config, generation = gguf.load_gguf_config(source.path)
            check(hf_config)
        else:  # the architecture is checked before any tensor is dequantized
            hf_config, state_dict, generation = gguf.load_gguf(source.path, check_config=check)
        gguf.save_gguf_tokenizer(source.path, out_dir, generation)
    fmt.write_json(out_dir / "generation_config.json", generation)
    return hf_config, state_dict, generation


def _read_done(out_dir: Path, dummy: bool, hf_config: dict, state_dict, generation: dict):
    """A foreign-format reader's result: its generation settings written beside the engine; the state dict closed
    and dropped for dummy weights."""
    fmt.write_json(out_dir / "generation_config.json", generation)
    if dummy:
        state_dict.close()
        return hf_config, None, generation
    return hf_config, state_dict, generation


def _read_meta(source: ModelSource, out_dir: Path, dummy: bool, check) -> tuple[dict, Mapping | None, dict]:
    from llmapi.engine import meta

    hf_config, state_dict = meta.load_meta(source.path)  # shards memory-mapped, shapes checked, nothing read yet
    try:
        generation = meta.save_meta_tokenizer(source.path, out_dir)
        hf_config.update(generation)
        check(hf_config)
    except BaseException:
        state_dict.close()
        raise
    return _read_done(out_dir, dummy, hf_config, state_dict, generation)


def _read_nemo(source: ModelSource, out_dir: Path, dummy: bool, check) -> tuple[dict, Mapping | None, dict]:
    from llmapi.engine import nemo

    # Options are checked before the archive is extracted (beside out_dir: the same disk), the shards then
    # memory-mapped and their shapes checked, nothing read yet.
    nemo_config, hf_config, state_dict = nemo.load_nemo(source.path, work_dir=out_dir.parent)
    try:
        generation = nemo.save_nemo_tokenizer(state_dict.root, nemo_config, out_dir, f".nemo file {source.path.name}")
        generation = {k: v for k, v in generation.items() if v is not None}  # no tokenizer: no special ids
        hf_config.update(generation)
        check(hf_config)
    except BaseException:
        state_dict.close()
        raise
    return _read_done(out_dir, dummy, hf_config, state_dict, generation)


def _read_fairseq(source: ModelSource, out_dir: Path, dummy: bool, check) -> tuple[dict, Mapping | None, dict]:
    from llmapi.engine import fairseq

    # model.pt unpickled once (its globals checked first, its tensors memory-mapped when it is a zip file), read
    # as an FSMT config and state dict; FSMTTokenizer's files written.
    hf_config, state_dict, generation = fairseq.read_fairseq(source.path, out_dir)
    try:
        check(hf_config)
    except BaseException:
        state_dict.close()
        raise
    return _read_done(out_dir, dummy, hf_config, state_dict, generation)


# Source kind -> reader: (source, out_dir, dummy, check) -> (HF config dict, HF-named state dict or None when
# dummy, generation config). A reader calls check(hf_config) before it reads any weight, and writes the
# tokenizer files into out_dir. A non-HF format becomes an HF-shaped config and state dict here, so the
# family's convert_hf serves every format.
_SOURCE_READERS = {"hf_dir": _read_hf_dir, "gguf": _read_gguf, "meta": _read_meta, "nemo": _read_nemo,
                   "fairseq": _read_fairseq}


def build_engine_dir(source: ModelSource, settings: fmt.BuildSettings, out_dir: Path) -> dict:
    """Write a complete engine for `source` into the (empty) `out_dir`; returns its config.

    load_format="dummy" reads the config only and writes no weights: the runner makes them with the
    family's dummy_weights at load time (build_config.json says "load_format": "dummy"), so a benchmark
    engine of a large model costs no disk and no checksum pass.
    """
    from llmapi import models
    from llmapi.models.base import token_id_list

    out_dir = Path(out_dir)
    dtype = fmt.DTYPES[settings.dtype]
    dummy = settings.load_format == "dummy"
    state_dict = None
    mapping = RankMapping.from_dict(settings.mapping)

    quant = QuantConfig.from_dict(settings.quantization)

    def check(hf_config: dict) -> None:
        """A supported architecture whose shapes this mapping can split (before any weight is read)."""
        family(hf_config)
        engine_config = models.config_from_hf(hf_config, dtype)
        check_mapping(engine_config, mapping, settings.embedding_sharding_dim)

    reader = _SOURCE_READERS.get(source.kind)
    if reader is None:
        raise ValueError(f"cannot convert a source of kind {source.kind!r}")
    hf_config, state_dict, generation = reader(source, out_dir, dummy, check)

    engine_arch = family(hf_config)
    weights = None
    if dummy:
        engine_config = models.config_from_hf(hf_config, dtype)
    else:
        try:
            if quant is not None and quant.from_gptq_checkpoint:  # the checkpoint's own integer weights
                from llmapi.quantization.gptq import convert_gptq

                engine_config, weights = convert_gptq(hf_config, state_dict, dtype, quant)
            else:
                engine_config, weights = models.convert_hf(hf_config, state_dict, dtype)
                weights = _quantize(engine_config, weights, quant, out_dir)
        finally:
            if hasattr(state_dict, "close"):
                state_dict.close()
    engine_config = dict(engine_config)
    # hf_architecture: the family that converted it, whose HF module names LoRA adapters are mapped by.
    engine_config.update(architecture=engine_arch, hf_architecture=models.hf_architecture(hf_config),
                         dtype=settings.dtype,
                         mapping=dict(settings.mapping), embedding_sharding_dim=settings.embedding_sharding_dim,
                         quantization=dict(settings.quantization))

    # Generation stops on generation_config.json's eos when there is one (chat models list their
    # end-of-turn token there), else on config.json's.
    if generation.get("eos_token_id") is not None:
        engine_config["eos_token_id"] = token_id_list(generation["eos_token_id"])
    else:
        engine_config["eos_token_id"] = token_id_list(engine_config.get("eos_token_id"))

    fmt.write_json(out_dir / fmt.CONFIG_FILE, engine_config)
    if weights is not None:
        save_sharded(out_dir, engine_config, mapping, weights)
        del weights
    fmt.write_json(out_dir / fmt.BUILD_CONFIG_FILE, {
        "max_seq_len": engine_config.get("max_position_embeddings"),
        "tokens_per_block": fmt.TOKENS_PER_BLOCK,
        "load_format": settings.load_format,
        "source": source.identity,
        "library_version": fmt.library_version(),
        "format_version": fmt.FORMAT_VERSION,
    })
    fmt.write_manifest(out_dir)
    return engine_config
