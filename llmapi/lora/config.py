"""LoraConfig (TensorRT-LLM's) and its resolution with vLLM's LLM(enable_lora=..., max_loras=...) arguments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

from ..config import rejects_unknown_arguments

# vLLM's defaults for LLM(enable_lora=True) without sizes.
VLLM_DEFAULTS = dict(max_loras=1, max_lora_rank=16)


def _check(ok: bool, name: str, value: Any, must: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {must}")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@rejects_unknown_arguments("LoraConfig()")
@dataclass
class LoraConfig:
    """LoRA settings (TensorRT-LLM's LoraConfig): `LLM(model, lora_config=LoraConfig(max_loras=4))`, or vLLM's
    `LLM(model, enable_lora=True, max_loras=4, max_lora_rank=16, max_cpu_loras=8)`."""

    lora_dir: List[str] = field(default_factory=list)
    """Adapters loaded at start: their ids are 1, 2, ... in this order and their names the paths' last parts."""
    lora_ckpt_source: str = "hf"
    """The format of `lora_dir`'s adapters: "hf" (PEFT directories) or "nemo" (NeMo LoRA .nemo files)."""
    max_lora_rank: int = 64
    """The largest rank an adapter may have (each target module's r); device slots are sized for it."""
    max_loras: int = 4
    """Adapters held on the device at once; a step mixes requests of at most this many adapters (others wait)."""
    max_cpu_loras: Optional[int] = None
    """Adapters kept loaded in host memory (least recently used out first); default: max_loras."""
    lora_target_modules: List[str] = field(default_factory=list)
    """The Hugging Face module names adapters may target (e.g. ["q_proj", "v_proj"]); empty: every linear the
    model family declares."""

    def __post_init__(self):
        _check(isinstance(self.lora_dir, (list, tuple)) and all(isinstance(p, str) for p in self.lora_dir),
               "lora_dir", self.lora_dir, "must be a list of paths")
        self.lora_dir = list(self.lora_dir)
        _check(self.lora_ckpt_source in ("hf", "nemo"), "lora_ckpt_source", self.lora_ckpt_source,
               "must be 'hf' or 'nemo'")
        for name in ("max_lora_rank", "max_loras"):
            _check(_positive_int(getattr(self, name)), name, getattr(self, name), "must be an int >= 1")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        _check(_positive_int(self.max_cpu_loras) and self.max_cpu_loras >= self.max_loras, "max_cpu_loras",
               self.max_cpu_loras, f"must be an int >= max_loras={self.max_loras}")
        _check(isinstance(self.lora_target_modules, (list, tuple))
               and all(isinstance(m, str) and m for m in self.lora_target_modules),
               "lora_target_modules", self.lora_target_modules, "must be a list of module names")
        self.lora_target_modules = list(self.lora_target_modules)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_lora_config(lora_config, enable_lora: Optional[bool], max_loras: Optional[int],
                        max_lora_rank: Optional[int], max_cpu_loras: Optional[int]) -> Optional[LoraConfig]:
    """The one LoraConfig of LLM(...)'s LoRA arguments, or None when LoRA is off. Both spellings may be given when
    they agree; a value given both ways with different values raises a ValueError naming both."""
    if isinstance(lora_config, dict):
        from ..config import from_kwargs
        lora_config = from_kwargs(LoraConfig, lora_config, "LoraConfig()")
    _check(lora_config is None or isinstance(lora_config, LoraConfig), "lora_config", lora_config,
           "must be a LoraConfig, a dict or None")
    _check(enable_lora is None or isinstance(enable_lora, bool), "enable_lora", enable_lora, "must be True or False")
    sizes = dict(max_loras=max_loras, max_lora_rank=max_lora_rank, max_cpu_loras=max_cpu_loras)
    for name, v in sizes.items():
        _check(v is None or _positive_int(v), name, v, "must be an int >= 1 or None")
    given = {name: v for name, v in sizes.items() if v is not None}
    if enable_lora is False and lora_config is not None:
        raise ValueError("LLM(): enable_lora=False and lora_config=LoraConfig(...) disagree (lora_config turns LoRA "
                         "on); pass one of them")
    if lora_config is None:
        if not enable_lora:
            if given:
                raise ValueError(f"LLM(): {', '.join(f'{k}={v!r}' for k, v in given.items())} needs "
                                 "enable_lora=True (or lora_config=LoraConfig(...))")
            return None
        return LoraConfig(**{**VLLM_DEFAULTS, **given})
    for name, v in given.items():
        ours = getattr(lora_config, name)
        if ours != v:
            raise ValueError(f"LLM(): {name}={v!r} and lora_config.{name}={ours!r} disagree (the same setting "
                             "under vLLM's and TensorRT-LLM's names); pass one of them")
    return lora_config


@dataclass(frozen=True)
class PromptAdapterConfig:
    """Prompt-tuning settings (vLLM's LLM(enable_prompt_adapter=True, max_prompt_adapters=...,
    max_prompt_adapter_token=...))."""

    max_prompt_adapters: int = 1
    """Prompt tables held on the device at once."""
    max_prompt_adapter_token: int = 512
    """Rows of one table (all its tasks' virtual tokens together) a device slot holds."""

    def __post_init__(self):
        for name in ("max_prompt_adapters", "max_prompt_adapter_token"):
            _check(_positive_int(getattr(self, name)), name, getattr(self, name), "must be an int >= 1")


def resolve_prompt_adapter_config(enable: bool, max_prompt_adapters: Optional[int],
                                  max_prompt_adapter_token: Optional[int]) -> Optional[PromptAdapterConfig]:
    """The PromptAdapterConfig of LLM(...)'s prompt-adapter arguments, or None when prompt tuning is off."""
    _check(isinstance(enable, bool), "enable_prompt_adapter", enable, "must be True or False")
    given = {k: v for k, v in dict(max_prompt_adapters=max_prompt_adapters,
                                   max_prompt_adapter_token=max_prompt_adapter_token).items() if v is not None}
    if not enable:
        if given:
            raise ValueError(f"LLM(): {', '.join(f'{k}={v!r}' for k, v in given.items())} needs "
                             "enable_prompt_adapter=True")
        return None
    return PromptAdapterConfig(**given)


__all__ = ["LoraConfig", "PromptAdapterConfig", "resolve_lora_config", "resolve_prompt_adapter_config"]
