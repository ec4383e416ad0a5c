"""BART family (BART, mBART and their fine-tunes such as bart-large-cnn): the Hugging Face conversion to the
encoder-decoder model.

Learned positions offset by 2, `layernorm_embedding`, embeddings scaled by sqrt(d_model) with `scale_embedding`,
`final_logits_bias`; post-norm layers (BART) or pre-norm layers plus a final norm per stack (mBART).
"""

from collections.abc import Mapping

import torch

from llmapi.errors import UnsupportedModelError
from llmapi.layers.activation import get_activation
from llmapi.models.base import HFTensors, dtype_name, require_positive, token_id_list
from llmapi.models.encdec import ARCHITECTURE, convert_layers, encdec_config

HF_ARCHITECTURES = ("BartForConditionalGeneration", "MBartForConditionalGeneration")
ENGINE_ARCHITECTURE = ARCHITECTURE
MODEL_TYPES = {"bart": "BartForConditionalGeneration", "mbart": "MBartForConditionalGeneration"}

POSITION_OFFSET = 2
"""BART's position tables start 2 rows in: position p reads row p + 2."""


def _is_mbart(hf_config: dict) -> bool:
    return hf_config.get("model_type") == "mbart" or "MBartForConditionalGeneration" in (
        hf_config.get("architectures") or [])


def config_from_hf(hf_config: dict, dtype: torch.dtype) -> dict:
    require_positive(hf_config, "vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                     "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings")
    hidden, heads = stack_shape(hf_config)
    act = hf_config.get("activation_function", "gelu")
    get_activation(act)
    mbart = _is_mbart(hf_config)
    vocab, positions = hf_config["vocab_size"], hf_config["max_position_embeddings"]
    return encdec_config(
        "mbart" if mbart else "bart", dtype_name(dtype), hf_config, hidden=hidden, heads=heads,
        head_dim=hidden // heads,
        vocab=vocab, decoder_layers=hf_config["decoder_layers"], decoder_ffn=hf_config["decoder_ffn_dim"],
        max_positions=positions,
        encoder={"num_layers": hf_config["encoder_layers"], "intermediate_size": hf_config["encoder_ffn_dim"],
                 "vocab_size": vocab, "max_position_embeddings": positions},
        eos_token_id=token_id_list(hf_config.get("eos_token_id", 2)),
        position_embedding_type="learned_absolute", position_offset=POSITION_OFFSET, norm_type="layernorm",
        norm_epsilon=1e-5, post_norm=not mbart, final_norm=mbart, layernorm_embedding=True,
        embedding_scale=float(hidden) ** 0.5 if hf_config.get("scale_embedding", False) else 1.0,
        hidden_act=act, gated_mlp=False, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=hf_config.get("tie_word_embeddings", True), final_logits_bias=True,
        pad_token_id=hf_config.get("pad_token_id", 1), bos_token_id=hf_config.get("bos_token_id", 0),
        decoder_start_token_id=hf_config.get("decoder_start_token_id", 2), max_encoder_input_len=positions)


def stack_shape(hf_config: dict) -> tuple[int, int]:
    """(d_model, heads) of a BART-style config (BART, FSMT): both stacks must have the same heads, which divide
    d_model (UnsupportedModelError naming the numbers)."""
    hidden, heads = hf_config["d_model"], hf_config["decoder_attention_heads"]
    if hf_config["encoder_attention_heads"] != heads:
        raise UnsupportedModelError(f"encoder_attention_heads {hf_config['encoder_attention_heads']} != "
                                    f"decoder_attention_heads {heads}: unequal head counts are not supported")
    if hidden % heads:
        raise UnsupportedModelError(f"d_model {hidden} is not divisible by decoder_attention_heads {heads}")
    return hidden, heads


def layer_names(stack: str, i: int) -> dict:
    """HF names of layer i of BART's (and FSMT's) "encoder" / "decoder" stack."""
    p = f"{stack}.layers.{i}."
    names = {"q": p + "self_attn.q_proj", "k": p + "self_attn.k_proj", "v": p + "self_attn.v_proj",
             "o": p + "self_attn.out_proj", "self_norm": p + "self_attn_layer_norm", "fc": p + "fc1",
             "proj": p + "fc2", "mlp_norm": p + "final_layer_norm"}
    if stack == "decoder":
        names.update({"cross_q": p + "encoder_attn.q_proj", "cross_k": p + "encoder_attn.k_proj",
                      "cross_v": p + "encoder_attn.v_proj", "cross_o": p + "encoder_attn.out_proj",
                      "cross_norm": p + "encoder_attn_layer_norm"})
    return names


def stacked_linears(cfg: dict, names) -> dict[str, tuple[list[tuple[str, int]], int]]:
    """Engine linear -> (the HF linears stacked into it: (name without "model.", out rows), in_features) of every
    encoder and decoder layer, from a family's layer names (`names(stack, i)`, as models.encdec.convert_layers
    reads them): q/k/v into attention.qkv, cross k/v into cross_attention.kv, gate/up into mlp.gate_up."""
    hidden, inner = cfg["hidden_size"], cfg["num_attention_heads"] * cfg["head_dim"]
    out = {}
    for stack, count, inter in (("encoder", cfg["encoder"]["num_layers"], cfg["encoder"]["intermediate_size"]),
                                ("decoder", cfg["num_hidden_layers"], cfg["intermediate_size"])):
        for i in range(count):
            n, dst = names(stack, i), f"{stack}.layers.{i}."
            out[dst + "attention.qkv"] = ([(n["q"], inner), (n["k"], inner), (n["v"], inner)], hidden)
            out[dst + "attention.dense"] = ([(n["o"], hidden)], inner)
            if stack == "decoder":
                out[dst + "cross_attention.q"] = ([(n["cross_q"], inner)], hidden)
                out[dst + "cross_attention.kv"] = ([(n["cross_k"], inner), (n["cross_v"], inner)], hidden)
                out[dst + "cross_attention.dense"] = ([(n["cross_o"], hidden)], inner)
            if cfg["gated_mlp"]:
                out[dst + "mlp.gate_up"] = ([(n["gate"], inter), (n["up"], inter)], hidden)
            else:
                out[dst + "mlp.fc"] = ([(n["fc"], inter)], hidden)
            out[dst + "mlp.proj"] = ([(n["proj"], hidden)], inter)
    return out


def fused_linears(cfg: dict) -> dict[str, tuple[list[tuple[str, int]], int]]:
    """Engine linear -> (the HF linears stacked into it, in_features): self_attn.{q,k,v,out}_proj, encoder_attn
    (decoder layers), fc1 and fc2 of both stacks, as LoRA adapters name them."""
    return stacked_linears(cfg, layer_names)


def convert_hf(hf_config: dict, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict, dict]:
    cfg = config_from_hf(hf_config, dtype)
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    hf = HFTensors(state_dict, "model.", dtype, ignore=[])
    shared = hf.take("shared.weight", (vocab, hidden))
    w = {"encoder.vocab_embedding.weight": shared, "decoder.vocab_embedding.weight": shared.clone()}
    rows = cfg["max_position_embeddings"] + POSITION_OFFSET
    for stack in ("encoder", "decoder"):
        if hf.has(f"{stack}.embed_tokens.weight"):  # the tied copies of `shared`
            hf.skip(f"{stack}.embed_tokens.weight")
        w[f"{stack}.position_embedding.weight"] = hf.take(f"{stack}.embed_positions.weight", (rows, hidden))
        for kind in ("weight", "bias"):
            w[f"{stack}.layernorm_embedding.{kind}"] = hf.take(f"{stack}.layernorm_embedding.{kind}", (hidden,))
            if cfg["final_norm"]:
                w[f"{stack}.ln_f.{kind}"] = hf.take(f"{stack}.layer_norm.{kind}", (hidden,))
    w.update(convert_layers(hf, cfg, layer_names, bias=True))
    hf.take_head(w, cfg["tie_word_embeddings"], (vocab, hidden))
    w["final_logits_bias"] = (hf.take("final_logits_bias", (1, vocab))[0] if hf.has("final_logits_bias")
                              else torch.zeros(vocab, dtype=dtype))
    hf.check_all_used()
    return cfg, w
