"""Model registry: Hugging Face architectures we convert, and the torch model class of each engine architecture."""

from collections.abc import Mapping

import torch

from llmapi.errors import UnsupportedModelError
from llmapi.models.gpt2 import GPT2LMHeadModel
from llmapi.models.llama import LlamaForCausalLM

SUPPORTED_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "LlamaForCausalLM",
    "MistralForCausalLM": "LlamaForCausalLM",  # same tensors; configs with an active sliding window are refused
    "GPT2LMHeadModel": "GPT2LMHeadModel",
}
"""HF `architectures` entry -> engine architecture (the model class that runs it)."""

MODEL_CLASSES = {"LlamaForCausalLM": LlamaForCausalLM, "GPT2LMHeadModel": GPT2LMHeadModel}
"""Engine architecture -> model class."""

_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gpt2": "GPT2LMHeadModel"}


def _unsupported(name: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"architecture {name!r} is not supported; supported: {', '.join(SUPPORTED_HF_ARCHITECTURES)}"
    )


def get_model_class(architecture: str) -> type:
    """The model class of an engine architecture (an HF architecture name is accepted too)."""
    cls = MODEL_CLASSES.get(SUPPORTED_HF_ARCHITECTURES.get(architecture, architecture))
    if cls is None:
        raise _unsupported(architecture)
    return cls


def hf_architecture(hf_config: dict) -> str:
    """The supported HF architecture named by a config.json dict (`architectures`, else `model_type`)."""
    names = list(hf_config.get("architectures") or [])
    if not names and hf_config.get("model_type") in _MODEL_TYPES:
        names = [_MODEL_TYPES[hf_config["model_type"]]]
    for name in names:
        if name in SUPPORTED_HF_ARCHITECTURES:
            return name
    raise _unsupported(names[0] if names else str(hf_config.get("model_type")))


def config_from_hf(hf_config: dict, dtype: torch.dtype) -> dict:
    """Engine config.json fields (all but mapping/quantization) of an HF config, without touching weights."""
    return get_model_class(hf_architecture(hf_config)).config_from_hf(hf_config, dtype)


def convert_hf(hf_config: dict, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict, dict]:
    """(engine config, engine weights) of an HF checkpoint, by the family its config names."""
    return get_model_class(hf_architecture(hf_config)).convert_hf(hf_config, state_dict, dtype)


__all__ = [
    "MODEL_CLASSES",
    "SUPPORTED_HF_ARCHITECTURES",
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "config_from_hf",
    "convert_hf",
    "get_model_class",
    "hf_architecture",
]
