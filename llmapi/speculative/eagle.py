"""The EAGLE head (EAGLE-1, SafeAILab/EAGLE's model/cnets1.py): a draft layer over the target's hidden states.

Checkpoint layout: a directory with config.json (a LlamaConfig: hidden_size, heads, intermediate_size,
num_hidden_layers, rms_norm_eps, rope settings; optional "bias", default true, for fc) and pytorch_model.bin or
model.safetensors holding `fc.weight` [H, 2H] (+ `fc.bias`), and per layer `layers.N.self_attn.{q,k,v,o}_proj.weight`,
`layers.N.mlp.{gate,up,down}_proj.weight`, `layers.N.post_attention_layernorm.weight` and, for N > 0,
`layers.N.input_layernorm.weight` (layer 0 has none); `embed_tokens.weight` (a copy of the target's) may be there.

The head at position i reads the pair (h_i, e(x_{i+1})): the target's last hidden state h_i (after its final norm)
and the embedding of the token after it, x = fc(cat(e, h)), then its decoder layers (pre-norm Llama layers, the
first without input norm, no final norm). Its output at position i stands for h_{i+1}: the target's LM head on it
gives the draft distribution of x_{i+2}, and while drafting it replaces h_{i+1} in the next pair.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from ..errors import ModelNotFoundError, UnsupportedModelError
from ..layers.attention import AttentionMetadata
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from ..models.gpt import GPTAttention, GPTMLP, complete_config

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def find_eagle_dir(name: str, revision: Optional[str] = None, token=None) -> Path:
    """The EAGLE head's directory: a local path, or a hub repo's snapshot (config.json and the weights)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"speculative_model={name!r}: no EAGLE head directory there")
    from ..hub import _download

    return Path(_download(name, revision, token, ["config.json", *_WEIGHT_FILES]))


def read_eagle_config(path: Path) -> dict:
    """config.json of an EAGLE head directory."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"the EAGLE head directory {str(path)!r} has no config.json")
    return json.loads(config_path.read_text())


def read_eagle_checkpoint(path: Path) -> tuple[dict, dict]:
    """(config.json, state dict) of an EAGLE head directory."""
    config = read_eagle_config(path)
    for name in _WEIGHT_FILES:
        weights = path / name
        if not weights.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return config, load_file(str(weights))
        return config, torch.load(str(weights), map_location="cpu", weights_only=True)
    raise ModelNotFoundError(f"the EAGLE head directory {str(path)!r} has none of {', '.join(_WEIGHT_FILES)}")


def head_config(hf: dict, target: dict) -> dict:
    """The head's layer settings (a general-decoder config, as models/gpt.py reads it) from its config.json,
    checked against the target's engine config."""
    from ..models.llama import config_from_hf

    if any(k in hf for k in ("draft_vocab_size", "target_hidden_size")) or hf.get("architectures") == [
            "LlamaForCausalLMEagle3"]:
        raise UnsupportedModelError("speculative_model is an EAGLE-3 head; only EAGLE-1 heads (fc [H, 2H] over the "
                                    "target's last hidden state) are supported")
    if hf.get("qkv_bias"):
        raise UnsupportedModelError("speculative_model: EAGLE heads with qkv_bias are not supported")
    fields = dict(hf)
    fields.setdefault("vocab_size", target["vocab_size"])
    fields.setdefault("max_position_embeddings", target["max_position_embeddings"])
    cfg = complete_config(config_from_hf(fields, torch.float32))
    for key in ("hidden_size", "vocab_size"):
        if cfg[key] != target[key]:
            raise UnsupportedModelError(f"speculative_model: the EAGLE head's {key} is {cfg[key]}, the target's "
                                        f"{target[key]}")
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], target["max_position_embeddings"])
    return cfg


class EagleLayer(nn.Module):
    """One head layer: x + attention(norm(x)) (no norm on the first layer), then x + mlp(norm(x))."""

    def __init__(self, cfg: dict, first: bool):
        super().__init__()
        self.input_layernorm = None if first else RMSNorm(cfg["hidden_size"], cfg["norm_epsilon"])
        self.attention = GPTAttention(cfg)
        self.post_layernorm = RMSNorm(cfg["hidden_size"], cfg["norm_epsilon"])
        self.mlp = GPTMLP(cfg)

    def forward(self, x, rotary, kv_cache, attn: AttentionMetadata):  # [T, H] -> [T, H]
        h = x if self.input_layernorm is None else self.input_layernorm(x)
        x = x + self.attention(h, rotary, kv_cache, attn)
        return x + self.mlp(self.post_layernorm(x))


class EagleHead(nn.Module):
    """fc over (embedding, hidden state), then the head's layers over the paged head KV cache."""

    def __init__(self, cfg: dict, fc_bias: bool, own_embedding: bool):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.config = cfg
        self.fc = nn.Linear(2 * hidden, hidden, bias=fc_bias)
        self.layers = nn.ModuleList(EagleLayer(cfg, i == 0) for i in range(cfg["num_hidden_layers"]))
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], hidden) if own_embedding else None
        self.rotary: Optional[RotaryEmbedding] = None

    def init_buffers(self, device) -> None:
        cfg = self.config
        self.rotary = RotaryEmbedding(cfg["rotary_dim"], cfg["rotary_base"], cfg["rotary_scaling"],
                                      cfg["max_position_embeddings"], device)

    def forward(self, hidden: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_caches: List[torch.Tensor]) -> torch.Tensor:
        """hidden [T, H] (the target's, or the head's own output while drafting), embeds [T, H] (of the token after
        each), positions [T] (of the hidden states) -> the head's output [T, H]."""
        x = self.fc(torch.cat((embeds, hidden), dim=-1))  # the embedding first, as cnets1.py
        cos, sin = self.rotary(positions)
        rotary = cos.to(x.dtype), sin.to(x.dtype)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, rotary, cache, attn)
        return x


def load_eagle_head(path: Path, target_config: dict, device, dtype: torch.dtype) -> EagleHead:
    """The EAGLE head of directory `path` for a target of engine config `target_config`, on `device` in `dtype`.
    Missing, misshapen or unknown tensors raise UnsupportedModelError naming them."""
    hf, state = read_eagle_checkpoint(path)
    cfg = head_config(hf, target_config)
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, kv_heads, head_dim, inter = (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
                                        cfg["intermediate_size"])
    used = set()

    def take(name: str, shape: tuple) -> torch.Tensor:
        if name not in state:
            raise UnsupportedModelError(f"the EAGLE head {str(path)!r} lacks tensor {name!r}")
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise UnsupportedModelError(f"the EAGLE head's tensor {name!r} has shape {tuple(tensor.shape)}, its "
                                        f"config implies {shape}")
        used.add(name)
        return tensor

    fc_bias = "fc.bias" in state
    if fc_bias != bool(hf.get("bias", True)) and "bias" in hf:
        raise UnsupportedModelError(f"the EAGLE head's config says bias={hf['bias']}, but fc.bias is "
                                    f"{'there' if fc_bias else 'missing'}")
    own_embedding = "embed_tokens.weight" in state
    weights = {"fc.weight": take("fc.weight", (hidden, 2 * hidden))}
    if fc_bias:
        weights["fc.bias"] = take("fc.bias", (hidden,))
    if own_embedding:
        weights["embed_tokens.weight"] = take("embed_tokens.weight", (cfg["vocab_size"], hidden))
    for i in range(layers):
        hf_layer, ours = f"layers.{i}.", f"layers.{i}."
        q = take(hf_layer + "self_attn.q_proj.weight", (heads * head_dim, hidden))
        k = take(hf_layer + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden))
        v = take(hf_layer + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden))
        weights[ours + "attention.qkv.weight"] = torch.cat([q, k, v])
        weights[ours + "attention.dense.weight"] = take(hf_layer + "self_attn.o_proj.weight",
                                                        (hidden, heads * head_dim))
        gate = take(hf_layer + "mlp.gate_proj.weight", (inter, hidden))
        up = take(hf_layer + "mlp.up_proj.weight", (inter, hidden))
        weights[ours + "mlp.gate_up.weight"] = torch.cat([gate, up])
        weights[ours + "mlp.proj.weight"] = take(hf_layer + "mlp.down_proj.weight", (hidden, inter))
        weights[ours + "post_layernorm.weight"] = take(hf_layer + "post_attention_layernorm.weight", (hidden,))
        if i > 0:
            weights[ours + "input_layernorm.weight"] = take(hf_layer + "input_layernorm.weight", (hidden,))
    unknown = sorted(set(state) - used)
    if unknown:
        raise UnsupportedModelError(f"the EAGLE head {str(path)!r} has tensors an EAGLE-1 head does not: "
                                    f"{', '.join(unknown[:8])}")
    head = EagleHead(cfg, fc_bias, own_embedding)
    missing, unexpected = head.load_state_dict(weights, strict=False)
    if unexpected or [m for m in missing if not m.startswith("rotary")]:
        raise UnsupportedModelError(f"the EAGLE head's weights do not fit: missing {missing}, unexpected {unexpected}")
    head = head.to(device=device, dtype=dtype).eval()
    head.init_buffers(device)
    return head


__all__ = ["EagleHead", "load_eagle_head", "find_eagle_dir", "read_eagle_config", "read_eagle_checkpoint",
           "head_config"]
