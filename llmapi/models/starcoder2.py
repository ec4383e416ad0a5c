"""StarCoder2 family (GQA, biased linears, LayerNorm, gelu MLP, rotary, sliding-window attention): the Hugging Face
conversion to the general decoder."""

from collections.abc import Mapping

import torch

from llmapi.errors import UnsupportedModelError
from llmapi.layers.activation import get_activation
from llmapi.layers.rotary import rope_inv_freq
from llmapi.models.base import HFTensors, attention_shape, dtype_name, require_positive, sliding_window, token_id_list
from llmapi.models.llama import _rope_from_hf

HF_ARCHITECTURES = ("Starcoder2ForCausalLM",)
ENGINE_ARCHITECTURE = "GPTForCausalLM"
MODEL_TYPES = {"starcoder2": "Starcoder2ForCausalLM"}


def config_from_hf(hf_config: dict, dtype: torch.dtype) -> dict:
    """Engine config.json fields (all but mapping/quantization) from an HF Starcoder2Config dict."""
    require_positive(hf_config, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings")
    hidden = hf_config["hidden_size"]
    heads, kv_heads, head_dim = attention_shape(hf_config)
    if head_dim % 2:
        raise UnsupportedModelError(f"head_dim {head_dim} must be even for rotary embeddings")
    max_pos = hf_config["max_position_embeddings"]
    window = sliding_window(hf_config, max_pos)
    theta, scaling = _rope_from_hf(hf_config)
    act = hf_config.get("hidden_act", "gelu_pytorch_tanh")
    get_activation(act)  # unknown activations fail at conversion, not at load
    rope_inv_freq(head_dim, theta, scaling, max_pos, device="meta")  # likewise unknown rope types
    bias = bool(hf_config.get("use_bias", True))
    return {
        "architecture": ENGINE_ARCHITECTURE,
        "dtype": dtype_name(dtype),
        "vocab_size": hf_config["vocab_size"],
        "hidden_size": hidden,
        "num_hidden_layers": hf_config["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": act,
        "intermediate_size": hf_config["intermediate_size"],
        "norm_epsilon": float(hf_config.get("norm_epsilon", 1e-5)),
        "position_embedding_type": "rope_gpt_neox",
        "rotary_dim": head_dim,
        "rotary_base": theta,
        "rotary_scaling": scaling,
        "norm_type": "layernorm",
        "gated_mlp": False,
        "max_position_embeddings": max_pos,
        "sliding_window": window,
        "attention_bias": bias,
        "mlp_bias": bias,
        "tie_word_embeddings": bool(hf_config.get("tie_word_embeddings", True)),
        "bos_token_id": hf_config.get("bos_token_id"),
        "eos_token_id": token_id_list(hf_config.get("eos_token_id")),
    }


def fused_linears(cfg: dict) -> dict[str, tuple[list[tuple[str, int]], int]]:
    """Engine linear -> (the HF linears stacked into it: (name without "model.", out rows), in_features)."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q_size, kv_size = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    out = {}
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"layers.{i}.", f"transformer.layers.{i}."
        out[dst + "attention.qkv"] = ([(src + "self_attn.q_proj", q_size), (src + "self_attn.k_proj", kv_size),
                                       (src + "self_attn.v_proj", kv_size)], hidden)
        out[dst + "attention.dense"] = ([(src + "self_attn.o_proj", hidden)], q_size)
        out[dst + "mlp.fc"] = ([(src + "mlp.c_fc", inter)], hidden)
        out[dst + "mlp.proj"] = ([(src + "mlp.c_proj", hidden)], inter)
    return out


def convert_hf(hf_config: dict, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict, dict]:
    """HF StarCoder2 checkpoint -> (engine config, engine weights): q/k/v fused into qkv, c_fc/c_proj as fc/proj."""
    cfg = config_from_hf(hf_config, dtype)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_size, kv_size = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    kinds = ("weight", "bias") if cfg["attention_bias"] else ("weight",)
    hf = HFTensors(state_dict, "model.", dtype, ignore=[r"rotary_emb\.inv_freq$"])

    def linear(src: str, out_features: int, in_features: int, kind: str) -> torch.Tensor:
        return hf.take(f"{src}.{kind}", (out_features,) if kind == "bias" else (out_features, in_features))

    def layernorm(dst: str, src: str) -> None:
        w[dst + ".weight"] = hf.take(src + ".weight", (hidden,))
        w[dst + ".bias"] = hf.take(src + ".bias", (hidden,))

    w = {"transformer.vocab_embedding.weight": hf.take("embed_tokens.weight", (vocab, hidden))}
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"layers.{i}.", f"transformer.layers.{i}."
        layernorm(dst + "input_layernorm", src + "input_layernorm")
        layernorm(dst + "post_layernorm", src + "post_attention_layernorm")
        for kind in kinds:
            w[dst + "attention.qkv." + kind] = torch.cat([  # rows: q heads, k heads, v heads
                linear(src + "self_attn.q_proj", q_size, hidden, kind),
                linear(src + "self_attn.k_proj", kv_size, hidden, kind),
                linear(src + "self_attn.v_proj", kv_size, hidden, kind)])
            w[dst + "attention.dense." + kind] = linear(src + "self_attn.o_proj", hidden, q_size, kind)
            w[dst + "mlp.fc." + kind] = linear(src + "mlp.c_fc", inter, hidden, kind)
            w[dst + "mlp.proj." + kind] = linear(src + "mlp.c_proj", hidden, inter, kind)
    layernorm("transformer.ln_f", "norm")
    hf.take_head(w, cfg["tie_word_embeddings"], (vocab, hidden))
    hf.check_all_used()
    return cfg, w
