"""Quantized (int8 / fp8 E4M3) KV cache: the torch references, and the Triton write, rotary-write and attention kernels."""

import pytest
import torch
from kernel_cases import DEVICE, REL_ERROR, paged_case, rel_error

from llmapi._kernels.kv_quant import (CODE_MAX, FP8_MAX, dequantize_kv_ref, kv_scales_from_amax,
                                      quantize_kv_ref)
from llmapi._kernels.paged_attention import paged_attention_ref, write_kv_ref
from llmapi.layers.rotary import apply_rotary

triton = pytest.importorskip("triton")

from llmapi._kernels.decode_attention import num_splits_for, paged_decode_attention  # noqa: E402
from llmapi._kernels.kv_write import write_kv  # noqa: E402
from llmapi._kernels.prefill_attention import paged_packed_attention  # noqa: E402
from llmapi._kernels.rotary import rotary_write_kv_  # noqa: E402

interpreted = pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU these kernels run compiled: pytest -m gpu")
CACHE_DTYPES = [torch.int8, torch.float8_e4m3fn]
# Attention over a quantized cache vs over the float cache, relative error of the output, for N(0, 1) K and V
# (measured on the case below with seeds 1-3: int8 0.0095-0.0099, fp8 0.030-0.036). Per element, int8's error is
# uniform within half a step amax / 127 (amax ~4 sigma: rms ~0.009 sigma); E4M3's is within 2**-4 of the value
# (rms ~2.5%); errors in K move the softmax weights as well, so the output error is of the per-element order.
QUANT_VS_FLOAT = {torch.int8: 0.015, torch.float8_e4m3fn: 0.05}


def _scales(k_cache, v_cache, cache_dtype):
    """[2] calibrated (K, V) scales: amax / 127 for int8; for fp8 amax / 448, so the whole E4M3 range is used."""
    return kv_scales_from_amax(float(k_cache.abs().max()), float(v_cache.abs().max()), cache_dtype)


def _quantized(cache, scale, cache_dtype):
    return quantize_kv_ref(cache, scale, cache_dtype)


def _same_codes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal codes; an fp8 zero's sign aside (Triton's interpreter writes -0 as +0; both read as 0)."""
    return torch.equal(a.float(), b.float()) if a.dtype == torch.float8_e4m3fn else torch.equal(a, b)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_quantize_ref_error_bounds(cache_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 3
    scale = kv_scales_from_amax(float(x.abs().max()), 1.0, cache_dtype)[0]
    assert float(scale) == pytest.approx(float(x.abs().max()) / CODE_MAX[cache_dtype], rel=1e-7)  # amax / max code
    codes = quantize_kv_ref(x, scale, cache_dtype)
    assert codes.dtype == cache_dtype
    err = (dequantize_kv_ref(codes, scale, torch.float32) - x).abs()
    if cache_dtype == torch.int8:
        assert bool((err <= scale / 2 * (1 + 1e-6)).all())  # half a step
        assert int(codes.abs().max()) == 127
    else:
        # E4M3 keeps 3 mantissa bits: half a step is 2**-4 of the value's binade base, for normal values.
        normal = x.abs() / scale >= 2**-6
        assert bool((err[normal] <= x.abs()[normal] * 2**-4).all())
        assert bool((err[~normal] <= scale * 2**-10 * (1 + 1e-6)).all())  # subnormal step 2**-9
        assert float(codes.float().abs().max()) == FP8_MAX
    # Saturation instead of overflow (fp8 would become NaN): 10x the calibrated range maps to the top code.
    top = quantize_kv_ref(torch.tensor([10.0, -10.0]) * float(x.abs().max()), scale, cache_dtype).float()
    assert top.tolist() == [CODE_MAX[cache_dtype], -CODE_MAX[cache_dtype]]
    # Hand-computed with scale 0.5: 1.3 -> 2.6 -> int8 3 / fp8 2.5 (E4M3 step 0.25 in [2, 4)); ties go to even:
    # int8 2.5 -> 2, 3.5 -> 4; fp8 2.125 -> 2.0 (mantissa 000), 2.375 -> 2.5 (mantissa 010).
    if cache_dtype == torch.int8:
        inputs, expected = [1.3, 1.25, 1.75], [3.0, 2.0, 4.0]
    else:
        inputs, expected = [1.3, 1.0625, 1.1875], [2.5, 2.0, 2.5]
    assert quantize_kv_ref(torch.tensor(inputs), torch.tensor(0.5), cache_dtype).float().tolist() == expected


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_write_then_read_ref_equals_attention_over_dequantized_cache(cache_dtype):
    q, kc, vc, qsl, ctx, tables = paged_case([7, 1, 1, 3], [7, 20, 9, 12], nh=4, nkv=2, hd=16, block=4,
                                             dtype=torch.float32, seed=1, device="cpu")
    kv_scale = _scales(kc, vc, cache_dtype)
    # Write every slot through write_kv_ref (a quantizing scatter), then read it back through the reference.
    num_blocks, block, nkv, hd = kc.shape
    slots = torch.randperm(num_blocks * block, generator=torch.Generator().manual_seed(2))
    kq = torch.zeros(kc.shape, dtype=cache_dtype)
    vq = torch.zeros(vc.shape, dtype=cache_dtype)
    write_kv_ref(kc.view(-1, nkv, hd)[slots], vc.view(-1, nkv, hd)[slots], kq, vq, slots, kv_scale)
    assert _same_codes(kq, _quantized(kc, kv_scale[0], cache_dtype))
    assert _same_codes(vq, _quantized(vc, kv_scale[1], cache_dtype))
    out = paged_attention_ref(q, kq, vq, qsl, ctx, tables, hd**-0.5, kv_scale)
    k_deq, v_deq = dequantize_kv_ref(kq, kv_scale[0], torch.float32), dequantize_kv_ref(vq, kv_scale[1], torch.float32)
    assert torch.equal(out, paged_attention_ref(q, k_deq, v_deq, qsl, ctx, tables, hd**-0.5))  # exactly
    err = rel_error(out, paged_attention_ref(q, kc, vc, qsl, ctx, tables, hd**-0.5))
    assert err < QUANT_VS_FLOAT[cache_dtype], err


def check_write(num_tokens, nkv, hd, block, dtype, cache_dtype, seed, rotary=False, nh=4):
    g = torch.Generator().manual_seed(seed)
    num_blocks = num_tokens // block + 4
    slots = torch.randperm(num_blocks * block, generator=g)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=g)[: num_tokens // 4]] = -1  # padding tokens: skipped
    qkv = (torch.randn(num_tokens, nh + 2 * nkv, hd, generator=g) * 2).to(dtype)  # q, k, v as strided views
    k, v = qkv[:, nh:nh + nkv], qkv[:, nh + nkv:]  # q (qkv[:, :nh]) is only rotated in place
    kv_scale = kv_scales_from_amax(6.0, 5.0, cache_dtype).to(dtype)  # some values saturate
    angles = torch.rand(num_tokens, hd // 2, generator=g) * 100  # rotary tables repeat their first half
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))  # [T, hd]
    cache = torch.randint(-100, 100, (2, num_blocks, block, nkv, hd), generator=g).to(cache_dtype)
    expected = cache.clone()
    write_kv_ref(apply_rotary(k, cos, sin) if rotary else k, v, expected[0], expected[1], slots, kv_scale)
    on = [t.to(DEVICE) for t in (qkv, cache, slots, kv_scale, cos, sin)]
    qkv_d, cache_d, slots_d, scale_d, cos_d, sin_d = on
    if rotary:
        rotary_write_kv_(qkv_d[:, :nh], qkv_d[:, nh:nh + nkv], qkv_d[:, nh + nkv:], cos_d, sin_d, cache_d[0],
                         cache_d[1], slots_d, scale_d)
    else:
        write_kv(qkv_d[:, nh:nh + nkv], qkv_d[:, nh + nkv:], cache_d[0], cache_d[1], slots_d, scale_d)
    if rotary and DEVICE == "cuda":
        # Compiled, the kernel rotates in float32 and rounds once to the model dtype, where torch's reference
        # rounds after each bfloat16 op, so the rotated K differs in ~1% of elements. The codes are then checked
        # against the kernel's own rotation (written once into a float cache), and that rotation against the
        # reference within the dtype's bound.
        fcache = torch.zeros(2, num_blocks * block, nkv, hd, dtype=dtype, device=DEVICE)
        fresh = qkv.to(DEVICE)
        rotary_write_kv_(fresh[:, :nh], fresh[:, nh:nh + nkv], fresh[:, nh + nkv:], cos_d, sin_d,
                         fcache[0].view(num_blocks, block, nkv, hd), fcache[1].view(num_blocks, block, nkv, hd),
                         slots_d)
        written = slots >= 0
        k_rot = fcache[0].cpu()[slots.clamp(min=0)]  # [T, nkv, hd]; rows of padding tokens are never read
        assert rel_error(k_rot[written], apply_rotary(k, cos, sin)[written]) < REL_ERROR[dtype]
        expected = cache.clone()
        write_kv_ref(k_rot, v, expected[0], expected[1], slots, kv_scale)
    assert _same_codes(cache_d.cpu(), expected)  # the same float32 operations: the same codes


def check_attention(query_lens, ctx_lens, nh, nkv, hd, block, dtype, cache_dtype, seed, num_splits=0, **decode_kw):
    q, kc, vc, qsl, ctx, tables = paged_case(query_lens, ctx_lens, nh, nkv, hd, block, dtype, seed)
    kv_scale = _scales(kc.float(), vc.float(), cache_dtype).to(device=kc.device)
    kq, vq = _quantized(kc, kv_scale[0], cache_dtype), _quantized(vc, kv_scale[1], cache_dtype)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    if num_splits:
        paged_decode_attention(q, kq, vq, ctx, tables, hd**-0.5, num_splits, out=out, kv_scale=kv_scale, **decode_kw)
    else:
        paged_packed_attention(q, kq, vq, qsl, ctx, tables, hd**-0.5, out=out, kv_scale=kv_scale)
    # The oracle: the float64 reference over the cache's dequantized values.
    args = [t.cpu() for t in (qsl, ctx, tables)]
    k_deq = dequantize_kv_ref(kq.cpu(), kv_scale[0].cpu(), torch.float64)
    v_deq = dequantize_kv_ref(vq.cpu(), kv_scale[1].cpu(), torch.float64)
    ref = paged_attention_ref(q.double().cpu(), k_deq, v_deq, *args, hd**-0.5)
    assert rel_error(out.cpu(), ref) < REL_ERROR[dtype]
    # And the reference's own quantized path agrees with the kernel.
    ref_q = paged_attention_ref(q.cpu(), kq.cpu(), vq.cpu(), *args, hd**-0.5, kv_scale.cpu())
    assert rel_error(out.cpu(), ref_q.double()) < 2 * REL_ERROR[dtype]


@interpreted
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("rotary", [False, True])
def test_write_kv_quantized_interpreted(cache_dtype, rotary):
    check_write(12, nkv=2, hd=8, block=4, dtype=torch.float32, cache_dtype=cache_dtype, seed=5, rotary=rotary)


@interpreted
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_decode_attention_quantized_interpreted(cache_dtype):
    for num_splits in (2, 1):
        check_attention([1, 1, 1], [1, 37, 130], nh=4, nkv=2, hd=16, block=4, dtype=torch.float32,
                        cache_dtype=cache_dtype, seed=1, num_splits=num_splits)


@interpreted
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_packed_attention_quantized_interpreted(cache_dtype):
    check_attention([9, 5, 1, 1], [9, 14, 7, 33], nh=4, nkv=2, hd=16, block=4, dtype=torch.bfloat16,
                    cache_dtype=cache_dtype, seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_write_kv_quantized_gpu(cache_dtype, dtype):
    for rotary in (False, True):
        check_write(3000, nkv=8, hd=128, block=32, dtype=dtype, cache_dtype=cache_dtype, seed=6, rotary=rotary)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nh,nkv,hd", [(32, 8, 128), (9, 3, 64)])
def test_attention_quantized_gpu(cache_dtype, dtype, nh, nkv, hd):
    g = torch.Generator().manual_seed(hd)
    ctx_lens = torch.randint(1, 3000, (24,), generator=g).tolist() + [1, 32, 33, 64, 65]
    check_attention([1] * len(ctx_lens), ctx_lens, nh, nkv, hd, 32, dtype, cache_dtype, seed=1, num_splits=4)
    query_lens = [1000, 1, 17, 1, 300, 64, 1, 129]
    ctx_lens = [n + int(torch.randint(0, 900, (1,), generator=g)) for n in query_lens]
    check_attention(query_lens, ctx_lens, nh, nkv, hd, 32, dtype, cache_dtype, seed=2)
    # Long rows with short ones, at the defaults for a bound of 5,000 keys (a CUDA graph's): one split per
    # 1,024 keys of the bound, each row's parts 256 keys at least where there are 128 (request, kv head) pairs.
    ctx_lens = torch.randint(3000, 5000, (12,), generator=g).tolist() + [1, 40, 257, 700, 2000]
    splits = num_splits_for(len(ctx_lens), nkv, 5000, quantized=True)
    check_attention([1] * len(ctx_lens), ctx_lens, nh, nkv, hd, 32, dtype, cache_dtype, seed=3, num_splits=splits,
                    max_context_len=5000)


@interpreted
@pytest.mark.parametrize("algo", ["FP8", "INT8"])
def test_tiny_llama_quantized_cache_kernels_match_reference(monkeypatch, algo):
    """The tiny Llama over a quantized cache: Triton kernels (interpreted) vs the plain-torch path, step by step."""
    import llmapi.layers.dispatch as dispatch
    from tiny_models import PagedDriver, make_tiny_llama, to_engine_model

    from llmapi.distributed.mapping import Mapping
    from llmapi.distributed.sharding import build_rank_model
    from llmapi.quantization.config import QuantConfig
    from llmapi.quantization.kv_cache import SCALE_NAME, kv_cache_dtype

    float_model, cfg = to_engine_model(make_tiny_llama())
    cfg = {**cfg, "quantization": QuantConfig(None, kv_cache_quant_algo=algo).to_dict()}
    weights = dict(float_model.state_dict())
    for i in range(cfg["num_hidden_layers"]):
        weights[SCALE_NAME.format(i)] = kv_scales_from_amax(4.0, 3.5, kv_cache_dtype(cfg, torch.float32))
    model = build_rank_model(cfg, Mapping(1, 1), "cpu", torch.float32)
    model.load_weights(weights)
    drivers = [PagedDriver(model.eval(), cfg, dtype=kv_cache_dtype(cfg, torch.float32)) for _ in range(2)]
    a, b = [5, 9, 11, 3, 8, 21, 7], [4, 17, 2]
    for chunks in ({0: a[:5], 1: b}, {0: a[5:]}, {0: [30], 1: [31]}):  # packed prefill, a chunk, decodes
        ref = drivers[0].step(chunks)
        monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
        out = drivers[1].step(chunks)
        monkeypatch.setattr(dispatch, "TRITON_ON_CPU", False)
        for rid in chunks:
            torch.testing.assert_close(out[rid], ref[rid], rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(drivers[1].kv_caches, drivers[0].kv_caches):
        assert _same_codes(ours, theirs)  # the fused rotary write stores the reference's codes
