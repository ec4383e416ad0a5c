"""Rotary position embedding (neox / rotate-half style) with the default, linear, llama3 and yarn scalings."""

import math

import torch
from torch import nn

from llmapi.errors import UnsupportedModelError
from llmapi.layers.dispatch import use_triton

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_inv_freq(
    head_dim: int, base: float, scaling: dict | None, max_position_embeddings: int, device=None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] float32 and the cos/sin scale, computed as transformers does."""
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponents)  # [hd/2]
    if rope_type == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if rope_type == "linear":
        # Dividing the frequencies equals dividing the positions by `factor` (position interpolation).
        return inv_freq / factor, 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, factor, scaling), 1.0
    return _yarn_inv_freq(head_dim, base, factor, scaling, max_position_embeddings, device)


def _llama3_inv_freq(inv_freq: torch.Tensor, factor: float, scaling: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths are interpolated by `factor`, short ones kept, a smooth ramp between."""
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq  # [hd/2]
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(head_dim, base, factor, scaling, max_position_embeddings, device):
    """YaRN: per-dimension blend of interpolated and extrapolated frequencies, plus a cos/sin scale."""
    original_max = scaling.get("original_max_position_embeddings") or max_position_embeddings

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return (head_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoids a division by zero in the ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, head_dim, 2, device=device).to(torch.float32) / head_dim)
    extrapolation = 1 - ramp  # [hd/2]: 1 keeps the original frequency, 0 interpolates it
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin for given positions, computed in float32 on the fly (no table bounded by max positions)."""

    def __init__(self, head_dim: int, base: float, scaling: dict | None, max_position_embeddings: int, device=None):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(head_dim, base, scaling, max_position_embeddings, device)
        # float32 always: build the model in its dtype instead of calling .to(dtype) on it afterwards.
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [hd/2]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # each [T, hd] float32
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
        if self.attention_scaling == 1.0:  # two kernels fewer per step
            return emb.cos(), emb.sin()
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def apply_rotary(
    x: torch.Tensor,  # [T, n_heads, hd]
    cos: torch.Tensor,  # [T, hd], already in x's dtype (transformers rotates in the model dtype)
    sin: torch.Tensor,  # [T, hd]
) -> torch.Tensor:  # [T, n_heads, hd]
    """Rotate each head's two halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [T, n, hd]
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rotate_qk(
    q: torch.Tensor,  # [T, nh, hd]
    k: torch.Tensor,  # [T, nkv, hd]
    cos: torch.Tensor,  # [T, hd] in the model dtype
    sin: torch.Tensor,  # [T, hd]
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary to q and k; on CUDA one fused kernel rotates both in place."""
    if use_triton(q):
        from llmapi._kernels.rotary import rotary_qk_

        rotary_qk_(q, k, cos, sin)
        return q, k
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
