"""GPT-2 family: the torch model (learned positions, LayerNorm, biased linears) and its HF conversion."""

from collections.abc import Mapping

import torch
from torch import nn

from llmapi.errors import UnsupportedModelError
from llmapi.layers.activation import get_activation
from llmapi.layers.attention import Attention, AttentionMetadata
from llmapi.layers.norm import LayerNorm
from llmapi.models.base import CausalLM, HFTensors, dtype_name, embedding, require_positive, token_id_list


class GPT2Attention(nn.Module):
    """Fused qkv projection (with bias), attention over the paged cache, output projection."""

    def __init__(self, cfg: dict):
        super().__init__()
        # Per-rank head count: a tensor-parallel transform shards qkv/dense and divides it.
        self.num_heads, self.head_dim = cfg["num_attention_heads"], cfg["head_dim"]
        hidden = cfg["hidden_size"]
        self.qkv = nn.Linear(hidden, 3 * self.num_heads * self.head_dim)
        self.dense = nn.Linear(self.num_heads * self.head_dim, hidden)
        self.attn = Attention(scale=self.head_dim**-0.5)

    def forward(self, x, kv_cache, attn: AttentionMetadata):  # x: [T, H] -> [T, H]
        tokens = x.shape[0]
        q, k, v = self.qkv(x).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)  # each [T, nh, hd]
        o = self.attn(q, k, v, kv_cache, attn)  # [T, nh, hd]
        return self.dense(o.reshape(tokens, self.num_heads * self.head_dim))


class GPT2MLP(nn.Module):
    """proj(act(fc(x)))."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.fc = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"])
        self.proj = nn.Linear(cfg["intermediate_size"], cfg["hidden_size"])
        self.act = get_activation(cfg["hidden_act"])

    def forward(self, x):  # [T, H] -> [T, H]
        return self.proj(self.act(self.fc(x)))  # fc: [T, I]


class GPT2Block(nn.Module):
    """Pre-norm block: x + attention(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.input_layernorm = LayerNorm(cfg["hidden_size"], cfg["norm_epsilon"])
        self.attention = GPT2Attention(cfg)
        self.post_layernorm = LayerNorm(cfg["hidden_size"], cfg["norm_epsilon"])
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, kv_cache, attn):  # [T, H] -> [T, H]
        x = x + self.attention(self.input_layernorm(x), kv_cache, attn)
        return x + self.mlp(self.post_layernorm(x))


class GPT2Transformer(nn.Module):
    """Token and position embeddings, blocks, final norm: the `transformer.*` tensors."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.vocab_embedding = embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.position_embedding = embedding(cfg["max_position_embeddings"], cfg["hidden_size"])
        self.layers = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.ln_f = LayerNorm(cfg["hidden_size"], cfg["norm_epsilon"])


class GPT2LMHeadModel(CausalLM):
    """GPT-2 decoder over a packed batch; parameter names are the engine's tensor names."""

    def __init__(self, engine_config: dict, device="cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        cfg = engine_config
        with torch.device("meta"):
            self.transformer = GPT2Transformer(cfg)
            tied = cfg["tie_word_embeddings"]
            self.lm_head = None if tied else nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        self.materialize(device, dtype)

    def forward(self, input_ids, positions, attn: AttentionMetadata, kv_caches, hidden=None):  # [T], [T] -> [T, H]
        """hidden: [T, H], the previous pipeline stage's output, which replaces the embeddings."""
        t = self.transformer
        if hidden is None:
            x = t.vocab_embedding(input_ids) + t.position_embedding(positions)  # [T, H]
        else:
            x = hidden
        for i, layer in enumerate(t.layers):
            x = layer(x, None if kv_caches is None else kv_caches[i], attn)
        return t.ln_f(x)


def config_from_hf(hf_config: dict, dtype: torch.dtype) -> dict:
    """Engine config.json fields (all but mapping/quantization) from an HF GPT-2 config.json dict."""
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
        raise UnsupportedModelError("GPT-2 with cross-attention (add_cross_attention) is not supported")
    if hf_config.get("scale_attn_weights", True) is not True or hf_config.get("scale_attn_by_inverse_layer_idx"):
        raise UnsupportedModelError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
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
        "rotary_base": None,
        "rotary_scaling": None,
        "attention_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": bool(hf_config.get("tie_word_embeddings", True)),
        "bos_token_id": hf_config.get("bos_token_id"),
        "eos_token_id": token_id_list(hf_config.get("eos_token_id")),
    }


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
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = hf.take("lm_head.weight", (vocab, hidden))
    elif hf.has("lm_head.weight"):
        hf.skip("lm_head.weight")  # the tied head saved under its own name too
    hf.check_all_used()
    return cfg, w


GPT2LMHeadModel.convert_hf = staticmethod(convert_hf)
GPT2LMHeadModel.config_from_hf = staticmethod(config_from_hf)
