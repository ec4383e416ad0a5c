"""OPT family (Meta's OPT 125m-66B and its fine-tunes: learned positions offset by 2, LayerNorm, ReLU, pre-norm or
post-norm layers, an embedding narrower than the hidden size with project_in / project_out): the Hugging Face
conversion to the general decoder."""

from collections.abc import Mapping

import torch

from llmapi.errors import UnsupportedModelError
from llmapi.layers.activation import get_activation
from llmapi.models.base import HFTensors, dtype_name, require_positive, token_id_list

HF_ARCHITECTURES = ("OPTForCausalLM",)
ENGINE_ARCHITECTURE = "GPTForCausalLM"
MODEL_TYPES = {"opt": "OPTForCausalLM"}

POSITION_OFFSET = 2
"""OPT's position table starts 2 rows in (fairseq kept rows for padding): position p reads row p + 2."""


def _flag(hf_config: dict, key: str, default: bool) -> bool:
    value = hf_config.get(key, default)
    if not isinstance(value, bool):
        raise UnsupportedModelError(f"config field {key!r} must be true or false, got {value!r}")
    return value


def config_from_hf(hf_config: dict, dtype: torch.dtype) -> dict:
    """Engine config.json fields (all but mapping/quantization) from an HF OPT config.json dict.

    do_layer_norm_before=False (OPT-350m) is a post-norm model: each block's norm follows its residual add and no
    norm follows the last layer, as transformers' OPTDecoder builds final_layer_norm only for pre-norm models
    (and not when `_remove_final_layer_norm` is set).
    """
    require_positive(hf_config, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
                     "max_position_embeddings")
    hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    if hidden % heads:
        raise UnsupportedModelError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    width = hf_config.get("word_embed_proj_dim") or hidden
    require_positive({"word_embed_proj_dim": width}, "word_embed_proj_dim")
    pre_norm = _flag(hf_config, "do_layer_norm_before", True)
    bias = _flag(hf_config, "enable_bias", True)
    act = hf_config.get("activation_function", "relu")
    get_activation(act)  # unknown activations fail at conversion, not at load
    return {
        "architecture": ENGINE_ARCHITECTURE,
        "dtype": dtype_name(dtype),
        "vocab_size": hf_config["vocab_size"],
        "hidden_size": hidden,
        "num_hidden_layers": hf_config["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "hidden_act": act,
        "intermediate_size": hf_config["ffn_dim"],
        "norm_epsilon": 1e-5,  # torch.nn.LayerNorm's default, which OPT's norms keep
        "max_position_embeddings": hf_config["max_position_embeddings"],
        "position_embedding_type": "learned_absolute",
        "position_offset": POSITION_OFFSET,
        "norm_type": "layernorm",
        "gated_mlp": False,
        "post_norm": not pre_norm,
        "final_norm": pre_norm and not _flag(hf_config, "_remove_final_layer_norm", False),
        "embedding_projection": width if width != hidden else None,
        "rotary_base": None,
        "rotary_scaling": None,
        "attention_bias": bias,
        "mlp_bias": bias,
        "tie_word_embeddings": _flag(hf_config, "tie_word_embeddings", True),
        "bos_token_id": hf_config.get("bos_token_id"),
        "eos_token_id": token_id_list(hf_config.get("eos_token_id")),
    }


def fused_linears(cfg: dict) -> dict[str, tuple[list[tuple[str, int]], int]]:
    """Engine linear -> (the HF linears stacked into it: (name without "model.", out rows), in_features)."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    out = {}
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"decoder.layers.{i}.", f"transformer.layers.{i}."
        attn = src + "self_attn."
        out[dst + "attention.qkv"] = ([(attn + "q_proj", hidden), (attn + "k_proj", hidden),
                                       (attn + "v_proj", hidden)], hidden)
        out[dst + "attention.dense"] = ([(attn + "out_proj", hidden)], hidden)
        out[dst + "mlp.fc"] = ([(src + "fc1", inter)], hidden)
        out[dst + "mlp.proj"] = ([(src + "fc2", hidden)], inter)
    return out


def convert_hf(hf_config: dict, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict, dict]:
    """HF OPT checkpoint -> (engine config, engine weights): q/k/v stacked into qkv; the norms of a model without
    elementwise affine (layer_norm_elementwise_affine=False) get weight 1 and bias 0, which is the same norm."""
    cfg = config_from_hf(hf_config, dtype)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    width = cfg["embedding_projection"] or hidden
    affine = _flag(hf_config, "layer_norm_elementwise_affine", True)
    kinds = ("weight", "bias") if cfg["attention_bias"] else ("weight",)
    # Checkpoints saved from OPTModel lack the "model." prefix: both read as "decoder.*".
    hf = HFTensors(state_dict, "model.", dtype, ignore=[])

    def linear(dst: str, srcs: list[str], in_features: int, out_features: int) -> None:
        for kind in kinds:
            shape = (out_features, in_features) if kind == "weight" else (out_features,)
            parts = [hf.take(f"{src}.{kind}", shape) for src in srcs]
            w[f"{dst}.{kind}"] = parts[0] if len(parts) == 1 else torch.cat(parts)

    def layernorm(dst: str, src: str) -> None:
        if affine:
            w[dst + ".weight"] = hf.take(src + ".weight", (hidden,))
            w[dst + ".bias"] = hf.take(src + ".bias", (hidden,))
        else:
            w[dst + ".weight"] = torch.ones(hidden, dtype=dtype)
            w[dst + ".bias"] = torch.zeros(hidden, dtype=dtype)

    w = {
        "transformer.vocab_embedding.weight": hf.take("decoder.embed_tokens.weight", (vocab, width)),
        "transformer.position_embedding.weight": hf.take(
            "decoder.embed_positions.weight", (cfg["max_position_embeddings"] + POSITION_OFFSET, hidden)),
    }
    if cfg["embedding_projection"]:
        w["project_in.weight"] = hf.take("decoder.project_in.weight", (hidden, width))
        w["project_out.weight"] = hf.take("decoder.project_out.weight", (width, hidden))
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"decoder.layers.{i}.", f"transformer.layers.{i}."
        layernorm(dst + "input_layernorm", src + "self_attn_layer_norm")
        attn = src + "self_attn."
        linear(dst + "attention.qkv", [attn + "q_proj", attn + "k_proj", attn + "v_proj"], hidden, hidden)
        linear(dst + "attention.dense", [attn + "out_proj"], hidden, hidden)
        layernorm(dst + "post_layernorm", src + "final_layer_norm")
        linear(dst + "mlp.fc", [src + "fc1"], hidden, inter)
        linear(dst + "mlp.proj", [src + "fc2"], inter, hidden)
    if cfg["final_norm"]:
        layernorm("transformer.ln_f", "decoder.final_layer_norm")
    else:
        for kind in ("weight", "bias"):  # a norm transformers does not build, as it ignores a saved one
            if hf.has(f"decoder.final_layer_norm.{kind}"):
                hf.skip(f"decoder.final_layer_norm.{kind}")
    hf.take_head(w, cfg["tie_word_embeddings"], (vocab, width))
    hf.check_all_used()
    return cfg, w
