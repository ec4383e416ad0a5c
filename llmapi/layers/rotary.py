"""Rotary position embedding (neox / rotate-half style, of the whole head or of its first rotary_dim features)
with the default, linear, llama3 and yarn scalings."""

import math

import torch
from torch import nn

from llmapi.errors import UnsupportedModelError
from llmapi.layers.dispatch import use_triton

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_inv_freq(
    rotary_dim: int, base: float, scaling: dict | None, max_position_embeddings: int, device=None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim // 2] float32 and the cos/sin scale, computed as transformers does.

    rotary_dim is the head dim, or for partial rotary the features rotated (head_dim * partial_rotary_factor):
    transformers computes every scaling over that dim.
    """
    if rotary_dim <= 0 or rotary_dim % 2:
        raise UnsupportedModelError(f"rotary dim {rotary_dim} is not a positive even number")
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / rotary_dim
    inv_freq = 1.0 / (base**exponents)  # [rd/2]
    if rope_type == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if rope_type == "linear":
        # Dividing the frequencies equals dividing the positions by `factor` (position interpolation).
        return inv_freq / factor, 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, factor, scaling), 1.0
    return _yarn_inv_freq(rotary_dim, base, factor, scaling, max_position_embeddings, device)


def _llama3_inv_freq(inv_freq: torch.Tensor, factor: float, scaling: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths are interpolated by `factor`, short ones kept, a smooth ramp between."""
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq  # [rd/2]
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(rotary_dim, base, factor, scaling, max_position_embeddings, device):
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
        return (rotary_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # avoids a division by zero in the ramp
    ramp = torch.clamp((torch.arange(rotary_dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2, device=device).to(torch.float32) / rotary_dim)
    extrapolation = 1 - ramp  # [rd/2]: 1 keeps the original frequency, 0 interpolates it
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin for given positions, computed in float32 on the fly (no table bounded by max positions).

    Built with rotary_dim < head_dim (partial rotary, e.g. GPT-NeoX, Phi, Nemotron), the tables are
    [T, rotary_dim] and every consumer rotates only the first rotary_dim features of each head.
    """

    def __init__(self, rotary_dim: int, base: float, scaling: dict | None, max_position_embeddings: int, device=None):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(rotary_dim, base, scaling, max_position_embeddings, device)
        # float32 always: build the model in its dtype instead of calling .to(dtype) on it afterwards.
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [rd/2]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # each [T, rd] float32
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, rd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, rd]
        if self.attention_scaling == 1.0:  # two kernels fewer per step
            return emb.cos(), emb.sin()
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def _rotary_dim_of(cos: torch.Tensor, head_dim: int) -> int:
    """The features of a head that the tables rotate: cos.shape[-1], the whole head or (partial rotary) fewer."""
    rd = cos.shape[-1]
    if rd % 2 or not 0 < rd <= head_dim:
        raise ValueError(f"rotary tables of width {rd} do not fit heads of {head_dim} features "
                         "(the rotary dim must be even and at most head_dim)")
    return rd


def apply_rotary(
    x: torch.Tensor,  # [T, n_heads, hd]
    cos: torch.Tensor,  # [T, rd], already in x's dtype (transformers rotates in the model dtype); rd <= hd
    sin: torch.Tensor,  # [T, rd]
) -> torch.Tensor:  # [T, n_heads, hd]
    """Rotate the two halves (x1, x2) of each head's first rd features -> (x1 cos - x2 sin, x2 cos + x1 sin);
    the features past rd (partial rotary) pass through unchanged."""
    rd = _rotary_dim_of(cos, x.shape[-1])
    if rd == x.shape[-1]:
        return _rotate_half_style(x, cos, sin)
    return torch.cat((_rotate_half_style(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)


def _rotate_half_style(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # [T, n, rd]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [T, n, rd]
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rotate_qk(
    q: torch.Tensor,  # [T, nh, hd]
    k: torch.Tensor,  # [T, nkv, hd]
    cos: torch.Tensor,  # [T, rd] in the model dtype; rd <= hd
    sin: torch.Tensor,  # [T, rd]
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary to q and k; on CUDA one fused kernel rotates both in place."""
    if use_triton(q):
        from llmapi._kernels.rotary import rotary_qk_

        rotary_qk_(q, k, cos, sin)
        return q, k
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
