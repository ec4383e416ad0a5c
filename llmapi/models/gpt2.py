"""GPT-2 family (learned positions, LayerNorm, biased linears): the Hugging Face conversion to the general decoder."""

from collections.abc import Mapping

import torch

from llmapi.errors import UnsupportedModelError
from llmapi.layers.activation import get_activation
from llmapi.models.base import HFTensors, dtype_name, require_positive, token_id_list

HF_ARCHITECTURES = ("GPT2LMHeadModel",)
ENGINE_ARCHITECTURE = "GPT2LMHeadModel"  # the engine config's name (engines of every family run models/gpt.py)
MODEL_TYPES = {"gpt2": "GPT2LMHeadModel"}


def gpt2_shape(hf_config: dict, family: str) -> dict:
    """The base shape fields of a GPT-2-style config (n_embd, n_layer, n_head, n_positions or their long names),
    checked; cross-attention and attention scales other than 1/sqrt(head_dim) get an error naming `family`."""
    cfg = {
        "vocab_size": hf_config.get("vocab_size"),
        "hidden_size": hf_config.get("n_embd", hf_config.get("hidden_size")),
        "num_hidden_layers": hf_config.get("n_layer", hf_config.get("num_hidden_layers")),
        "num_attention_heads": hf_config.get("n_head", hf_config.get("num_attention_heads")),
        "max_position_embeddings": hf_config.get("n_positions", hf_config.get("max_position_embeddings")),
    }
    require_positive(cfg, *cfg)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if hidden % heads:
        raise UnsupportedModelError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if hf_config.get("add_cross_attention"):
        raise UnsupportedModelError(f"{family} with cross-attention (add_cross_attention) is not supported")
    if hf_config.get("scale_attn_weights", True) is not True or hf_config.get("scale_attn_by_inverse_layer_idx"):
        raise UnsupportedModelError(f"{family} attention scaling other than 1/sqrt(head_dim) is not supported")
    return cfg


def config_from_hf(hf_config: dict, dtype: torch.dtype) -> dict:
    """Engine config.json fields (all but mapping/quantization) from an HF GPT-2 config.json dict."""
    cfg = gpt2_shape(hf_config, "GPT-2")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    act = hf_config.get("activation_function", "gelu_new")
    get_activation(act)  # unknown activations fail at conversion, not at load
    return {
        "architecture": "GPT2LMHeadModel",
        "dtype": dtype_name(dtype),
        **cfg,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "hidden_act": act,
        "intermediate_size": hf_config.get("n_inner") or 4 * hidden,
        "norm_epsilon": float(hf_config.get("layer_norm_epsilon", 1e-5)),
        "position_embedding_type": "learned_absolute",
        "norm_type": "layernorm",
        "gated_mlp": False,
        "rotary_base": None,
        "rotary_scaling": None,
        "attention_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": bool(hf_config.get("tie_word_embeddings", True)),
        "bos_token_id": hf_config.get("bos_token_id"),
        "eos_token_id": token_id_list(hf_config.get("eos_token_id")),
    }


def fused_linears(cfg: dict) -> dict[str, tuple[list[tuple[str, int]], int]]:
    """Engine linear -> (the HF linears it holds: (name without "transformer.", out rows), in_features). GPT-2's
    Conv1D c_attn already holds q, k and v rows in the engine's order."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    out = {}
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"h.{i}.", f"transformer.layers.{i}."
        out[dst + "attention.qkv"] = ([(src + "attn.c_attn", 3 * hidden)], hidden)
        out[dst + "attention.dense"] = ([(src + "attn.c_proj", hidden)], hidden)
        out[dst + "mlp.fc"] = ([(src + "mlp.c_fc", inter)], hidden)
        out[dst + "mlp.proj"] = ([(src + "mlp.c_proj", hidden)], inter)
    return out


def convert_hf(hf_config: dict, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict, dict]:
    """HF GPT-2 checkpoint -> (engine config, engine weights): Conv1D weights [in, out] become [out, in]."""
    cfg = config_from_hf(hf_config, dtype)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    # attn.bias / attn.masked_bias are causal-mask buffers that old checkpoints saved.
    hf = HFTensors(state_dict, "transformer.", dtype, ignore=[r"^h\.\d+\.attn\.(masked_)?bias$"])

    def conv1d(dst: str, src: str, in_features: int, out_features: int) -> None:
        w[dst + ".weight"] = hf.take(src + ".weight", (in_features, out_features)).t().contiguous()
        w[dst + ".bias"] = hf.take(src + ".bias", (out_features,))

    def layernorm(dst: str, src: str) -> None:
        w[dst + ".weight"] = hf.take(src + ".weight", (hidden,))
        w[dst + ".bias"] = hf.take(src + ".bias", (hidden,))

    w = {
        "transformer.vocab_embedding.weight": hf.take("wte.weight", (vocab, hidden)),
        "transformer.position_embedding.weight": hf.take("wpe.weight", (cfg["max_position_embeddings"], hidden)),
    }
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"h.{i}.", f"transformer.layers.{i}."
        layernorm(dst + "input_layernorm", src + "ln_1")
        conv1d(dst + "attention.qkv", src + "attn.c_attn", hidden, 3 * hidden)  # rows: q heads, k heads, v heads
        conv1d(dst + "attention.dense", src + "attn.c_proj", hidden, hidden)
        layernorm(dst + "post_layernorm", src + "ln_2")
        conv1d(dst + "mlp.fc", src + "mlp.c_fc", hidden, inter)
        conv1d(dst + "mlp.proj", src + "mlp.c_proj", inter, hidden)
    layernorm("transformer.ln_f", "ln_f")
    hf.take_head(w, cfg["tie_word_embeddings"], (vocab, hidden))
    hf.check_all_used()
    return cfg, w


