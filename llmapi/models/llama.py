"""Llama family (Llama 1-3, CodeLlama, Mistral): the Hugging Face conversion to the general decoder."""

from collections.abc import Mapping

import torch

from llmapi.errors import UnsupportedModelError
from llmapi.layers.activation import get_activation
from llmapi.layers.rotary import rope_inv_freq
from llmapi.models.base import HFTensors, attention_shape, dtype_name, require_positive, sliding_window, token_id_list

HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
ENGINE_ARCHITECTURE = "LlamaForCausalLM"  # the engine config's name (engines of every family run models/gpt.py)
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
GPTQ_CHECKPOINTS = True  # GPTQ checkpoints convert (llmapi.quantization.gptq reads fused_linears)


def _rope_from_hf(hf_config: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from transformers 5 `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError("per-layer-type rope parameters are not supported")
    theta = float(params.pop("rope_theta", None) or hf_config.get("rope_theta") or 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if float(params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return theta, None
    if rope_type in ("llama3", "yarn") and "original_max_position_embeddings" not in params:
        params["original_max_position_embeddings"] = hf_config.get(
            "original_max_position_embeddings", hf_config["max_position_embeddings"])
    return theta, {"rope_type": rope_type, **params}


def config_from_hf(hf_config: dict, dtype: torch.dtype) -> dict:
    """Engine config.json fields (all but mapping/quantization) from an HF Llama/Mistral config.json dict."""
    require_positive(hf_config, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings")
    hidden = hf_config["hidden_size"]
    heads, kv_heads, head_dim = attention_shape(hf_config)
    if head_dim % 2:
        raise UnsupportedModelError(f"head_dim {head_dim} must be even for rotary embeddings")
    max_pos = hf_config["max_position_embeddings"]
    # transformers' Mistral applies `sliding_window` to every layer; its Llama ignores the key.
    mistral = "MistralForCausalLM" in (hf_config.get("architectures") or []) or hf_config.get("model_type") == "mistral"
    window = sliding_window(hf_config, max_pos) if mistral else None
    theta, scaling = _rope_from_hf(hf_config)
    get_activation(hf_config.get("hidden_act", "silu"))  # unknown activations fail at conversion, not at load
    rope_inv_freq(head_dim, theta, scaling, max_pos, device="meta")  # likewise unknown rope types
    return {
        "architecture": "LlamaForCausalLM",
        "dtype": dtype_name(dtype),
        "vocab_size": hf_config["vocab_size"],
        "hidden_size": hidden,
        "num_hidden_layers": hf_config["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": hf_config.get("hidden_act", "silu"),
        "intermediate_size": hf_config["intermediate_size"],
        "norm_epsilon": float(hf_config.get("rms_norm_eps", 1e-6)),
        "position_embedding_type": "rope_gpt_neox",
        "rotary_dim": head_dim,
        "norm_type": "rmsnorm",
        "gated_mlp": True,
        "max_position_embeddings": max_pos,
        "rotary_base": theta,
        "rotary_scaling": scaling,
        "attention_bias": bool(hf_config.get("attention_bias", False)),
        "mlp_bias": bool(hf_config.get("mlp_bias", False)),
        "sliding_window": window,  # Mistral: every layer attends to the last this many positions
        "tie_word_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
        "bos_token_id": hf_config.get("bos_token_id"),
        "eos_token_id": token_id_list(hf_config.get("eos_token_id")),
    }


def _stacked(hf: HFTensors, parts: list[tuple[str, int]], in_features: int, kind: str) -> torch.Tensor:
    """Rows of several HF linears (name, out_features) stacked in order: one fused engine linear."""
    tensors = [hf.take(f"{name}.{kind}", (rows,) if kind == "bias" else (rows, in_features)) for name, rows in parts]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def fused_linears(cfg: dict) -> dict[str, tuple[list[tuple[str, int]], int]]:
    """Engine linear -> (the HF linears stacked into it: (name without "model.", out rows), in_features)."""
    hidden, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q_size, kv_size = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = {}
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"layers.{i}.", f"transformer.layers.{i}."
        out[dst + "attention.qkv"] = ([(src + "self_attn.q_proj", q_size), (src + "self_attn.k_proj", kv_size),
                                       (src + "self_attn.v_proj", kv_size)], hidden)
        out[dst + "attention.dense"] = ([(src + "self_attn.o_proj", hidden)], q_size)
        out[dst + "mlp.gate_up"] = ([(src + "mlp.gate_proj", inter), (src + "mlp.up_proj", inter)], hidden)
        out[dst + "mlp.proj"] = ([(src + "mlp.down_proj", hidden)], inter)
    return out


def convert_hf(hf_config: dict, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict, dict]:
    """HF Llama checkpoint -> (engine config, engine weights): q/k/v fused into qkv, gate/up into gate_up."""
    cfg = config_from_hf(hf_config, dtype)
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    attn_kinds = ("weight", "bias") if cfg["attention_bias"] else ("weight",)
    mlp_kinds = ("weight", "bias") if cfg["mlp_bias"] else ("weight",)
    linears = fused_linears(cfg)
    hf = HFTensors(state_dict, "model.", dtype, ignore=[r"rotary_emb\.inv_freq$"])
    w = {"transformer.vocab_embedding.weight": hf.take("embed_tokens.weight", (vocab, hidden))}
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"layers.{i}.", f"transformer.layers.{i}."
        w[dst + "input_layernorm.weight"] = hf.take(src + "input_layernorm.weight", (hidden,))
        for kind in attn_kinds:
            for name in ("attention.qkv", "attention.dense"):
                w[dst + name + "." + kind] = _stacked(hf, *linears[dst + name], kind)
        w[dst + "post_layernorm.weight"] = hf.take(src + "post_attention_layernorm.weight", (hidden,))
        for kind in mlp_kinds:
            for name in ("mlp.gate_up", "mlp.proj"):
                w[dst + name + "." + kind] = _stacked(hf, *linears[dst + name], kind)
    w["transformer.ln_f.weight"] = hf.take("norm.weight", (hidden,))
    hf.take_head(w, cfg["tie_word_embeddings"], (vocab, hidden))
    hf.check_all_used()
    return cfg, w


