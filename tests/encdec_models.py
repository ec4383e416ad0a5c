"""Tiny random-weight transformers encoder-decoder models (T5, T5 v1.1, mT5, ByT5, BART, mBART, FSMT) for the
parity tests, with weights widened so that greedy paths are not degenerate (one token repeated)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 96


def _widen(model, std: float, seed: int, keep: str | None = None):
    """Redraw every matrix with a wide normal (norm weights stay as initialized; those named with `keep` too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if keep is not None and keep in name:
                continue
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "bias" in name and "layer_norm" not in name and "layernorm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def t5(variant: str = "t5", seed: int = 0, tied: bool | None = None, layers: int = 2, std: float = 0.5):
    """variant: "t5" (ReLU, tied), "t5v1.1" (gated-gelu, untied), "mt5", "byt5" (gated-gelu, bytes vocabulary).
    `std`: of the redrawn matrices. T5 does not scale its attention scores: at 0.5 they are sharp enough that
    float32's rounding moves a 4-layer model's logits by 0.1 (0.5 suits 2-layer float32 checks)."""
    gated = variant != "t5"
    vocab = 384 if variant == "byt5" else VOCAB
    kwargs = dict(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=layers, num_decoder_layers=layers,
                  num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                  feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0,
                  tie_word_embeddings=(not gated) if tied is None else tied, decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=1)
    if variant == "mt5":
        config, cls = transformers.MT5Config(**kwargs), transformers.MT5ForConditionalGeneration
    else:
        config, cls = transformers.T5Config(**kwargs), transformers.T5ForConditionalGeneration
    torch.manual_seed(seed)
    return _widen(cls(config), std, seed)


def bart(mbart: bool = False, encoder_layers: int = 2, decoder_layers: int = 2, seed: int = 0, **extra):
    kwargs = dict(vocab_size=VOCAB, d_model=64, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                  max_position_embeddings=128, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                  scale_embedding=True, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                  forced_bos_token_id=None, forced_eos_token_id=None, **extra)
    if mbart:
        config, cls = transformers.MBartConfig(**kwargs), transformers.MBartForConditionalGeneration
    else:
        config, cls = transformers.BartConfig(**kwargs), transformers.BartForConditionalGeneration
    torch.manual_seed(seed)
    model = _widen(cls(config), 0.3, seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        model.final_logits_bias.copy_(torch.randn(model.final_logits_bias.shape, generator=g))
    return model


def fsmt(seed: int = 0, src_vocab: int = VOCAB, tgt_vocab: int = VOCAB + 8, tied: bool = False):
    config = transformers.FSMTConfig(
        langs=["en", "fr"], src_vocab_size=src_vocab, tgt_vocab_size=tgt_vocab, d_model=64, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        scale_embedding=True, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        tie_word_embeddings=tied, activation_function="relu")
    torch.manual_seed(seed)
    model = transformers.FSMTForConditionalGeneration(config)
    return _widen(model, 0.3, seed, keep="embed_positions")  # the sinusoidal tables are computed, not learned


def inputs(count: int, vocab: int, seed: int, low: int = 3, lengths=(3, 17)) -> list[list[int]]:
    """`count` encoder inputs of mixed lengths, ids in [low, vocab) (no special ids), each ending with EOS = the
    caller's choice: the ids only."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        out.append(torch.randint(low, vocab, (n,), generator=g).tolist())
    return out
