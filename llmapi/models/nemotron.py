"""Nemotron family (transformers' NemotronForCausalLM: LayerNorm1P, squared-ReLU MLP, partial rotary) and NVIDIA's
GPT-Next models from NeMo checkpoints: the Hugging Face conversion to the general decoder.

The config is transformers' NemotronConfig, extended by options that NeMo GPT models have and transformers'
Nemotron lacks (the .nemo reader, llmapi/engine/nemo.py, writes them; an HF Nemotron config leaves them out):
- `normalization`: "layernorm1p" (the default, Nemotron's: a LayerNorm whose stored weight is w - 1),
  "layernorm" (weight stored as is) or "rmsnorm" (no bias);
- `gated_mlp`: true for a GLU MLP down(act(gate(x)) * up(x)) with mlp.gate_proj beside mlp.up_proj (NeMo's swiglu);
- `position_embedding_type`: "rope" (the default) or "learned_absolute" (a table model.embed_positions.weight of
  max_position_embeddings rows, added to the token embeddings; no rotary).
LayerNorm1P's weight gains 1 at conversion, so the engine runs a plain LayerNorm.
"""

from collections.abc import Mapping

import torch

from llmapi.errors import UnsupportedModelError
from llmapi.layers.activation import get_activation
from llmapi.layers.rotary import rope_inv_freq
from llmapi.models.base import HFTensors, attention_shape, dtype_name, require_positive, token_id_list

HF_ARCHITECTURES = ("NemotronForCausalLM",)
ENGINE_ARCHITECTURE = "GPTForCausalLM"
MODEL_TYPES = {"nemotron": "NemotronForCausalLM"}

NORMALIZATIONS = ("layernorm1p", "layernorm", "rmsnorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
_DEFAULT_PARTIAL_ROTARY = 0.5  # NemotronConfig's default when a config names none


def _rope(hf_config: dict) -> tuple[float, float, dict | None]:
    """(rope_theta, partial_rotary_factor, scaling dict or None) from transformers 5 `rope_parameters` or 4.x
    top-level fields. Only linear scaling (NeMo's seq_len_interpolation_factor) is converted."""
    params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", None) or hf_config.get("rope_theta") or 10000.0)
    factor = params.pop("partial_rotary_factor", None)
    if factor is None:
        factor = hf_config.get("partial_rotary_factor", _DEFAULT_PARTIAL_ROTARY)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 < factor <= 1.0:
        raise UnsupportedModelError(f"config field 'partial_rotary_factor' must be in (0, 1], got {factor!r}")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        return theta, float(factor), None
    if rope_type != "linear":
        raise UnsupportedModelError(f"Nemotron rope type {rope_type!r} is not supported (supported: default, linear)")
    return theta, float(factor), {"rope_type": "linear", "factor": float(params["factor"])}


def config_from_hf(hf_config: dict, dtype: torch.dtype) -> dict:
    """Engine config.json fields (all but mapping/quantization) from an HF Nemotron config dict (with the NeMo
    options of this module's docstring)."""
    require_positive(hf_config, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings")
    hidden = hf_config["hidden_size"]
    heads, kv_heads, head_dim = attention_shape(hf_config)
    normalization = hf_config.get("normalization", "layernorm1p")
    if normalization not in NORMALIZATIONS:
        raise UnsupportedModelError(f"normalization {normalization!r} is not supported (supported: {NORMALIZATIONS})")
    positions = hf_config.get("position_embedding_type", "rope")
    if positions not in POSITION_EMBEDDINGS:
        raise UnsupportedModelError(
            f"position_embedding_type {positions!r} is not supported (supported: {POSITION_EMBEDDINGS})")
    act = hf_config.get("hidden_act", "relu2")
    get_activation(act)  # unknown activations fail at conversion, not at load
    max_pos = hf_config["max_position_embeddings"]
    cfg = {
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
        "norm_epsilon": float(hf_config.get("norm_eps", 1e-5)),
        "norm_type": "rmsnorm" if normalization == "rmsnorm" else "layernorm",
        "gated_mlp": bool(hf_config.get("gated_mlp", False)),
        "max_position_embeddings": max_pos,
        "attention_bias": bool(hf_config.get("attention_bias", False)),
        "mlp_bias": bool(hf_config.get("mlp_bias", False)),
        "tie_word_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
        "bos_token_id": hf_config.get("bos_token_id"),
        "eos_token_id": token_id_list(hf_config.get("eos_token_id")),
    }
    if positions == "learned_absolute":
        cfg.update(position_embedding_type="learned_absolute", position_offset=0, rotary_dim=None,
                   rotary_base=None, rotary_scaling=None)
        return cfg
    theta, factor, scaling = _rope(hf_config)
    rotary_dim = int(head_dim * factor)  # as NemotronRotaryEmbedding and NeMo's RotaryEmbedding round it
    if rotary_dim <= 0 or rotary_dim % 2:
        raise UnsupportedModelError(f"the rotary dim int(head_dim {head_dim} x partial_rotary_factor {factor}) = "
                                    f"{rotary_dim} is not a positive even number")
    rope_inv_freq(rotary_dim, theta, scaling, max_pos, device="meta")
    cfg.update(position_embedding_type="rope_gpt_neox", rotary_dim=rotary_dim, rotary_base=theta,
               rotary_scaling=scaling)
    return cfg


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
        if cfg["gated_mlp"]:  # rows: gate, then up
            out[dst + "mlp.gate_up"] = ([(src + "mlp.gate_proj", inter), (src + "mlp.up_proj", inter)], hidden)
        else:
            out[dst + "mlp.fc"] = ([(src + "mlp.up_proj", inter)], hidden)
        out[dst + "mlp.proj"] = ([(src + "mlp.down_proj", hidden)], inter)
    return out


def convert_hf(hf_config: dict, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict, dict]:
    """HF Nemotron checkpoint -> (engine config, engine weights): q/k/v fused into qkv, gate/up into gate_up (gated)
    or up as fc, LayerNorm1P weights + 1."""
    cfg = config_from_hf(hf_config, dtype)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_size, kv_size = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    normalization = hf_config.get("normalization", "layernorm1p")
    hf = HFTensors(state_dict, "model.", dtype, ignore=[r"rotary_emb\.inv_freq$"])

    def linear(src: str, out_features: int, in_features: int, kind: str) -> torch.Tensor:
        return hf.take(f"{src}.{kind}", (out_features,) if kind == "bias" else (out_features, in_features))

    def norm(dst: str, src: str) -> None:
        weight = hf.take(src + ".weight", (hidden,))
        w[dst + ".weight"] = weight + 1.0 if normalization == "layernorm1p" else weight
        if normalization != "rmsnorm":
            w[dst + ".bias"] = hf.take(src + ".bias", (hidden,))

    w = {"transformer.vocab_embedding.weight": hf.take("embed_tokens.weight", (vocab, hidden))}
    if cfg["position_embedding_type"] == "learned_absolute":
        w["transformer.position_embedding.weight"] = hf.take("embed_positions.weight",
                                                             (cfg["max_position_embeddings"], hidden))
    attn_kinds = ("weight", "bias") if cfg["attention_bias"] else ("weight",)
    mlp_kinds = ("weight", "bias") if cfg["mlp_bias"] else ("weight",)
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"layers.{i}.", f"transformer.layers.{i}."
        norm(dst + "input_layernorm", src + "input_layernorm")
        norm(dst + "post_layernorm", src + "post_attention_layernorm")
        for kind in attn_kinds:
            w[dst + "attention.qkv." + kind] = torch.cat([  # rows: q heads, k heads, v heads
                linear(src + "self_attn.q_proj", q_size, hidden, kind),
                linear(src + "self_attn.k_proj", kv_size, hidden, kind),
                linear(src + "self_attn.v_proj", kv_size, hidden, kind)])
            w[dst + "attention.dense." + kind] = linear(src + "self_attn.o_proj", hidden, q_size, kind)
        for kind in mlp_kinds:
            up = linear(src + "mlp.up_proj", inter, hidden, kind)
            if cfg["gated_mlp"]:  # rows: gate, then up
                w[dst + "mlp.gate_up." + kind] = torch.cat([linear(src + "mlp.gate_proj", inter, hidden, kind), up])
            else:
                w[dst + "mlp.fc." + kind] = up
            w[dst + "mlp.proj." + kind] = linear(src + "mlp.down_proj", hidden, inter, kind)
    norm("transformer.ln_f", "norm")
    hf.take_head(w, cfg["tie_word_embeddings"], (vocab, hidden))
    hf.check_all_used()
    return cfg, w
