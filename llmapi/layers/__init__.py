"""Model building blocks: attention over the paged KV cache, norms, rotary embedding, activations."""

from llmapi.layers.activation import act_and_mul, get_activation
from llmapi.layers.attention import Attention, AttentionMetadata
from llmapi.layers.norm import LayerNorm, RMSNorm
from llmapi.layers.rotary import RotaryEmbedding, apply_rotary, rope_inv_freq, rotate_qk

__all__ = [
    "Attention",
    "AttentionMetadata",
    "LayerNorm",
    "RMSNorm",
    "RotaryEmbedding",
    "act_and_mul",
    "apply_rotary",
    "get_activation",
    "rope_inv_freq",
    "rotate_qk",
]
