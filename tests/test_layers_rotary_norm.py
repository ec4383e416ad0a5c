"""Rotary frequencies, norms and activations against transformers' own implementations."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from llmapi.errors import UnsupportedModelError
from llmapi.layers import LayerNorm, RMSNorm, RotaryEmbedding, apply_rotary, get_activation, rope_inv_freq
from llmapi.models.llama import _rope_from_hf

ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


def hf_llama_config(scaling, theta=50000.0, head_dim=32):
    params = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
    return LlamaConfig(hidden_size=128, num_attention_heads=128 // head_dim, max_position_embeddings=256,
                       rope_parameters=params)


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_inv_freq_matches_transformers(case):
    config = hf_llama_config(ROPE_CASES[case])
    theta, scaling = _rope_from_hf(config.to_dict())
    ours, ours_scale = rope_inv_freq(32, theta, scaling, 256)
    if case == "default":
        theirs, theirs_scale = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        theirs, theirs_scale = ROPE_INIT_FUNCTIONS[case](config, "cpu")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert ours_scale == pytest.approx(theirs_scale)


@pytest.mark.parametrize("case", ["llama3", "yarn"])
def test_cos_sin_and_rotation_match_transformers(case):
    config = hf_llama_config(ROPE_CASES[case])
    theta, scaling = _rope_from_hf(config.to_dict())
    positions = torch.tensor([0, 5, 17, 200, 3])
    cos, sin = RotaryEmbedding(32, theta, scaling, 256)(positions)  # [T, hd]
    x = torch.randn(1, 1, 5, 32)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(x, positions[None])  # [1, T, hd]
    torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=0)
    torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=0)
    q = torch.randn(5, 4, 32)  # [T, nh, hd]
    hf_q, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], hf_cos, hf_sin)
    torch.testing.assert_close(apply_rotary(q, cos, sin), hf_q[0].transpose(0, 1), rtol=0, atol=0)


def test_rope_config_forms():
    # transformers 4.x: rope_theta beside a rope_scaling dict that may say "type".
    theta, scaling = _rope_from_hf({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0},
                                    "max_position_embeddings": 64})
    assert (theta, scaling) == (5e5, {"rope_type": "linear", "factor": 4.0})
    assert _rope_from_hf({"max_position_embeddings": 64}) == (10000.0, None)
    assert _rope_from_hf({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
                          "max_position_embeddings": 64}) == (1e4, None)
    _, scaling = _rope_from_hf({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0}, "max_position_embeddings": 64})
    assert scaling["original_max_position_embeddings"] == 64


def test_unknown_rope_type_is_refused():
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        rope_inv_freq(32, 1e4, {"rope_type": "dynamic", "factor": 2.0}, 256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_match_transformers(dtype):
    x = (3 * torch.randn(6, 48)).to(dtype)
    ours, theirs = RMSNorm(48, 1e-5).to(dtype), LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    ln, hf_ln = LayerNorm(48, 1e-5).to(dtype), torch.nn.LayerNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        ln.weight.normal_(), ln.bias.normal_()
        hf_ln.weight.copy_(ln.weight), hf_ln.bias.copy_(ln.bias)
    torch.testing.assert_close(ln(x), hf_ln(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"])
def test_activations_match_transformers(name):
    x = 4 * torch.randn(1000)
    torch.testing.assert_close(get_activation(name)(x), ACT2FN[name](x), rtol=0, atol=0)


def test_unknown_activation_is_refused():
    with pytest.raises(UnsupportedModelError, match="nonsense"):
        get_activation("nonsense")
