"""FairSeq NMT (transformers' FSMTForConditionalGeneration: the WMT'19 ports, and the original fairseq checkpoints
that llmapi.engine.fairseq reads into this form): the conversion to the encoder-decoder model.

Sinusoidal positions (fairseq's table, position p at row p + padding index + 1), embeddings scaled by
sqrt(d_model), post-norm layers, separate source and target vocabularies (one embedding each), and an output
projection that may be tied to the target embedding.
"""

from collections.abc import Mapping

import torch

from llmapi.layers.activation import get_activation
from llmapi.models.bart import layer_names, stack_shape, stacked_linears
from llmapi.models.base import HFTensors, dtype_name, require_positive, token_id_list
from llmapi.models.encdec import ARCHITECTURE, convert_layers, encdec_config

HF_ARCHITECTURES = ("FSMTForConditionalGeneration",)
ENGINE_ARCHITECTURE = ARCHITECTURE
MODEL_TYPES = {"fsmt": "FSMTForConditionalGeneration"}


def config_from_hf(hf_config: dict, dtype: torch.dtype) -> dict:
    require_positive(hf_config, "src_vocab_size", "tgt_vocab_size", "d_model", "encoder_layers", "decoder_layers",
                     "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
                     "max_position_embeddings")
    hidden, heads = stack_shape(hf_config)
    act = hf_config.get("activation_function", "relu")
    get_activation(act)
    pad = hf_config.get("pad_token_id", 1)
    positions = hf_config["max_position_embeddings"]
    return encdec_config(
        "fsmt", dtype_name(dtype), hf_config, hidden=hidden, heads=heads, head_dim=hidden // heads,
        vocab=hf_config["tgt_vocab_size"], decoder_layers=hf_config["decoder_layers"],
        decoder_ffn=hf_config["decoder_ffn_dim"], max_positions=positions,
        encoder={"num_layers": hf_config["encoder_layers"], "intermediate_size": hf_config["encoder_ffn_dim"],
                 "vocab_size": hf_config["src_vocab_size"], "max_position_embeddings": positions},
        eos_token_id=token_id_list(hf_config.get("eos_token_id", 2)),
        position_embedding_type="sinusoidal", position_offset=pad + 1, norm_type="layernorm", norm_epsilon=1e-5,
        post_norm=True, final_norm=False,
        embedding_scale=float(hidden) ** 0.5 if hf_config.get("scale_embedding", True) else 1.0,
        hidden_act=act, gated_mlp=False, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=hf_config.get("tie_word_embeddings", False), pad_token_id=pad,
        bos_token_id=hf_config.get("bos_token_id", 0),
        decoder_start_token_id=hf_config.get("decoder_start_token_id", 2), max_encoder_input_len=positions)


def fused_linears(cfg: dict) -> dict[str, tuple[list[tuple[str, int]], int]]:
    """Engine linear -> (the HF linears stacked into it, in_features): BART's names (self_attn, encoder_attn, fc1,
    fc2 of both stacks), as LoRA adapters name them."""
    return stacked_linears(cfg, layer_names)


def convert_hf(hf_config: dict, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict, dict]:
    cfg = config_from_hf(hf_config, dtype)
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    # The sinusoidal tables are computed, not read (transformers does not save them either).
    hf = HFTensors(state_dict, "model.", dtype, ignore=[r"embed_positions\.weight$"])
    source_vocab = cfg["encoder"]["vocab_size"]
    w = {"encoder.vocab_embedding.weight": hf.take("encoder.embed_tokens.weight", (source_vocab, hidden)),
         "decoder.vocab_embedding.weight": hf.take("decoder.embed_tokens.weight", (vocab, hidden))}
    w.update(convert_layers(hf, cfg, layer_names, bias=True))
    hf.take_head(w, cfg["tie_word_embeddings"], (vocab, hidden), name="decoder.output_projection.weight")
    hf.check_all_used()
    return cfg, w
