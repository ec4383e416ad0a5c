"""Model registry: the Hugging Face architectures each family converts, and the model that runs every engine.

A family is a module of this package with `HF_ARCHITECTURES` (the `architectures` entries it converts),
`ENGINE_ARCHITECTURE` (the `architecture` its engine configs carry), `MODEL_TYPES` (config `model_type` -> one
of those, for configs without `architectures`), `config_from_hf` and `convert_hf`; it may have `fused_linears`
(the HF linears stacked into each engine linear, which LoRA adapters and, with GPTQ_CHECKPOINTS, GPTQ read) and
`order_rows` (a stacked tensor's rows in the engine's order, where the converter regroups them). Every decoder-only
family converts to the general decoder of models/gpt.py, every encoder-decoder family (T5, BART, FSMT) to the
encoder-decoder model of models/encdec.py.
"""

from collections.abc import Mapping
from types import ModuleType

import torch

from llmapi.errors import UnsupportedModelError
from llmapi.models import bart, fsmt, gpt2, gpt_bigcode, llama, nemotron, opt, starcoder2, t5
from llmapi.models.encdec import ARCHITECTURE as ENCDEC_ARCHITECTURE
from llmapi.models.encdec import EncoderDecoderModel, complete_encdec_config, is_encoder_decoder
from llmapi.models.gpt import GPTForCausalLM, LinearSpec, complete_config, layer_linears

FAMILIES: tuple[ModuleType, ...] = (llama, gpt2, gpt_bigcode, opt, starcoder2, nemotron, t5, bart, fsmt)
"""The family modules, in the order their architectures are listed to users."""

SUPPORTED_HF_ARCHITECTURES = {arch: family for family in FAMILIES for arch in family.HF_ARCHITECTURES}
"""HF `architectures` entry -> the family module that converts it."""

ENGINE_ARCHITECTURES = ("GPTForCausalLM", "LlamaForCausalLM", "GPT2LMHeadModel", ENCDEC_ARCHITECTURE)
"""The `architecture` field of engine configs (LlamaForCausalLM and GPT2LMHeadModel from engines saved before the
general model)."""

_MODEL_TYPES = {model_type: arch for family in FAMILIES for model_type, arch in family.MODEL_TYPES.items()}


def _unsupported(name: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"architecture {name!r} is not supported; supported: {', '.join(SUPPORTED_HF_ARCHITECTURES)}"
    )


def get_model_class(architecture: str) -> type:
    """The model class of an engine architecture (an HF architecture name is accepted too)."""
    if architecture == ENCDEC_ARCHITECTURE or SUPPORTED_HF_ARCHITECTURES.get(architecture) in (t5, bart, fsmt):
        return EncoderDecoderModel
    if architecture in ENGINE_ARCHITECTURES or architecture in SUPPORTED_HF_ARCHITECTURES:
        return GPTForCausalLM
    raise _unsupported(architecture)


def hf_architecture(hf_config: dict) -> str:
    """The supported HF architecture named by a config.json dict (`architectures`, else `model_type`)."""
    names = list(hf_config.get("architectures") or [])
    if not names and hf_config.get("model_type") in _MODEL_TYPES:
        names = [_MODEL_TYPES[hf_config["model_type"]]]
    for name in names:
        if name in SUPPORTED_HF_ARCHITECTURES:
            return name
    name = names[0] if names else str(hf_config.get("model_type"))
    if hf_config.get("is_encoder_decoder"):
        encdec = [arch for arch, fam in SUPPORTED_HF_ARCHITECTURES.items() if fam in (t5, bart, fsmt)]
        raise UnsupportedModelError(f"encoder-decoder architecture {name!r} is not supported; supported "
                                    f"encoder-decoder architectures: {', '.join(encdec)}")
    raise _unsupported(name)


def family(hf_config: dict) -> ModuleType:
    """The family module that converts an HF config."""
    return SUPPORTED_HF_ARCHITECTURES[hf_architecture(hf_config)]


def _complete(engine_config: dict) -> dict:
    return (complete_encdec_config if is_encoder_decoder(engine_config) else complete_config)(engine_config)


def config_from_hf(hf_config: dict, dtype: torch.dtype) -> dict:
    """Engine config.json fields (all but mapping/quantization) of an HF config, without touching weights."""
    return _complete(family(hf_config).config_from_hf(hf_config, dtype))


def convert_hf(hf_config: dict, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict, dict]:
    """(engine config, engine weights) of an HF checkpoint, by the family its config names."""
    engine_config, weights = family(hf_config).convert_hf(hf_config, state_dict, dtype)
    return _complete(engine_config), weights


__all__ = [
    "ENGINE_ARCHITECTURES",
    "FAMILIES",
    "EncoderDecoderModel",
    "SUPPORTED_HF_ARCHITECTURES",
    "GPTForCausalLM",
    "LinearSpec",
    "complete_config",
    "config_from_hf",
    "convert_hf",
    "family",
    "get_model_class",
    "hf_architecture",
    "is_encoder_decoder",
    "layer_linears",
]
