"""One rank's model (pipeline stage, then tensor-parallel swap) and its shard of the engine weights."""

from __future__ import annotations

from collections.abc import Iterator, Mapping as MappingABC
from pathlib import Path

import torch
from torch import nn

from llmapi.distributed.mapping import Mapping, check_mapping
from llmapi.distributed.pipeline import apply_pipeline_stage
from llmapi.distributed.tensor_parallel import apply_tensor_parallel
from llmapi.models import get_model_class
from llmapi.models.base import dummy_tensor
from llmapi.quantization.config import QuantConfig
from llmapi.quantization.apply import apply_quantization, check_quant_device, quantize_engine_weights


def build_rank_model(engine_config: dict, mapping: Mapping, device, dtype: torch.dtype, comm=None) -> nn.Module:
    """The model of `mapping.rank`, with uninitialized weights on `device` ("meta": shapes only).

    `comm` runs the TP collectives; a model built only to cut weights (conversion) never runs and needs none.
    """
    cfg = engine_config
    dim = cfg.get("embedding_sharding_dim", 0)
    check_mapping(cfg, mapping, dim)
    model = get_model_class(cfg["architecture"])(cfg, device="meta", dtype=dtype)
    apply_pipeline_stage(model, cfg, mapping)
    apply_tensor_parallel(model, cfg, mapping, comm, dim)
    quant = QuantConfig.from_dict(cfg.get("quantization"))
    check_quant_device(quant, device)
    apply_quantization(model, quant)
    if str(device) != "meta":
        model.materialize(device, dtype)
    return model


def shard_weights(model: nn.Module, full: MappingABC[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's tensors, named as `model`'s parameters, cut from the full engine weights `full`.

    A sharded module cuts its own tensor (`shard`); any other parameter is taken whole. A module's
    `full_names` names the full tensor a parameter comes from when it differs (an untied copy of a head).
    """
    out = {}
    for module_name, module in model.named_modules():
        shard = getattr(module, "shard", None)
        for pname, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}" if module_name else pname
            source = getattr(module, "full_names", {}).get(pname, name)
            out[name] = shard(pname, full[source]) if shard is not None else full[source]
    return out


class DummyWeights(MappingABC):
    """The full dummy engine weights, each drawn when read (one full tensor in memory at a time)."""

    def __init__(self, engine_config: dict, dtype: torch.dtype, seed: int = 0, device="cpu"):
        full = get_model_class(engine_config["architecture"])(engine_config, "meta", dtype)
        self._shapes = {name: p.shape for name, p in full.state_dict().items()}
        self._dtype, self._seed, self._device = dtype, seed, device

    def __getitem__(self, name: str) -> torch.Tensor:
        return dummy_tensor(name, self._shapes[name], self._dtype, self._seed, self._device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def load_rank_model(model: nn.Module, engine_dir, rank: int, dummy: bool, engine_config: dict,
                    dtype: torch.dtype, device) -> None:
    """Fill `model` with rank `rank`'s weights: its engine file, or its shard of the dummy weights."""
    if dummy:
        full = DummyWeights(engine_config, dtype, seed=0, device=device)
        quant = QuantConfig.from_dict(engine_config.get("quantization"))
        weights = shard_weights(model, full if quant is None else quantize_engine_weights(engine_config, full, quant))
        model.load_weights(weights)
        return
    from llmapi.engine.format import rank_file, weights_checksum
    from llmapi.engine.loader import load_into

    # The file's checksum is verified on the bytes streamed into the model (none for an engine built before it).
    load_into(Path(engine_dir) / rank_file(rank), model.state_dict(), checksum=weights_checksum(engine_dir, rank))
