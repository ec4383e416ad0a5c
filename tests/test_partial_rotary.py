"""Partial rotary (rotary_dim < head_dim): frequencies, tables and rotation against transformers' GPT-NeoX and
Nemotron code, and the Triton rotary kernels (in place, and fused with the KV write) against the torch path."""

# Bounds are the attention tests' per-dtype ones: Triton's interpreter truncates float32 -> bfloat16
# (the GPU rounds to nearest), which costs up to one bfloat16 step per element there.

import dataclasses

import pytest
import torch
from kernel_cases import DEVICE, REL_ERROR, rel_error
from transformers import GPTNeoXConfig, NemotronConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.nemotron import modeling_nemotron

from llmapi._kernels.kv_quant import kv_scales_from_amax
from llmapi._kernels.paged_attention import write_kv_ref
from llmapi.errors import UnsupportedModelError
from llmapi.layers.rotary import RotaryEmbedding, apply_rotary, rope_inv_freq, rotate_qk

triton = pytest.importorskip("triton")

from llmapi._kernels.rotary import rotary_qk_, rotary_write_kv_  # noqa: E402

interpreted = pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU these kernels run compiled: pytest -m gpu")
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}
HEAD_DIM = 32


def neox_config(scaling, factor, theta=50000.0):
    """A GPT-NeoX config (head_dim 32) whose rope parameters rotate `factor` of each head."""
    params = {"rope_type": "default", **(scaling or {}), "rope_theta": theta, "partial_rotary_factor": factor}
    return GPTNeoXConfig(hidden_size=128, num_attention_heads=128 // HEAD_DIM, max_position_embeddings=256,
                         rope_parameters=params)


@pytest.mark.parametrize("factor", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("case", list(SCALINGS))
def test_inv_freq_over_the_rotary_dim_matches_transformers(case, factor):
    config = neox_config(SCALINGS[case], factor)
    rotary_dim = int(HEAD_DIM * factor)
    ours, ours_scale = rope_inv_freq(rotary_dim, 50000.0, SCALINGS[case], 256)
    if case == "default":
        theirs, theirs_scale = modeling_gpt_neox.GPTNeoXRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        theirs, theirs_scale = ROPE_INIT_FUNCTIONS[case](config, "cpu")
    assert ours.shape == (rotary_dim // 2,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert ours_scale == pytest.approx(theirs_scale)


def _hf_layout(x):  # ours [T, n, hd] -> transformers' [1, n, T, hd]
    return x.transpose(0, 1)[None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["default", "yarn"])
@pytest.mark.parametrize("factor", [0.5, 0.25])
def test_tables_and_rotation_match_gpt_neox(factor, case, dtype):
    config = neox_config(SCALINGS[case], factor)
    rotary_dim = int(HEAD_DIM * factor)
    positions = torch.tensor([0, 5, 17, 200, 3])
    cos, sin = RotaryEmbedding(rotary_dim, 50000.0, SCALINGS[case], 256)(positions)  # [T, rd]
    hf_cos, hf_sin = modeling_gpt_neox.GPTNeoXRotaryEmbedding(config)(torch.randn(1, 5, 8), positions[None])
    assert cos.shape == (5, rotary_dim)
    torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=0)
    torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, HEAD_DIM, generator=g).to(dtype)  # [T, nh, hd]
    k = torch.randn(5, 2, HEAD_DIM, generator=g).to(dtype)
    cos, sin = cos.to(dtype), sin.to(dtype)  # the model dtype, as transformers rotates
    hf_q, hf_k = modeling_gpt_neox.apply_rotary_pos_emb(_hf_layout(q), _hf_layout(k), cos[None], sin[None])
    ours_q, ours_k = rotate_qk(q, k, cos, sin)
    torch.testing.assert_close(ours_q, hf_q[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(ours_k, hf_k[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(ours_q[..., rotary_dim:], q[..., rotary_dim:], rtol=0, atol=0)  # passed through


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tables_and_rotation_match_nemotron(dtype):
    # Nemotron's default partial_rotary_factor is 0.5.
    config = NemotronConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=512)
    head_dim = 64
    rotary_dim = int(head_dim * config.rope_parameters["partial_rotary_factor"])
    assert rotary_dim == 32
    positions = torch.tensor([3, 0, 400, 77])
    cos, sin = RotaryEmbedding(rotary_dim, config.rope_parameters["rope_theta"], None, 512)(positions)
    hf_cos, hf_sin = modeling_nemotron.NemotronRotaryEmbedding(config)(torch.randn(1, 4, 8), positions[None])
    torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=0)
    torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=0)
    q = torch.randn(4, 3, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    cos, sin = cos.to(dtype), sin.to(dtype)
    hf_q, _ = modeling_nemotron.apply_rotary_pos_emb(_hf_layout(q), _hf_layout(q), cos[None], sin[None])
    torch.testing.assert_close(apply_rotary(q, cos, sin), hf_q[0].transpose(0, 1), rtol=0, atol=0)


def test_bad_rotary_dims_are_refused():
    with pytest.raises(UnsupportedModelError, match="rotary dim 7"):
        RotaryEmbedding(7, 1e4, None, 64)
    with pytest.raises(UnsupportedModelError, match="rotary dim 0"):
        rope_inv_freq(0, 1e4, None, 64)
    cos, sin = RotaryEmbedding(32, 1e4, None, 64)(torch.arange(3))  # [3, 32]: wider than a 16-feature head
    x = torch.randn(3, 2, 16)
    with pytest.raises(ValueError, match="width 32 .* heads of 16"):
        apply_rotary(x, cos, sin)
    with pytest.raises(ValueError, match=r"\(3, 32\) .* heads of 16"):
        rotary_qk_(x, x.clone(), cos, sin)


def check_rotary(tokens, nh, nkv, hd, rotary_dim, dtype, seed):
    """rotary_qk_ and rotary_write_kv_ (float cache) against apply_rotary; the features past rotary_dim unchanged."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, nh + 2 * nkv, hd, generator=g).to(dtype)  # q, k and v as strided views
    positions = torch.randint(0, 5000, (tokens,), generator=g)
    cos, sin = (t.to(dtype) for t in RotaryEmbedding(rotary_dim, 10000.0, None, 2048)(positions))  # [T, rd]
    q, k, v = qkv[:, :nh], qkv[:, nh:nh + nkv], qkv[:, nh + nkv:]
    q_ref, k_ref = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    on = [t.to(DEVICE) for t in (cos, sin)]

    qkv_dev = qkv.clone().to(DEVICE)  # a copy: the kernels work in place
    rotary_qk_(qkv_dev[:, :nh], qkv_dev[:, nh:nh + nkv], *on)
    out = qkv_dev.cpu()
    assert rel_error(out[:, :nh], q_ref) < REL_ERROR[dtype]
    assert rel_error(out[:, nh:nh + nkv], k_ref) < REL_ERROR[dtype]
    assert torch.equal(out[..., rotary_dim:], qkv[..., rotary_dim:])  # passed through: untouched
    assert torch.equal(out[:, nh + nkv:], v)

    block, num_blocks = 4, tokens // 4 + 3
    slots = torch.randperm(num_blocks * block, generator=g)[:tokens]
    slots[::3] = -1  # padding tokens: not written
    cache = torch.randn(2, num_blocks, block, nkv, hd, generator=g).to(dtype)
    expected = cache.clone()
    write_kv_ref(k_ref, v, expected[0], expected[1], slots)
    qkv_dev, cache_dev = qkv.clone().to(DEVICE), cache.clone().to(DEVICE)
    rotary_write_kv_(qkv_dev[:, :nh], qkv_dev[:, nh:nh + nkv], qkv_dev[:, nh + nkv:], *on, cache_dev[0],
                     cache_dev[1], slots.to(DEVICE))
    out, cache_out = qkv_dev.cpu(), cache_dev.cpu()
    assert rel_error(out[:, :nh], q_ref) < REL_ERROR[dtype]
    assert torch.equal(out[:, :nh, rotary_dim:], q[..., rotary_dim:])
    assert torch.equal(out[:, nh:], qkv[:, nh:])  # k and v themselves are left as they are
    assert rel_error(cache_out, expected) < REL_ERROR[dtype]
    assert torch.equal(cache_out[0, ..., rotary_dim:], expected[0, ..., rotary_dim:])  # k's tail: a copy
    assert torch.equal(cache_out[1], expected[1])  # v: a copy


def check_rotary_quantized_cache(tokens, nh, nkv, hd, rotary_dim, dtype, cache_dtype, seed):
    """rotary_write_kv_ into an int8 / fp8 cache: the codes write_kv_ref gives the rotated k (its tail unrotated)."""
    g = torch.Generator().manual_seed(seed)
    block, num_blocks = 4, tokens // 4 + 4
    slots = torch.randperm(num_blocks * block, generator=g)[:tokens]
    slots[torch.randperm(tokens, generator=g)[: tokens // 4]] = -1
    qkv = (torch.randn(tokens, nh + 2 * nkv, hd, generator=g) * 2).to(dtype)
    k, v = qkv[:, nh:nh + nkv], qkv[:, nh + nkv:]
    kv_scale = kv_scales_from_amax(6.0, 5.0, cache_dtype).to(dtype)  # some values saturate
    positions = torch.randint(0, 5000, (tokens,), generator=g)
    cos, sin = (t.to(dtype) for t in RotaryEmbedding(rotary_dim, 10000.0, None, 2048)(positions))
    cache = torch.randint(-100, 100, (2, num_blocks, block, nkv, hd), generator=g).to(cache_dtype)
    k_rot = apply_rotary(k, cos, sin)
    qkv_d, cache_d, slots_d, scale_d, cos_d, sin_d = (t.to(DEVICE) for t in (qkv, cache, slots, kv_scale, cos, sin))
    if DEVICE == "cuda":
        # Compiled, the kernel may round the rotation differently from torch's op-by-op reference (see
        # test_kv_cache_quant_kernels.check_write): its own rotation, written into a float cache, is checked
        # against the reference, and the codes against the quantization of that rotation.
        fcache = torch.zeros(2, num_blocks, block, nkv, hd, dtype=dtype, device=DEVICE)
        fresh = qkv.to(DEVICE)
        rotary_write_kv_(fresh[:, :nh], fresh[:, nh:nh + nkv], fresh[:, nh + nkv:], cos_d, sin_d, fcache[0],
                         fcache[1], slots_d)
        written = slots >= 0
        kernel_rot = fcache[0].cpu().view(-1, nkv, hd)[slots.clamp(min=0)]  # [T, nkv, hd]
        assert rel_error(kernel_rot[written], k_rot[written]) < REL_ERROR[dtype]
        k_rot = torch.where(written[:, None, None], kernel_rot, k_rot)
    expected = cache.clone()
    write_kv_ref(k_rot, v, expected[0], expected[1], slots, kv_scale)
    rotary_write_kv_(qkv_d[:, :nh], qkv_d[:, nh:nh + nkv], qkv_d[:, nh + nkv:], cos_d, sin_d, cache_d[0], cache_d[1],
                     slots_d, scale_d)
    # Equal codes; an fp8 zero's sign aside (Triton's interpreter writes -0 as +0; both read as 0).
    assert torch.equal(cache_d.cpu().float(), expected.float())


@interpreted
@pytest.mark.parametrize("rotary_dim", [16, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_kernels_interpreted(rotary_dim, dtype):
    check_rotary(7, nh=3, nkv=2, hd=16, rotary_dim=rotary_dim, dtype=dtype, seed=rotary_dim)


@interpreted
@pytest.mark.parametrize("rotary_dim", [24, 12, 6])
def test_rotary_kernels_interpreted_head_dim_not_a_power_of_two(rotary_dim):
    # Phi-2's layout, scaled down: 80 features with 32 rotated -> 24 with 12; masked tails in each block.
    check_rotary(5, nh=2, nkv=1, hd=24, rotary_dim=rotary_dim, dtype=torch.float32, seed=10 + rotary_dim)


@interpreted
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("rotary_dim", [16, 8, 4])
def test_rotary_write_quantized_cache_interpreted(rotary_dim, cache_dtype):
    check_rotary_quantized_cache(9, nh=2, nkv=2, hd=16, rotary_dim=rotary_dim, dtype=torch.float32,
                                 cache_dtype=cache_dtype, seed=20 + rotary_dim)


def _attention_with_rotary(device: str, rotary_dim: int):
    """The Attention layer's output and KV cache over a mixed step (2 decodes, 2 prefill chunks) with rotary
    tables of rotary_dim: on DEVICE through the Triton kernels (the interpreter on CPU), on "cpu" through torch."""
    import llmapi.layers.dispatch as dispatch
    from test_layers_attention import make_case

    from llmapi.layers.attention import Attention

    query_lens, context_lens = [1, 1, 6, 9], [7, 40, 11, 9]
    q, k, v, k_cache, v_cache, attn, _, _ = make_case(query_lens, context_lens, nh=4, nkv=2, hd=16)
    meta = dataclasses.replace(attn, **{f.name: getattr(attn, f.name).to(device) for f in dataclasses.fields(attn)
                                        if isinstance(getattr(attn, f.name), torch.Tensor)}, num_decodes=2)
    positions = torch.cat([torch.arange(c - n, c) for n, c in zip(query_lens, context_lens)])  # [T]
    rotary = tuple(t.to(device) for t in RotaryEmbedding(rotary_dim, 10000.0, None, 64)(positions))
    kv = torch.stack([k_cache, v_cache]).to(device)
    old, dispatch.TRITON_ON_CPU = dispatch.TRITON_ON_CPU, device == DEVICE
    try:
        out = Attention(scale=0.25)(q.to(device), k.to(device), v.to(device), kv, meta, rotary=rotary)
    finally:
        dispatch.TRITON_ON_CPU = old
    return out.cpu(), kv.cpu()


def check_attention_layer_with_partial_rotary(bound):
    out, kv = _attention_with_rotary(DEVICE, rotary_dim=8)
    want_out, want_kv = _attention_with_rotary("cpu", rotary_dim=8)
    assert rel_error(out, want_out) < bound
    assert rel_error(kv, want_kv) < REL_ERROR[torch.float32]
    full_out, _ = _attention_with_rotary("cpu", rotary_dim=16)
    assert rel_error(full_out, want_out) > 0.01  # the rotary dim matters: the check above is not vacuous


@interpreted
def test_attention_layer_with_partial_rotary_interpreted():
    # The fused rotary + KV write and attention kernels against the layer's torch path (rotate_qk, write_kv_ref).
    check_attention_layer_with_partial_rotary(REL_ERROR[torch.float32])


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_kernels_gpu(dtype):
    check_rotary(1000, nh=32, nkv=8, hd=128, rotary_dim=64, dtype=dtype, seed=30)  # GPT-NeoX / Nemotron style
    check_rotary(1000, nh=32, nkv=8, hd=128, rotary_dim=128, dtype=dtype, seed=31)
    check_rotary(333, nh=32, nkv=8, hd=128, rotary_dim=32, dtype=dtype, seed=32)
    check_rotary(17, nh=32, nkv=32, hd=80, rotary_dim=32, dtype=dtype, seed=33)  # Phi-2


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("rotary_dim", [128, 64, 32])
def test_rotary_write_quantized_cache_gpu(rotary_dim, cache_dtype):
    check_rotary_quantized_cache(777, nh=32, nkv=8, hd=128, rotary_dim=rotary_dim, dtype=torch.bfloat16,
                                 cache_dtype=cache_dtype, seed=40 + rotary_dim)


@pytest.mark.gpu
def test_attention_layer_with_partial_rotary_gpu():
    check_attention_layer_with_partial_rotary(1e-4)  # float32 kernels sum in another order than the reference
