"""Triton RMSNorm (+ residual), rotary (+ KV write) and SiLU-and-mul kernels vs the layers' plain-torch paths."""

# Bounds are the attention tests' per-dtype ones: Triton's interpreter truncates float32 -> bfloat16
# (the GPU rounds to nearest), which costs up to one bfloat16 step per element there.

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DEVICE, REL_ERROR, rel_error

from llmapi.layers.activation import act_and_mul
from llmapi.layers.rotary import RotaryEmbedding, apply_rotary

triton = pytest.importorskip("triton")

from llmapi._kernels.activation import silu_and_mul  # noqa: E402
from llmapi._kernels.rms_norm import rms_norm  # noqa: E402
from llmapi._kernels.paged_attention import write_kv_ref  # noqa: E402
from llmapi._kernels.rotary import rotary_qk_, rotary_write_kv_  # noqa: E402

interpreted = pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU these kernels run compiled: pytest -m gpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rms_norm_ref(x, weight, eps):
    """The formula of layers.norm.RMSNorm (statistic in float32, scale in the model dtype)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def check_rms_norm(rows, hidden, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    res = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    out = rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-5)
    assert rel_error(out.cpu(), rms_norm_ref(x, w, 1e-5)) < REL_ERROR[dtype]
    fused, new_res = rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-5, residual=res.clone().to(DEVICE))
    if DEVICE == "cuda":
        assert torch.equal(new_res.cpu(), x + res)  # one rounding of the sum, as the unfused model does
    else:  # the interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest
        assert rel_error(new_res.cpu(), x + res) < REL_ERROR[dtype]
    assert rel_error(fused.cpu(), rms_norm_ref(x + res, w, 1e-5)) < REL_ERROR[dtype]


def check_rotary(tokens, nh, nkv, hd, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, nh + 2 * nkv, hd, generator=g).to(dtype)  # q and k as strided views
    positions = torch.randint(0, 5000, (tokens,), generator=g)
    rope = RotaryEmbedding(hd, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 131072)
    cos, sin = (t.to(dtype) for t in rope(positions))
    q_ref, k_ref = apply_rotary(qkv[:, :nh], cos, sin), apply_rotary(qkv[:, nh:nh + nkv], cos, sin)
    qkv_dev = qkv.clone().to(DEVICE)  # a copy: the kernels work in place
    rotary_qk_(qkv_dev[:, :nh], qkv_dev[:, nh:nh + nkv], cos.to(DEVICE), sin.to(DEVICE))
    qkv_out = qkv_dev.cpu()
    assert rel_error(qkv_out[:, :nh], q_ref) < REL_ERROR[dtype]
    assert rel_error(qkv_out[:, nh:nh + nkv], k_ref) < REL_ERROR[dtype]
    assert torch.equal(qkv_out[:, nh + nkv:], qkv[:, nh + nkv:])  # v untouched
    # Fused with the KV write: q rotated in place, rotated k and v in their slots (some tokens padding).
    block, num_blocks = 4, tokens // 4 + 3
    slots = torch.randperm(num_blocks * block, generator=g)[:tokens]
    slots[::3] = -1
    cache = torch.randn(2, num_blocks, block, nkv, hd, generator=g).to(dtype)
    expected = cache.clone()
    write_kv_ref(k_ref, qkv[:, nh + nkv:], expected[0], expected[1], slots)
    qkv_dev, cache_dev = qkv.clone().to(DEVICE), cache.clone().to(DEVICE)
    rotary_write_kv_(qkv_dev[:, :nh], qkv_dev[:, nh:nh + nkv], qkv_dev[:, nh + nkv:], cos.to(DEVICE), sin.to(DEVICE),
                     cache_dev[0], cache_dev[1], slots.to(DEVICE))
    assert rel_error(qkv_dev[:, :nh].cpu(), q_ref) < REL_ERROR[dtype]
    assert rel_error(cache_dev.cpu(), expected) < REL_ERROR[dtype]
    assert torch.equal(cache_dev[1].cpu(), expected[1])  # v: a copy


def check_silu_and_mul(rows, inter, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(rows, 2 * inter, generator=g)).to(dtype)
    out = silu_and_mul(x.to(DEVICE))
    assert rel_error(out.cpu(), act_and_mul(x, F.silu)) < REL_ERROR[dtype]


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_interpreted(dtype):
    check_rms_norm(3, 40, dtype, seed=0)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_interpreted(dtype):
    check_rotary(5, nh=3, nkv=1, hd=16, dtype=dtype, seed=1)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_interpreted(dtype):
    check_silu_and_mul(3, 24, dtype, seed=2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_gpu(dtype):
    check_rms_norm(333, 4096, dtype, seed=3)
    check_rms_norm(7, 576, dtype, seed=4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_gpu(dtype):
    check_rotary(1000, nh=32, nkv=8, hd=128, dtype=dtype, seed=5)
    check_rotary(17, nh=9, nkv=3, hd=64, dtype=dtype, seed=6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_gpu(dtype):
    check_silu_and_mul(300, 14336, dtype, seed=7)
    check_silu_and_mul(5, 1536, dtype, seed=8)
