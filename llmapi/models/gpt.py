"""The general decoder every decoder-only family runs through (Llama, GPT-2, GPTBigCode, StarCoder2, OPT,
NeMo GPT-Next): one model with options, as TensorRT-LLM runs every GPT variant through one GPT model.

The options are engine config fields (`complete_config` fills them for engines saved before they existed):
- `position_embedding_type`: "learned_absolute" (a table, read at position + `position_offset`) or
  "rope_gpt_neox" (rotary on the first `rotary_dim` features of each head, half-split);
- `num_key_value_heads`: MHA (= heads), GQA, MQA (1);
- `attention_bias` (qkv and dense), `mlp_bias`;
- `norm_type`: "rmsnorm" or "layernorm" (NeMo's layernorm1p is a layernorm whose weight gains 1 at conversion);
- `gated_mlp`: proj(act(gate(x)) * up(x)) (swiglu, geglu) or proj(act(fc(x))) (gelu, relu, squared relu);
- `post_norm`: norm after each residual add (OPT with do_layer_norm_before=False) instead of before each block;
- `final_norm`: whether a norm follows the last layer;
- `embedding_projection`: the embedding width when it differs from the hidden size (OPT-350m's project_in / out);
- `sliding_window`: each query sees only the last `sliding_window` positions.

Linears carry the names every feature reads: attention.qkv (q heads, k heads, v heads), attention.dense,
mlp.gate_up (gate rows, then up rows) or mlp.fc, and mlp.proj; `layer_linears` declares how each is cut and fed.
"""

from dataclasses import dataclass

import torch
from torch import nn

from llmapi._kernels.fp8_linear import Fp8Input
from llmapi.layers.activation import act_and_mul, fused_input_scale, get_activation
from llmapi.layers.attention import Attention, AttentionMetadata
from llmapi.layers.norm import LayerNorm, RMSNorm
from llmapi.layers.rotary import RotaryEmbedding
from llmapi.models.base import CausalLM, embedding

_DEFAULTS = {
    # Engines of the first two families, saved before the options existed, hold only what differed then.
    "LlamaForCausalLM": dict(position_embedding_type="rope_gpt_neox", norm_type="rmsnorm", gated_mlp=True),
    "GPT2LMHeadModel": dict(position_embedding_type="learned_absolute", norm_type="layernorm", gated_mlp=False),
}
_COMMON_DEFAULTS = dict(position_offset=0, rotary_dim=None, post_norm=False, final_norm=True,
                        embedding_projection=None, sliding_window=None, attention_bias=False, mlp_bias=False)


def complete_config(cfg: dict) -> dict:
    """The engine config with every option of this model present (defaults for an older engine's absent keys)."""
    out = {**_COMMON_DEFAULTS, **_DEFAULTS.get(cfg.get("architecture"), {}), **cfg}
    if out["rotary_dim"] is None and out["position_embedding_type"] == "rope_gpt_neox":
        out["rotary_dim"] = out["head_dim"]
    return out


@dataclass(frozen=True)
class LinearSpec:
    """One linear of a decoder layer (under transformer.layers.{i}.), as tensor parallelism, quantization,
    calibration and SmoothQuant need to know it."""

    name: str
    """"attention.qkv", "attention.dense", "mlp.gate_up", "mlp.fc" or "mlp.proj"."""
    split: str
    """How tensor parallelism cuts it: "qkv" (columns of q heads, and of k / v heads, replicated when there are
    fewer KV heads than ranks), "gate_up" (columns of gate and of up), "column", or "row" (input features; the
    outputs are summed across ranks)."""
    unit: str
    """What its cut features count: "heads" (attention) or "intermediate" (MLP) features."""
    norm: str | None
    """The norm whose output is its whole input, into which SmoothQuant may fold its smoothing; None when its
    input is something else (attention output, activation, or a post-norm residual stream)."""


def layer_linears(cfg: dict) -> tuple[LinearSpec, ...]:
    """The quantizable linears of each decoder layer of an engine config, in execution order."""
    cfg = complete_config(cfg)
    pre = not cfg["post_norm"]
    mlp_in = "mlp.gate_up" if cfg["gated_mlp"] else "mlp.fc"
    return (LinearSpec("attention.qkv", "qkv", "heads", "input_layernorm" if pre else None),
            LinearSpec("attention.dense", "row", "heads", None),
            LinearSpec(mlp_in, "gate_up" if cfg["gated_mlp"] else "column", "intermediate",
                       "post_layernorm" if pre else None),
            LinearSpec("mlp.proj", "row", "intermediate", None))


def _norm(cfg: dict) -> nn.Module:
    cls = RMSNorm if cfg["norm_type"] == "rmsnorm" else LayerNorm
    return cls(cfg["hidden_size"], cfg["norm_epsilon"])


def _attention(cfg: dict, head_dim: int) -> Attention:
    window = cfg["sliding_window"]
    return Attention(scale=head_dim**-0.5, sliding_window=window) if window else Attention(scale=head_dim**-0.5)


class GPTAttention(nn.Module):
    """Fused qkv projection, rotary on q and k (rotary models), attention over the paged cache, output projection."""

    def __init__(self, cfg: dict):
        super().__init__()
        # Per-rank head counts: a tensor-parallel transform shards qkv/dense and divides these.
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"])
        hidden, q_size, kv_size = cfg["hidden_size"], self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv = nn.Linear(hidden, q_size + 2 * kv_size, bias=cfg["attention_bias"])
        self.dense = nn.Linear(q_size, hidden, bias=cfg["attention_bias"])
        self.attn = _attention(cfg, self.head_dim)

    def forward(self, x, rotary, kv_cache, attn: AttentionMetadata):  # x: [T, H] -> [T, H]
        """rotary: (cos, sin) [T, rotary_dim] to apply to q and k, or None."""
        tokens, hd = x.shape[0], self.head_dim
        q, k, v = self.qkv(x).split([self.num_heads * hd, self.num_kv_heads * hd, self.num_kv_heads * hd], dim=-1)
        q = q.view(tokens, self.num_heads, hd)  # [T, nh, hd]
        k, v = k.view(tokens, self.num_kv_heads, hd), v.view(tokens, self.num_kv_heads, hd)  # [T, nkv, hd]
        # Attention [T, nh, hd], written as the dense layer's E4M3 input where that is FP8.
        o = self.attn(q, k, v, kv_cache, attn, rotary=rotary, quant_scale=fused_input_scale(self.dense, q))
        if isinstance(o, Fp8Input):
            return self.dense(o._replace(q=o.q.reshape(tokens, self.num_heads * hd)))
        return self.dense(o.reshape(tokens, self.num_heads * hd))


class GPTMLP(nn.Module):
    """Gated: proj(act(gate(x)) * up(x)), gate and up fused in one matmul; plain: proj(act(fc(x)))."""

    def __init__(self, cfg: dict):
        super().__init__()
        hidden, inter, bias = cfg["hidden_size"], cfg["intermediate_size"], cfg["mlp_bias"]
        self.gated = cfg["gated_mlp"]
        if self.gated:
            self.gate_up = nn.Linear(hidden, 2 * inter, bias=bias)
        else:
            self.fc = nn.Linear(hidden, inter, bias=bias)
        self.proj = nn.Linear(inter, hidden, bias=bias)
        self.act = get_activation(cfg["hidden_act"])

    @property
    def first(self) -> nn.Module:
        """The linear that reads the block's input."""
        return self.gate_up if self.gated else self.fc

    def forward(self, x):  # [T, H] -> [T, H]
        if self.gated:
            gate_up = self.gate_up(x)  # [T, 2I]
            # act_and_mul: [T, 2I] -> [T, I] (as an FP8 proj's quantized input where a kernel can write that)
            return self.proj(act_and_mul(gate_up, self.act, fused_input_scale(self.proj, gate_up)))
        return self.proj(self.act(self.fc(x)))  # fc: [T, I]


class GPTDecoderLayer(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + mlp(norm(x)), each residual add fused into the next norm.
    Post-norm: norm(x + attention(x)), then norm(x + mlp(x))."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.post_norm = cfg["post_norm"]
        self.input_layernorm = _norm(cfg)
        self.attention = GPTAttention(cfg)
        self.post_layernorm = _norm(cfg)
        self.mlp = GPTMLP(cfg)

    def forward(self, x, residual, rotary, kv_cache, attn):  # x, residual: [T, H] -> (out, residual)
        """The residual stream is residual + x (x alone on the first layer, where residual is None; post-norm
        layers always hand on residual None)."""
        if self.post_norm:
            # The block's output is the norms' residual argument: on CUDA the sum is written there, in a temporary
            # rather than in x (the layer's input, which may be a buffer the caller keeps).
            x = self.input_layernorm(x, self.attention(x, rotary, kv_cache, attn))[0]
            return self.post_layernorm(x, self.mlp(x))[0], None
        # Each norm writes its output as the next linear's quantized input where that is an FP8 linear.
        scale = fused_input_scale(self.attention.qkv, x)
        if residual is None:
            h, residual = self.input_layernorm(x, quant_scale=scale), x
        else:
            h, residual = self.input_layernorm(x, residual, quant_scale=scale)
        h = self.attention(h, rotary, kv_cache, attn)
        h, residual = self.post_layernorm(h, residual, quant_scale=fused_input_scale(self.mlp.first, h))
        return self.mlp(h), residual


class GPTTransformer(nn.Module):
    """Embeddings, decoder layers, final norm: the `transformer.*` tensors."""

    def __init__(self, cfg: dict):
        super().__init__()
        hidden, width = cfg["hidden_size"], cfg["embedding_projection"] or cfg["hidden_size"]
        self.vocab_embedding = embedding(cfg["vocab_size"], width)
        if cfg["position_embedding_type"] == "learned_absolute":
            self.position_embedding = embedding(cfg["max_position_embeddings"] + cfg["position_offset"], hidden)
        self.layers = nn.ModuleList(GPTDecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.ln_f = _norm(cfg) if cfg["final_norm"] else None


class GPTForCausalLM(CausalLM):
    """A decoder-only model over a packed batch; parameter names are the engine's tensor names."""

    def __init__(self, engine_config: dict, device="cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        cfg = complete_config(engine_config)
        with torch.device("meta"):
            self.transformer = GPTTransformer(cfg)
            width = cfg["embedding_projection"] or cfg["hidden_size"]
            self.lm_head = None if cfg["tie_word_embeddings"] else nn.Linear(width, cfg["vocab_size"], bias=False)
            if cfg["embedding_projection"]:
                self.project_in = nn.Linear(width, cfg["hidden_size"], bias=False)
                self.project_out = nn.Linear(cfg["hidden_size"], width, bias=False)
            else:
                self.project_in = self.project_out = None
        self.config = cfg
        self.materialize(device, dtype)

    def init_buffers(self, device) -> None:
        # Built after the parameters: the frequencies must be computed, in float32, not left uninitialized.
        cfg = self.config
        if cfg["position_embedding_type"] == "rope_gpt_neox":
            self.rotary = RotaryEmbedding(
                cfg["rotary_dim"], cfg["rotary_base"], cfg["rotary_scaling"], cfg["max_position_embeddings"], device)
        else:
            self.rotary = None

    def forward(self, input_ids, positions, attn: AttentionMetadata, kv_caches, hidden=None):  # [T], [T] -> [T, H]
        """hidden: [T, H], the previous pipeline stage's output, which replaces the embeddings."""
        t = self.transformer
        if hidden is not None:
            x = hidden
        else:
            x = t.vocab_embedding(input_ids)  # [T, H] (or [T, embedding_projection])
            if self.project_in is not None:
                x = self.project_in(x)
            if self.rotary is None:
                offset = self.config["position_offset"]
                x = x + t.position_embedding(positions + offset if offset else positions)
        rotary = None
        if self.rotary is not None:
            cos, sin = self.rotary(positions)  # [T, rotary_dim] float32
            rotary = cos.to(x.dtype), sin.to(x.dtype)  # transformers rotates in the model dtype
        residual = None
        for i, layer in enumerate(t.layers):
            x, residual = layer(x, residual, rotary, None if kv_caches is None else kv_caches[i], attn)
        if t.ln_f is None:
            return x if residual is None else x + residual
        return t.ln_f(x) if residual is None else t.ln_f(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:  # [N, H] -> [N, V]
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return super().compute_logits(hidden, float32)
