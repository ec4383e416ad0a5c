"""What LLM(...) does for adapters at start: the ranks' adapter settings, and the user-side AdapterManager."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional


def adapter_settings(args, info) -> tuple[dict, Optional[dict]]:
    """(engine config, the runner's adapter settings or None): {"max_loras", "max_lora_rank"} with LoRA,
    {"prompt_slots", "prompt_rows"} with prompt tables. An engine whose config lacks hf_architecture (built
    before it was recorded) gets it from its Hugging Face source's config.json when there is one."""
    lora, prompt = args.lora_config, args.prompt_adapter_config
    cfg = info.config
    if lora is None and prompt is None:
        return cfg, None
    settings = {}
    if lora is not None:
        if "hf_architecture" not in cfg and info.source.kind == "hf_dir":
            from ..models import hf_architecture

            hf_config = json.loads((Path(info.source.path) / "config.json").read_text())
            cfg = dict(cfg, hf_architecture=hf_architecture(hf_config))
        from .weights import linear_parts

        linear_parts(cfg)  # AdapterError now when the family cannot take adapters
        settings.update(max_loras=lora.max_loras, max_lora_rank=lora.max_lora_rank)
    if prompt is not None:
        if cfg.get("is_encoder_decoder"):
            from ..errors import AdapterError

            raise AdapterError("prompt tables (enable_prompt_adapter) are not supported for encoder-decoder models: "
                               "their virtual tokens have no place in the encoder's or the decoder's input yet")
        settings.update(prompt_slots=prompt.max_prompt_adapters, prompt_rows=prompt.max_prompt_adapter_token)
    return cfg, settings


def start_adapters(args, cfg: dict, install: Callable, state):
    """The LLM's AdapterManager: installs go through `install`; a waiting request that cannot be enqueued fails
    through `state` (the LLMState). The adapters of LoraConfig.lora_dir are loaded now, ids 1, 2, ..."""
    from ..runtime.model_runner import torch_dtype
    from .manager import AdapterManager
    from .requests import LoRARequest

    manager = AdapterManager(cfg, torch_dtype(cfg["dtype"]), install,
                             lambda rid, error: state.finish(rid, "error", error),
                             lora=args.lora_config, prompt=args.prompt_adapter_config)
    lora = args.lora_config
    for i, path in enumerate(lora.lora_dir if lora is not None else []):
        name = Path(path).name.removesuffix(".nemo") or f"lora{i + 1}"
        manager.add_lora(LoRARequest(name, i + 1, path, lora_ckpt_source=lora.lora_ckpt_source))
    return manager


def per_prompt(value, count: int, what: str) -> list:
    """One value for every prompt, or a list of `count` values (one per prompt)."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"got {len(value)} {what}s for {count} prompts (one, or one per prompt)")
        return list(value)
    return [value] * count


__all__ = ["adapter_settings", "start_adapters", "per_prompt"]
