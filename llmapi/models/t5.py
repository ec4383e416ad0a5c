"""T5 family (T5, T5 v1.1, Flan-T5, mT5, ByT5): the Hugging Face conversion to the encoder-decoder model.

Relative attention bias (bucketed; bidirectional in the encoder, causal in the decoder) from the first layer of
each stack, shared by the stack; no scaling of QK; RMSNorm without mean; ReLU (T5) or gated-gelu (v1.1, mT5,
ByT5); a tied head scales the decoder output by d_model ** -0.5 first.
"""

from collections.abc import Mapping

import torch

from llmapi.errors import UnsupportedModelError
from llmapi.layers.activation import get_activation
from llmapi.models.bart import stacked_linears
from llmapi.models.base import HFTensors, dtype_name, require_positive, token_id_list
from llmapi.models.encdec import ARCHITECTURE, convert_layers, encdec_config

HF_ARCHITECTURES = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration")
ENGINE_ARCHITECTURE = ARCHITECTURE
MODEL_TYPES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration"}

DEFAULT_MAX_POSITIONS = 1024
"""T5 has no position limit of its own (relative positions): the default max_seq_len / max_encoder_input_len."""


def mlp_kind(hf_config: dict) -> tuple[str, bool]:
    """(activation, gated) of `feed_forward_proj`, as transformers' T5Config parses it ("relu", "gated-gelu")."""
    proj = hf_config.get("feed_forward_proj", "relu")
    parts = str(proj).split("-")
    gated = parts[0] == "gated"
    if (len(parts) > 1 and not gated) or len(parts) > 2:
        raise UnsupportedModelError(f"T5 feed_forward_proj {proj!r} is not supported: expected 'ACT' or 'gated-ACT'")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    get_activation(act)
    return act, gated


def config_from_hf(hf_config: dict, dtype: torch.dtype) -> dict:
    require_positive(hf_config, "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
    act, gated = mlp_kind(hf_config)
    hidden, vocab, ffn = hf_config["d_model"], hf_config["vocab_size"], hf_config["d_ff"]
    tied = hf_config.get("tie_word_embeddings", True)
    # The original T5 scales the decoder output before its (tied) head, v1.1 and mT5 do not. Configs saved by
    # transformers 5 say so in `scale_decoder_outputs` (their tie_word_embeddings is always true); older ones by an
    # untied head.
    # transformers' mT5 never scales.
    scaled = hf_config.get("scale_decoder_outputs", tied) and hf_config.get("model_type") != "mt5"
    positions = hf_config.get("n_positions") or DEFAULT_MAX_POSITIONS
    return encdec_config(
        "t5", dtype_name(dtype), hf_config, hidden=hidden, heads=hf_config["num_heads"], head_dim=hf_config["d_kv"],
        vocab=vocab, decoder_layers=hf_config.get("num_decoder_layers") or hf_config["num_layers"], decoder_ffn=ffn,
        max_positions=positions,
        encoder={"num_layers": hf_config["num_layers"], "intermediate_size": ffn, "vocab_size": vocab,
                 "max_position_embeddings": positions},
        eos_token_id=token_id_list(hf_config.get("eos_token_id", 1)),
        position_embedding_type="relative",
        relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
        norm_type="rmsnorm", norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6), post_norm=False,
        final_norm=True, attention_scale=1.0, hidden_act=act, gated_mlp=gated, tie_word_embeddings=tied,
        logits_scale=hidden ** -0.5 if scaled else 1.0, pad_token_id=hf_config.get("pad_token_id", 0),
        decoder_start_token_id=hf_config.get("decoder_start_token_id", 0),
        max_encoder_input_len=DEFAULT_MAX_POSITIONS)


def _layer_names(stack: str, i: int) -> dict:
    p = f"{stack}.block.{i}.layer."
    mlp = p + ("2" if stack == "decoder" else "1")
    names = {"q": p + "0.SelfAttention.q", "k": p + "0.SelfAttention.k", "v": p + "0.SelfAttention.v",
             "o": p + "0.SelfAttention.o", "self_norm": p + "0.layer_norm",
             "fc": mlp + ".DenseReluDense.wi", "gate": mlp + ".DenseReluDense.wi_0", "up": mlp + ".DenseReluDense.wi_1",
             "proj": mlp + ".DenseReluDense.wo", "mlp_norm": mlp + ".layer_norm"}
    if stack == "decoder":
        names.update({f"cross_{x}": f"{p}1.EncDecAttention.{x}" for x in "qkvo"})
        names["cross_norm"] = p + "1.layer_norm"
    return names


def fused_linears(cfg: dict) -> dict[str, tuple[list[tuple[str, int]], int]]:
    """Engine linear -> (the HF linears stacked into it, in_features): SelfAttention.{q,k,v,o}, EncDecAttention
    (decoder layers), DenseReluDense.wi (or wi_0 / wi_1) and wo of both stacks, as LoRA adapters name them."""
    return stacked_linears(cfg, _layer_names)


def convert_hf(hf_config: dict, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict, dict]:
    cfg = config_from_hf(hf_config, dtype)
    hidden, vocab, heads = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    buckets = cfg["relative_attention_num_buckets"]
    hf = HFTensors(state_dict, "", dtype, ignore=[])
    shared = hf.take("shared.weight", (vocab, hidden))
    w = {"encoder.vocab_embedding.weight": shared, "decoder.vocab_embedding.weight": shared.clone()}
    for stack in ("encoder", "decoder"):
        if hf.has(f"{stack}.embed_tokens.weight"):  # the tied copies of `shared`
            hf.skip(f"{stack}.embed_tokens.weight")
        w[f"{stack}.relative_bias.weight"] = hf.take(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (buckets, heads))
        w[f"{stack}.ln_f.weight"] = hf.take(f"{stack}.final_layer_norm.weight", (hidden,))
    w.update(convert_layers(hf, cfg, _layer_names, bias=False))
    hf.take_head(w, cfg["tie_word_embeddings"], (vocab, hidden))
    hf.check_all_used()
    return cfg, w
