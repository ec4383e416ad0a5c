"""The encoder-decoder model every encoder-decoder family runs through (T5 / mT5 / ByT5, BART / mBART, FSMT): one
model with options, as the general decoder of models/gpt.py is for decoder-only families.

A step runs the encoder of the rows that start (their encoder inputs, never chunked), writes each decoder layer's
cross-attention K/V of those inputs into the request's cross blocks of the paged cache (the same per-layer cache
tensors as self-attention K/V), then runs the decoder over the step's decoder tokens: causal self-attention over
the paged cache, cross-attention over the cross blocks.

Engine config options (`complete_encdec_config` fills the defaults):
- `position_embedding_type`: "relative" (T5's bucketed bias, from the first layer of each stack and shared by
  the stack), "learned_absolute" (a table read at position + `position_offset`: BART's offset 2) or "sinusoidal"
  (fairseq's table, read at position + `position_offset`: FSMT's padding index + 1);
- `norm_type` "rmsnorm" (T5: no mean) or "layernorm"; `post_norm` (BART, FSMT) or pre-norm (T5, mBART);
  `final_norm` (a norm after each stack's last layer: T5, mBART); `layernorm_embedding` (BART, mBART);
- `embedding_scale` (sqrt(d_model) where the family scales embeddings), `attention_scale` (1.0 for T5, else
  head_dim ** -0.5), `logits_scale` (T5's tied head: d_model ** -0.5), `final_logits_bias` (BART);
- `gated_mlp` / `hidden_act` / `attention_bias` / `mlp_bias` as in the general decoder;
- `encoder`: the encoder stack's `num_layers`, `intermediate_size`, `vocab_size`, `max_position_embeddings`.
Heads, head size and hidden size are the same in both stacks, and every attention is multi-head (as in every
family here): cross-attention K/V of a decoder layer have its self-attention K/V's shape.

Linears: attention.qkv / attention.dense (self), cross_attention.q / cross_attention.kv / cross_attention.dense,
mlp.gate_up or mlp.fc, mlp.proj; `encdec_linears` declares them for tensor parallelism and quantization.

A quantized KV cache (int8 / float8, kv_cache_quant_algo) holds both caches of a decoder layer as codes: its
self-attention and its cross-attention each get their own [2] (K, V) `kv_cache_scaling_factor`
(llmapi.quantization.kv_cache gives them to the modules `kv_cache_attentions` lists), written quantized and read
dequantized by every write and read of that cache. The encoder's attention uses no cache and no scale.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from llmapi.errors import UnsupportedModelError
from llmapi.layers.activation import act_and_mul, get_activation
from llmapi.layers.attention import AttentionMetadata
from llmapi.layers.encdec_attention import CrossMetadata, encoder_attention, paged_attention, write_kv
from llmapi.layers.norm import LayerNorm, RMSNorm
from llmapi.models.base import CausalLM, embedding
from llmapi.models.gpt import LinearSpec

ARCHITECTURE = "EncoderDecoderModel"

_DEFAULTS = dict(position_offset=0, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 post_norm=False, final_norm=True, layernorm_embedding=False, embedding_scale=1.0,
                 logits_scale=1.0, final_logits_bias=False, attention_bias=False, mlp_bias=False)


def complete_encdec_config(cfg: dict) -> dict:
    out = {**_DEFAULTS, **cfg}
    out.setdefault("attention_scale", out["head_dim"] ** -0.5)
    return out


def is_encoder_decoder(engine_config: dict) -> bool:
    return bool(engine_config.get("is_encoder_decoder"))


def check_encdec_config(cfg: dict) -> None:
    """UnsupportedModelError naming a shape this model cannot run."""
    if cfg["num_key_value_heads"] != cfg["num_attention_heads"]:
        raise UnsupportedModelError("encoder-decoder models run multi-head attention only: num_key_value_heads "
                                    f"{cfg['num_key_value_heads']} != num_attention_heads {cfg['num_attention_heads']}")
    if cfg["position_embedding_type"] not in ("relative", "learned_absolute", "sinusoidal"):
        raise UnsupportedModelError(f"position_embedding_type {cfg['position_embedding_type']!r} is not supported "
                                    "by the encoder-decoder model")


def _mlp_spec(cfg: dict) -> LinearSpec:
    return LinearSpec("mlp.gate_up", "gate_up", "intermediate", None) if cfg["gated_mlp"] else \
        LinearSpec("mlp.fc", "column", "intermediate", None)


def encdec_linears(cfg: dict) -> dict[str, tuple[LinearSpec, ...]]:
    """The quantizable linears of each encoder layer ("encoder") and decoder layer ("decoder"), in execution order.
    `norm` is None everywhere: SmoothQuant, where asked, scales their inputs instead of folding into norms."""
    self_attn = (LinearSpec("attention.qkv", "qkv", "heads", None), LinearSpec("attention.dense", "row", "heads", None))
    mlp = (_mlp_spec(cfg), LinearSpec("mlp.proj", "row", "intermediate", None))
    cross = (LinearSpec("cross_attention.q", "column", "heads", None),
             LinearSpec("cross_attention.kv", "kv", "heads", None),
             LinearSpec("cross_attention.dense", "row", "heads", None))
    return {"encoder": self_attn + mlp, "decoder": self_attn + cross + mlp}


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key position - query position), as Mesh TensorFlow and
    transformers compute it: exact buckets for small distances, logarithmic ones up to max_distance."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position, large)


class RelativePositionBias(nn.Module):
    """T5's relative attention bias of one stack: `weight` [num_buckets, heads] (its first layer's table), read
    as the attention kernels' position_bias [heads, 2M - 1] over relative positions -(M-1) .. M-1 (M =
    max_distance + 1: every bucket beyond is the same one). A tensor-parallel rank keeps its heads' columns."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_buckets, num_heads))
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.heads = None  # (first, count): this rank's heads, under tensor parallelism

    def init_buffers(self, device) -> None:
        m = self.max_distance + 1
        relative = torch.arange(-(m - 1), m, device=device)  # [2M-1]
        self.register_buffer("bucket", relative_position_bucket(relative, self.bidirectional, self.num_buckets,
                                                                self.max_distance), persistent=False)

    def split_heads(self, first: int, count: int) -> None:
        self.heads = (first, count)
        self.weight = nn.Parameter(torch.empty(self.weight.shape[0], count, device=self.weight.device))

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        if self.heads is None:
            return full
        first, count = self.heads
        return full[:, first:first + count]

    def forward(self) -> torch.Tensor:  # [heads, 2M-1] float32, contiguous
        # Contiguous once a step here, where every layer's attention kernel would copy the transposed view again.
        return self.weight[self.bucket].t().float().contiguous()


def sinusoidal_table(num_embeddings: int, dim: int, padding_idx: int | None) -> torch.Tensor:
    """fairseq's (tensor2tensor's) sinusoidal position table, as transformers' FSMT builds it."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -step)
    angles = torch.arange(num_embeddings, dtype=torch.int64).float().unsqueeze(1) * freq.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).view(num_embeddings, -1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num_embeddings, 1)], dim=1)
    if padding_idx is not None:
        table[padding_idx, :] = 0
    return table


def _norm(cfg: dict) -> nn.Module:
    cls = RMSNorm if cfg["norm_type"] == "rmsnorm" else LayerNorm
    return cls(cfg["hidden_size"], cfg["norm_epsilon"])


class SelfAttention(nn.Module):
    """Fused qkv projection and output projection; the encoder's attention or the decoder's (over the cache)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.num_heads = self.num_kv_heads = cfg["num_attention_heads"]
        self.head_dim, self.scale = cfg["head_dim"], cfg["attention_scale"]
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(cfg["hidden_size"], 3 * inner, bias=cfg["attention_bias"])
        self.dense = nn.Linear(inner, cfg["hidden_size"], bias=cfg["attention_bias"])
        self.register_parameter("kv_cache_scaling_factor", None)  # [2] (K, V) with a quantized cache (decoder)

    def _qkv(self, x):
        t, hd = x.shape[0], self.head_dim
        q, k, v = self.qkv(x).split([self.num_heads * hd, self.num_kv_heads * hd, self.num_kv_heads * hd], dim=-1)
        return q.view(t, self.num_heads, hd), k.view(t, self.num_kv_heads, hd), v.view(t, self.num_kv_heads, hd)

    def encoder(self, x, cross: CrossMetadata, bias):  # [E, H] -> [E, H]
        q, k, v = self._qkv(x)
        o = encoder_attention(q, k, v, cross, self.scale, bias)
        return self.dense(o.reshape(x.shape[0], -1))

    def decoder(self, x, kv_cache, attn: AttentionMetadata, bias):  # [T, H] -> [T, H]
        q, k, v = self._qkv(x)
        kv_scale = self.kv_cache_scaling_factor
        write_kv(k, v, kv_cache, attn.slot_mapping, kv_scale)
        o = paged_attention(q, kv_cache, attn.query_start_loc, attn.context_lens, attn.block_tables,
                            attn.max_query_len, attn.max_context_len, self.scale, True, bias, kv_scale)
        return self.dense(o.reshape(x.shape[0], -1))


class CrossAttention(nn.Module):
    """Decoder queries over the request's encoder output: K/V are computed once, at the encoder step
    (`write_encoder_kv`), into the cross blocks; each step reads them."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.num_heads = self.num_kv_heads = cfg["num_attention_heads"]
        self.head_dim, self.scale = cfg["head_dim"], cfg["attention_scale"]
        inner = self.num_heads * self.head_dim
        self.q = nn.Linear(cfg["hidden_size"], inner, bias=cfg["attention_bias"])
        self.kv = nn.Linear(cfg["hidden_size"], 2 * inner, bias=cfg["attention_bias"])
        self.dense = nn.Linear(inner, cfg["hidden_size"], bias=cfg["attention_bias"])
        self.register_parameter("kv_cache_scaling_factor", None)  # [2] (K, V) with a quantized cache

    def write_encoder_kv(self, encoded, kv_cache, cross: CrossMetadata) -> None:  # encoded: [E, H]
        e, hd = encoded.shape[0], self.head_dim
        k, v = self.kv(encoded).split([self.num_kv_heads * hd] * 2, dim=-1)
        write_kv(k.view(e, self.num_kv_heads, hd), v.view(e, self.num_kv_heads, hd), kv_cache,
                 cross.encoder_slot_mapping, self.kv_cache_scaling_factor)

    def forward(self, x, kv_cache, attn: AttentionMetadata):  # [T, H] -> [T, H]
        cross = attn.cross
        q = self.q(x).view(x.shape[0], self.num_heads, self.head_dim)
        o = paged_attention(q, kv_cache, attn.query_start_loc, cross.cross_lens, cross.cross_block_tables,
                            attn.max_query_len, cross.max_cross_len, self.scale, False, None,
                            self.kv_cache_scaling_factor)
        return self.dense(o.reshape(x.shape[0], -1))


class MLP(nn.Module):
    """Gated: proj(act(gate(x)) * up(x)) (T5 v1.1's gated-gelu); plain: proj(act(fc(x)))."""

    def __init__(self, cfg: dict, intermediate: int):
        super().__init__()
        hidden, bias = cfg["hidden_size"], cfg["mlp_bias"]
        self.gated = cfg["gated_mlp"]
        if self.gated:
            self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=bias)
        else:
            self.fc = nn.Linear(hidden, intermediate, bias=bias)
        self.proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = get_activation(cfg["hidden_act"])

    def forward(self, x):
        if self.gated:
            return self.proj(act_and_mul(self.gate_up(x), self.act))
        return self.proj(self.act(self.fc(x)))


def run_blocks(blocks, x: torch.Tensor, post_norm: bool, final: nn.Module | None) -> torch.Tensor:
    """A stack's residual blocks, (norm, fn) pairs in order, over x [N, H], then its final norm (None: none).
    Post-norm: x = norm(x + fn(x)) each. Pre-norm: x = x + fn(norm(x)) each, every residual add done by the next
    norm (fused on CUDA: norm(out, residual) returns (norm(out + residual), out + residual), as the decoder-only
    models carry their residual), the last one by the final norm."""
    if post_norm:  # the block's output is the norm's residual argument (a temporary the fused kernel may overwrite)
        for norm, fn in blocks:
            x = norm(x, fn(x))[0]
        return x if final is None else final(x)
    residual, out = x, None  # the fused kernel updates the residual in place: it is x's buffer from here on
    for norm, fn in blocks:
        if out is None:
            h = norm(residual)
        else:
            h, residual = norm(out, residual)
        out = fn(h)
    if out is None:
        return x if final is None else final(x)
    return residual + out if final is None else final(out, residual)[0]


class EncoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.input_layernorm = _norm(cfg)
        self.attention = SelfAttention(cfg)
        self.post_layernorm = _norm(cfg)
        self.mlp = MLP(cfg, cfg["encoder"]["intermediate_size"])

    def blocks(self, cross: CrossMetadata, bias):
        """The layer's residual blocks (run_blocks)."""
        return [(self.input_layernorm, lambda h: self.attention.encoder(h, cross, bias)),
                (self.post_layernorm, self.mlp)]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.input_layernorm = _norm(cfg)
        self.attention = SelfAttention(cfg)
        self.cross_layernorm = _norm(cfg)
        self.cross_attention = CrossAttention(cfg)
        self.post_layernorm = _norm(cfg)
        self.mlp = MLP(cfg, cfg["intermediate_size"])

    def blocks(self, kv_cache, attn: AttentionMetadata, bias):
        """The layer's residual blocks (run_blocks)."""
        return [(self.input_layernorm, lambda h: self.attention.decoder(h, kv_cache, attn, bias)),
                (self.cross_layernorm, lambda h: self.cross_attention(h, kv_cache, attn)),
                (self.post_layernorm, self.mlp)]


class Stack(nn.Module):
    """Embeddings (tokens, positions, their norm), layers and final norm of the encoder or the decoder."""

    def __init__(self, cfg: dict, decoder: bool):
        super().__init__()
        sizes = cfg if decoder else cfg["encoder"]
        hidden = cfg["hidden_size"]
        self.vocab_embedding = embedding(sizes["vocab_size"], hidden)
        kind = cfg["position_embedding_type"]
        if kind == "learned_absolute":
            self.position_embedding = embedding(sizes["max_position_embeddings"] + cfg["position_offset"], hidden)
        if kind == "relative":
            self.relative_bias = RelativePositionBias(cfg["relative_attention_num_buckets"],
                                                      cfg["num_attention_heads"],
                                                      cfg["relative_attention_max_distance"], bidirectional=not decoder)
        self.layernorm_embedding = _norm(cfg) if cfg["layernorm_embedding"] else None
        layer = DecoderLayer if decoder else EncoderLayer
        count = cfg["num_hidden_layers"] if decoder else cfg["encoder"]["num_layers"]
        self.layers = nn.ModuleList(layer(cfg) for _ in range(count))
        self.ln_f = _norm(cfg) if cfg["final_norm"] else None
        self.kind, self.offset, self.scale = kind, cfg["position_offset"], cfg["embedding_scale"]
        self.post_norm = cfg["post_norm"]
        self.max_positions = sizes["max_position_embeddings"]

    def init_buffers(self, device, hidden: int) -> None:
        if self.kind == "sinusoidal":  # fairseq's table, padding row (offset - 1) zero; not a checkpoint tensor
            table = sinusoidal_table(self.max_positions + self.offset, hidden, self.offset - 1)
            self.register_buffer("sinusoidal", table.to(device), persistent=False)
        if self.kind == "relative":
            self.relative_bias.init_buffers(device)

    def embed(self, ids, positions):  # [N], [N] -> [N, H]
        x = self.vocab_embedding(ids)
        if self.scale != 1.0:
            x = x * self.scale
        if self.kind == "learned_absolute":
            x = x + self.position_embedding(positions + self.offset)
        elif self.kind == "sinusoidal":
            x = x + self.sinusoidal[(positions + self.offset).long()].to(x.dtype)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return x

    def bias(self):  # [heads, 2M-1] float32, or None
        return self.relative_bias() if self.kind == "relative" else None

    def run(self, x, layer_blocks):
        """x [N, H] through the layers' residual blocks (`layer_blocks`: one blocks() list a layer, in order) and
        the final norm."""
        return run_blocks((block for blocks in layer_blocks for block in blocks), x, self.post_norm, self.ln_f)


class EncoderDecoderModel(CausalLM):
    """An encoder-decoder model over a packed batch (decoder tokens, plus the encoder inputs of the rows that
    start); parameter names are the engine's tensor names."""

    def __init__(self, engine_config: dict, device="cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        cfg = complete_encdec_config(engine_config)
        check_encdec_config(cfg)
        with torch.device("meta"):
            self.encoder = Stack(cfg, decoder=False)
            self.decoder = Stack(cfg, decoder=True)
            self.lm_head = None if cfg["tie_word_embeddings"] else \
                nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
            self.final_logits_bias = nn.Parameter(torch.empty(cfg["vocab_size"])) if cfg["final_logits_bias"] \
                else None
        self.config = cfg
        self.materialize(device, dtype)

    def init_buffers(self, device) -> None:
        for stack in (self.encoder, self.decoder):
            stack.init_buffers(device, self.config["hidden_size"])

    def linear_layers(self):
        """(layer, its LinearSpecs) of every encoder and decoder layer: what tensor parallelism and quantization
        swap."""
        specs = encdec_linears(self.config)
        return [(layer, specs["encoder"]) for layer in self.encoder.layers] + \
               [(layer, specs["decoder"]) for layer in self.decoder.layers]

    def kv_cache_attentions(self) -> list[nn.Module]:
        """The attentions over the paged cache, each holding its own kv_cache_scaling_factor when the cache is
        quantized: every decoder layer's self-attention and cross-attention (named decoder.layers.{i}.attention
        and decoder.layers.{i}.cross_attention)."""
        return [m for layer in self.decoder.layers for m in (layer.attention, layer.cross_attention)]

    encoder_scope = None
    """Set from outside where the encoder's tokens need their own per-token state (LoRA: llmapi.lora.runtime gives
    them their requests' adapter slots): AttentionMetadata -> the context manager the encoder pass runs in."""

    def encode(self, cross: CrossMetadata, kv_caches) -> None:
        """Run the encoder over the starting rows' inputs and write every decoder layer's cross K/V of them."""
        enc = self.encoder
        x = enc.embed(cross.encoder_ids, cross.encoder_positions)  # [E, H]
        bias = enc.bias()
        x = enc.run(x, (layer.blocks(cross, bias) for layer in enc.layers))
        for layer, cache in zip(self.decoder.layers, kv_caches):
            layer.cross_attention.write_encoder_kv(x, cache, cross)

    def forward(self, input_ids, positions, attn: AttentionMetadata, kv_caches, hidden=None):  # [T], [T] -> [T, H]
        if hidden is not None:
            raise UnsupportedModelError("encoder-decoder models do not run as pipeline stages")
        cross = attn.cross
        if cross is None or kv_caches is None:
            raise RuntimeError("an encoder-decoder step needs its cross-attention metadata and the KV cache")
        if cross.num_encoder_tokens:
            with contextlib.nullcontext() if self.encoder_scope is None else self.encoder_scope(attn):
                self.encode(cross, kv_caches)
        dec = self.decoder
        x = dec.embed(input_ids, positions)  # [T, H]
        bias = dec.bias()
        return dec.run(x, (layer.blocks(cache, attn, bias) for layer, cache in zip(dec.layers, kv_caches)))

    def input_embedding(self) -> nn.Module:
        return self.decoder.vocab_embedding

    def head(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V]
        """The tied head's d_model^-0.5 scaling (the original T5) and BART's final_logits_bias around the head."""
        scale = self.config["logits_scale"]
        if scale != 1.0:
            hidden = hidden * scale
        logits = super().head(hidden)
        return logits if self.final_logits_bias is None else logits + self.final_logits_bias


def convert_layers(hf, cfg: dict, layer_names, bias: bool) -> dict:
    """Engine tensors of every encoder and decoder layer from an HF checkpoint (`hf`: a models.base.HFTensors).

    layer_names(stack, i) -> the HF names of layer i of "encoder" / "decoder": "q", "k", "v", "o" (self
    attention), "cross_q", "cross_k", "cross_v", "cross_o" (decoder only), "fc" or ("gate", "up"), "proj", and the
    norms "self_norm", "cross_norm", "mlp_norm" (each a prefix without ".weight"). Norms take a bias for LayerNorm."""
    hidden, inner = cfg["hidden_size"], cfg["num_attention_heads"] * cfg["head_dim"]
    kinds = ("weight", "bias") if bias else ("weight",)
    norm_kinds = ("weight",) if cfg["norm_type"] == "rmsnorm" else ("weight", "bias")
    w = {}

    def linear(dst: str, srcs: list[str], in_features: int, out_features: int) -> None:
        for kind in kinds:
            parts = [hf.take(f"{src}.{kind}", (out_features, in_features) if kind == "weight" else (out_features,))
                     for src in srcs]
            w[f"{dst}.{kind}"] = parts[0] if len(parts) == 1 else torch.cat(parts)

    def norm(dst: str, src: str) -> None:
        for kind in norm_kinds:
            w[f"{dst}.{kind}"] = hf.take(f"{src}.{kind}", (hidden,))

    for stack, count, inter in (("encoder", cfg["encoder"]["num_layers"], cfg["encoder"]["intermediate_size"]),
                                ("decoder", cfg["num_hidden_layers"], cfg["intermediate_size"])):
        for i in range(count):
            n, dst = layer_names(stack, i), f"{stack}.layers.{i}."
            linear(dst + "attention.qkv", [n["q"], n["k"], n["v"]], hidden, inner)
            linear(dst + "attention.dense", [n["o"]], inner, hidden)
            norm(dst + "input_layernorm", n["self_norm"])
            if stack == "decoder":
                linear(dst + "cross_attention.q", [n["cross_q"]], hidden, inner)
                linear(dst + "cross_attention.kv", [n["cross_k"], n["cross_v"]], hidden, inner)
                linear(dst + "cross_attention.dense", [n["cross_o"]], inner, hidden)
                norm(dst + "cross_layernorm", n["cross_norm"])
            if cfg["gated_mlp"]:
                linear(dst + "mlp.gate_up", [n["gate"], n["up"]], hidden, inter)
            else:
                linear(dst + "mlp.fc", [n["fc"]], hidden, inter)
            linear(dst + "mlp.proj", [n["proj"]], inter, hidden)
            norm(dst + "post_layernorm", n["mlp_norm"])
    return w


GENERATION_KEYS = ("num_beams", "length_penalty", "early_stopping", "min_length", "max_length",
                   "no_repeat_ngram_size", "forced_bos_token_id", "forced_eos_token_id", "decoder_start_token_id")
"""config.json fields that transformers turns into generation settings (older BART / T5 configs hold them there)."""


def encdec_config(family: str, dtype_name: str, hf_config: dict, *, hidden: int, heads: int, head_dim: int,
                  vocab: int, decoder_layers: int, decoder_ffn: int, max_positions: int, encoder: dict, eos_token_id,
                  **options) -> dict:
    """The engine config of an encoder-decoder family: the decoder's fields at the top level (the KV cache, the
    vocabulary and the sampler read them, repeated in `decoder`), the encoder stack's in `encoder`, the generation
    settings config.json holds in `generation`, and the family's options."""
    generation = {key: hf_config[key] for key in GENERATION_KEYS if hf_config.get(key) is not None}
    return {"architecture": ARCHITECTURE, "is_encoder_decoder": True, "family": family, "dtype": dtype_name,
            "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": head_dim,
            "vocab_size": vocab, "num_hidden_layers": decoder_layers, "intermediate_size": decoder_ffn,
            "max_position_embeddings": max_positions, "encoder": encoder,
            "decoder": {"num_layers": decoder_layers, "intermediate_size": decoder_ffn, "vocab_size": vocab,
                        "max_position_embeddings": max_positions},
            "eos_token_id": eos_token_id, "generation": generation, **options}


def start_step(rows, tokens_per_block: int, device=None):
    """A step that starts every (encoder ids, decoder ids) row at once (no cache yet): (decoder ids [T], positions
    [T], AttentionMetadata with its CrossMetadata, number of KV blocks it needs). Each row's cross blocks come first,
    then its decoder blocks; for calibration and tests, where no executor allocates them."""
    def blocks(n):
        return -(-n // tokens_per_block)

    next_block, cross_tables, dec_tables, cross_slots = 0, [], [], []
    for enc, _ in rows:
        table = list(range(next_block, next_block + blocks(len(enc))))
        next_block += len(table)
        cross_tables.append(table)
        cross_slots += [table[i // tokens_per_block] * tokens_per_block + i % tokens_per_block for i in range(len(enc))]
    for _, dec in rows:
        dec_tables.append(list(range(next_block, next_block + blocks(len(dec)))))
        next_block += len(dec_tables[-1])

    def padded(tables):
        width = max(map(len, tables))
        return [t + [0] * (width - len(t)) for t in tables]

    enc_lens, dec_lens = [len(e) for e, _ in rows], [len(d) for _, d in rows]
    attn = AttentionMetadata.build(dec_lens, dec_lens, padded(dec_tables), tokens_per_block, device=device)
    as_int = dict(dtype=torch.int32, device=device)
    start_loc = torch.zeros(len(rows) + 1, **as_int)
    start_loc[1:] = torch.cumsum(torch.tensor(enc_lens, **as_int), 0)
    attn.cross = CrossMetadata(
        encoder_ids=torch.tensor([t for e, _ in rows for t in e], **as_int),
        encoder_positions=torch.tensor([p for n in enc_lens for p in range(n)], **as_int),
        encoder_start_loc=start_loc, encoder_max_len=max(enc_lens),
        encoder_slot_mapping=torch.tensor(cross_slots, dtype=torch.int64, device=device),
        cross_lens=torch.tensor(enc_lens, **as_int), cross_block_tables=torch.tensor(padded(cross_tables), **as_int),
        max_cross_len=max(enc_lens))
    ids = torch.tensor([t for _, d in rows for t in d], **as_int)
    positions = torch.tensor([p for n in dec_lens for p in range(n)], **as_int)
    return ids, positions, attn, next_block
