"""`llmapi bench --num-loras N`: random PEFT LoRA adapters written for the bench model's shapes, and which adapter
each request of the workload runs with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

ALL_TARGETS = "all"


def lora_modules(engine_config: dict) -> dict[str, tuple[int, int]]:
    """HF linear name (without the model's prefix, e.g. "layers.0.self_attn.q_proj") -> (in_features,
    out_features), from the family's fused_linears declaration (the adapter reader's own plan)."""
    from .lora.weights import linear_parts

    return {name: (part.in_features, part.rows) for name, part in linear_parts(engine_config).items()}


def resolve_targets(engine_config: dict, targets: str) -> list[str]:
    """The leaf module names --lora-targets names ("all": every linear the family declares, e.g. q_proj ...
    down_proj for Llama; else a comma-separated list of them); ValueError naming one the family lacks."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in lora_modules(engine_config)})
    if targets == ALL_TARGETS:
        return leaves
    chosen = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in leaves]
    if not chosen or unknown:
        what = f"no linear {', '.join(unknown)}" if unknown else "empty"
        raise ValueError(f"--lora-targets={targets!r} is invalid: {what}; this model's linears are "
                         f"{', '.join(leaves)} (or 'all')")
    return chosen


def write_random_adapters(engine_config: dict, root: Path, count: int, rank: int, targets: Sequence[str],
                          seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """`count` PEFT LoRA directories (adapter_config.json + adapter_model.safetensors) under `root`, named
    adapter0, adapter1, ...: rank `rank` over every linear whose leaf name is in `targets`, lora_alpha = 2 * rank,
    A and B nonzero (PEFT's default B is zero, which would change nothing). A ~ N(0, 1 / in) and B ~ N(0, 1 / rank)
    / 4 keep the adapter's delta a fraction of a unit-scale input's norm. Each tensor is drawn whole in `dtype` (a
    Llama-3.1-8B-shape adapter of rank 16 over all linears, 42M values, takes about a second)."""
    from safetensors.torch import save_file

    if not isinstance(count, int) or count < 1:
        raise ValueError(f"--num-loras={count!r} is invalid: must be an int >= 1")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--lora-rank={rank!r} is invalid: must be an int >= 1")
    modules = {name: shape for name, shape in lora_modules(engine_config).items()
               if name.rsplit(".", 1)[-1] in set(targets)}
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for index in range(count):
        tensors = {}
        for name, (fin, fout) in modules.items():
            key = f"base_model.model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fin, generator=gen, dtype=dtype).mul_(fin ** -0.5)
            tensors[f"{key}.lora_B.weight"] = torch.randn(fout, rank, generator=gen, dtype=dtype).mul_(
                0.25 * rank ** -0.5)
        path = Path(root) / f"adapter{index}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                  "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
                  "fan_in_fan_out": False, "target_modules": sorted(set(targets)), "base_model_name_or_path": None,
                  "inference_mode": True}
        (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
        paths.append(path)
    return paths


def lora_requests(paths: Sequence[Path], num_requests: int, concurrency: int) -> list:
    """One LoRARequest per request: round-robin over the adapters (ids 1, 2, ...); a bs-1 run (concurrency 1)
    sends every request to the first adapter, so the comparison with the base model is one adapter's cost."""
    from .lora import LoRARequest

    adapters = [LoRARequest(f"bench{i}", i + 1, str(p)) for i, p in enumerate(paths)]
    if concurrency == 1:
        return [adapters[0]] * num_requests
    return [adapters[i % len(adapters)] for i in range(num_requests)]


def lora_kwargs(num_loras: int, rank: int) -> dict:
    """LLM(...) arguments for N adapters of rank R, all on the device at once (vLLM's names)."""
    return dict(enable_lora=True, max_loras=num_loras, max_lora_rank=rank)


def check_lora_args(a) -> None:
    """ValueError for LoRA flags that are out of range or do not go together."""
    if a.num_loras < 0:
        raise ValueError(f"--num-loras={a.num_loras} is invalid: must be >= 0 (0: no adapters)")
    if a.lora_rank < 1:
        raise ValueError(f"--lora-rank={a.lora_rank} is invalid: must be >= 1")
    if not a.num_loras and a.lora_compare_base:
        raise ValueError("--lora-compare-base needs --num-loras N")


__all__ = ["write_random_adapters", "lora_requests", "lora_modules", "resolve_targets", "lora_kwargs",
           "check_lora_args"]
