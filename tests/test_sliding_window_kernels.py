"""Sliding-window attention: the torch reference against a dense oracle built from transformers' own mask
function, and the Triton decode (split-K) and packed kernels against the reference, with the blocks before
each window released (their block-table entries -1 or pointing at a block of NaNs: never read)."""

import dataclasses
import math

import pytest
import torch
from kernel_cases import DEVICE, REL_ERROR, paged_case, rel_error

from llmapi._kernels.paged_attention import paged_attention_ref, varlen_causal_attention_ref
from llmapi.layers.attention import Attention, AttentionMetadata

triton = pytest.importorskip("triton")

from llmapi._kernels.decode_attention import paged_decode_attention  # noqa: E402
from llmapi._kernels.kv_quant import CODE_MAX, quantize_kv_ref  # noqa: E402
from llmapi._kernels.prefill_attention import paged_packed_attention  # noqa: E402

interpreted = pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU these kernels run compiled: pytest -m gpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def hf_window_mask(num_q: int, num_k: int, window: int) -> torch.Tensor:
    """[L, S] bool: transformers' sliding-window causal mask for L queries at the last L of S positions."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    allowed = sliding_window_causal_mask_function(window)
    q_idx = torch.arange(num_k - num_q, num_k)[:, None]
    return allowed(torch.tensor(0), torch.tensor(0), q_idx, torch.arange(num_k)[None, :]).expand(num_q, num_k)


def dense_attention(q, k, v, scale, mask):
    """softmax(q k^T * scale, masked) v in float64: q [L, nh, hd], k, v [S, nkv, hd], mask [L, S] bool."""
    nh, nkv = q.shape[1], k.shape[1]
    k, v = k.double().repeat_interleave(nh // nkv, 1), v.double().repeat_interleave(nh // nkv, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def release_before_window(tables, query_lens, ctx_lens, block, window, released):
    """Mark each request's blocks that lie wholly before its first query's window as handed back: -1, or the
    id `released` of a block of NaNs. Returns how many entries it marked."""
    marked = 0
    for r, (q_len, ctx) in enumerate(zip(query_lens, ctx_lens)):
        count = max(0, ctx - q_len - window + 1) // block
        tables[r, :count] = released
        marked += count
    return marked


def windowed_case(query_lens, ctx_lens, nh, nkv, hd, block, dtype, seed, window, released):
    """paged_case with the blocks before each window released; `released` "nan" adds a block of NaNs for them."""
    q, kc, vc, qsl, ctx, tables = paged_case(query_lens, ctx_lens, nh, nkv, hd, block, dtype, seed)
    if released == "nan":
        nan = torch.full((1, *kc.shape[1:]), float("nan"), dtype=dtype, device=kc.device)
        kc, vc = torch.cat([kc, nan]), torch.cat([vc, nan])
        released = kc.shape[0] - 1
    assert release_before_window(tables, query_lens, ctx_lens, block, window, released) > 0
    return q, kc, vc, qsl, ctx, tables


def reference(q, kc, vc, qsl, ctx, tables, scale, window, kv_scale=None):
    """paged_attention_ref in float64 on the CPU (quantized caches dequantized by it)."""
    if kv_scale is None:
        kc, vc = kc.double(), vc.double()
    return paged_attention_ref(q.double().cpu(), kc.cpu(), vc.cpu(), qsl.cpu(), ctx.cpu(), tables.cpu(), scale,
                               None if kv_scale is None else kv_scale.cpu(), sliding_window=window)


# ----------------------------------------------------------------------------------- the torch reference
@pytest.mark.parametrize("window", [1, 3, 8, 13])
def test_reference_equals_transformers_window_mask(window):
    # Whole prompts, later chunks (one starting mid-block), decodes; the blocks before each window hold NaN.
    query_lens, ctx_lens = [9, 5, 1, 1, 3, 30, 1], [9, 14, 7, 33, 21, 30, 2]
    g = torch.Generator().manual_seed(window)
    nh, nkv, hd, block = 4, 2, 8, 4
    q, kc, vc, qsl, ctx, tables = paged_case(query_lens, ctx_lens, nh, nkv, hd, block, torch.float32, window,
                                             device="cpu")
    full = [(torch.cat([kc[b] for b in tables[r, :math.ceil(c / block)].tolist()])[:c],
             torch.cat([vc[b] for b in tables[r, :math.ceil(c / block)].tolist()])[:c])
            for r, c in enumerate(ctx_lens)]  # each request's keys and values in position order
    nan = torch.full((1, *kc.shape[1:]), float("nan"))
    kc, vc = torch.cat([kc, nan]), torch.cat([vc, nan])
    release_before_window(tables, query_lens, ctx_lens, block, window, kc.shape[0] - 1)
    scale = float(torch.rand((), generator=g)) + 0.2
    out = paged_attention_ref(q, kc, vc, qsl, ctx, tables, scale, sliding_window=window)
    starts = qsl.tolist()
    for r, (k, v) in enumerate(full):
        rows = slice(starts[r], starts[r + 1])
        want = dense_attention(q[rows], k, v, scale, hf_window_mask(rows.stop - rows.start, len(k), window))
        torch.testing.assert_close(out[rows].double(), want, atol=1e-5, rtol=1e-5)


def test_reference_without_window_is_unchanged_by_a_window_past_the_context():
    q, kc, vc, qsl, ctx, tables = paged_case([9, 1, 4], [9, 20, 13], 4, 2, 8, 4, torch.float32, 0, device="cpu")
    plain = paged_attention_ref(q, kc, vc, qsl, ctx, tables, 0.3)
    assert torch.equal(paged_attention_ref(q, kc, vc, qsl, ctx, tables, 0.3, sliding_window=20), plain)
    assert not torch.allclose(paged_attention_ref(q, kc, vc, qsl, ctx, tables, 0.3, sliding_window=19), plain)


def test_varlen_reference_and_layer_without_cache_apply_the_window():
    g = torch.Generator().manual_seed(3)
    lens, window = [12, 1, 7], 5
    q, k, v = (torch.randn(sum(lens), h, 8, generator=g) for h in (4, 2, 2))
    qsl = torch.tensor([0, 12, 13, 20], dtype=torch.int32)
    out = varlen_causal_attention_ref(q, k, v, qsl, 0.4, sliding_window=window)
    attn = AttentionMetadata.build(lens, lens, [[0] * 3] * 3, 4)
    assert torch.equal(Attention(0.4, sliding_window=window)(q, k, v, None, attn), out)
    for start, end in zip(qsl[:-1].tolist(), qsl[1:].tolist()):
        n = end - start
        want = dense_attention(q[start:end], k[start:end], v[start:end], 0.4, hf_window_mask(n, n, window))
        torch.testing.assert_close(out[start:end].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "64"])
def test_attention_refuses_a_bad_window(bad):
    with pytest.raises(ValueError, match="sliding_window"):
        Attention(0.5, sliding_window=bad)
    q, kc, vc, qsl, ctx, tables = paged_case([1], [5], 2, 2, 8, 4, torch.float32, 0)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode_attention(q, kc, vc, ctx, tables, 0.5, 1, sliding_window=bad)


def test_attention_repr_names_the_window():
    assert "sliding_window=4096" in repr(Attention(0.125, sliding_window=4096))
    assert "sliding_window" not in repr(Attention(0.125))


# ----------------------------------------------------------------------------------- Triton kernels
def check_decode(ctx_lens, nh, nkv, hd, block, dtype, num_splits, seed, window, released, block_n=None):
    q, kc, vc, qsl, ctx, tables = windowed_case([1] * len(ctx_lens), ctx_lens, nh, nkv, hd, block, dtype, seed,
                                                window, released)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    paged_decode_attention(q, kc, vc, ctx, tables, hd**-0.5, num_splits, out=out, sliding_window=window,
                           block_n=block_n)
    err = rel_error(out.cpu(), reference(q, kc, vc, qsl, ctx, tables, hd**-0.5, window))
    assert err < REL_ERROR[dtype], f"relative error {err:.2e}"


def check_packed(query_lens, ctx_lens, nh, nkv, hd, block, dtype, seed, window, released):
    q, kc, vc, qsl, ctx, tables = windowed_case(query_lens, ctx_lens, nh, nkv, hd, block, dtype, seed, window,
                                                released)
    out = torch.full_like(q, float("nan"))
    paged_packed_attention(q, kc, vc, qsl, ctx, tables, hd**-0.5, out=out, sliding_window=window)
    err = rel_error(out.cpu(), reference(q, kc, vc, qsl, ctx, tables, hd**-0.5, window))
    assert err < REL_ERROR[dtype], f"relative error {err:.2e}"


@interpreted
@pytest.mark.parametrize("released", [-1, "nan"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_window_interpreted(dtype, released):
    # Contexts inside the window, at it, one past it, and windows starting mid-tile and mid-block; one split
    # (the kernel writes the output), two and three (some empty once the window is split).
    for num_splits in (1, 2, 3):
        check_decode([3, 10, 11, 37, 130], nh=4, nkv=2, hd=16, block=4, dtype=dtype, num_splits=num_splits,
                     seed=num_splits, window=10, released=released, block_n=16)


@interpreted
def test_decode_attention_window_interpreted_mha_default_tiles():
    check_decode([70, 200], nh=3, nkv=3, hd=24, block=8, dtype=torch.float32, num_splits=2, seed=5, window=33,
                 released="nan")


@interpreted
@pytest.mark.parametrize("released", [-1, "nan"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_attention_window_interpreted(dtype, released):
    # A prompt longer than the window (later rows of a query tile see none of its first key tiles), later
    # chunks, decodes.
    check_packed([40, 5, 1, 1, 9], [40, 14, 7, 33, 60], nh=4, nkv=2, hd=16, block=4, dtype=dtype, seed=3,
                 window=6, released=released)


@interpreted
def test_packed_attention_window_interpreted_mha_long_query_tile():
    # MHA: 64-token query tiles over 32-key tiles; a window of 5 leaves most rows nothing in the first tiles.
    check_packed([70, 3], [70, 50], nh=2, nkv=2, hd=8, block=8, dtype=torch.float32, seed=4, window=5,
                 released="nan")


def check_mixed_step(dtype, num_decodes, window):
    """Attention(sliding_window=W) through the Triton path on a step whose leading requests decode (through the
    decode kernel when num_decodes is set) and the rest prefill, blocks before the windows released (-1):
    equals the dense oracle under transformers' mask."""
    import llmapi.layers.dispatch as dispatch
    from test_layers_attention import make_case

    query_lens, context_lens = [1, 1, 1, 6, 1, 30], [7, 40, 1, 31, 3, 30]
    q, k, v, k_cache, v_cache, attn, full_k, full_v = make_case(query_lens, context_lens, nh=8, nkv=2, hd=16)
    tables = attn.block_tables.clone()
    assert release_before_window(tables, query_lens, context_lens, 4, window, -1) > 0
    kv_cache = torch.stack([k_cache, v_cache]).to(DEVICE, dtype)
    meta = dataclasses.replace(attn, block_tables=tables, num_decodes=num_decodes)
    meta = dataclasses.replace(meta, **{f.name: getattr(meta, f.name).to(DEVICE) for f in dataclasses.fields(meta)
                                        if isinstance(getattr(meta, f.name), torch.Tensor)})
    old, dispatch.TRITON_ON_CPU = dispatch.TRITON_ON_CPU, True
    try:
        out = Attention(0.25, sliding_window=window)(q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype),
                                                     kv_cache, meta)
    finally:
        dispatch.TRITON_ON_CPU = old
    for r, (start, end) in enumerate(zip(attn.query_start_loc[:-1].tolist(), attn.query_start_loc[1:].tolist())):
        want = dense_attention(q[start:end].to(dtype).float(), full_k[r].to(dtype).float(),
                               full_v[r].to(dtype).float(), 0.25, hf_window_mask(end - start, context_lens[r], window))
        assert rel_error(out[start:end].float().cpu(), want) < REL_ERROR[dtype], r


@interpreted
@pytest.mark.parametrize("num_decodes", [0, 3])
def test_mixed_step_window_interpreted(num_decodes):
    check_mixed_step(torch.float32, num_decodes, window=5)


def check_quantized(cache_dtype, dtype, window, decode):
    """The kernels over an int8 / fp8 cache with a window equal the reference over the same codes."""
    query_lens, ctx_lens = ([1] * 4, [9, 40, 3, 77]) if decode else ([20, 1, 5, 1], [20, 40, 31, 9])
    q, kc, vc, qsl, ctx, tables = windowed_case(query_lens, ctx_lens, 4, 2, 16, 4, torch.float32, 7, window, -1)
    kv_scale = torch.tensor([float(kc.abs().max()), float(vc.abs().max())]) / CODE_MAX[cache_dtype]
    kq = quantize_kv_ref(kc.cpu(), kv_scale[0], cache_dtype).to(DEVICE)
    vq = quantize_kv_ref(vc.cpu(), kv_scale[1], cache_dtype).to(DEVICE)
    q, kv_scale = q.to(dtype), kv_scale.to(DEVICE)
    out = torch.full_like(q, float("nan"))
    if decode:
        paged_decode_attention(q, kq, vq, ctx, tables, 0.25, 2, out=out, kv_scale=kv_scale, sliding_window=window)
    else:
        paged_packed_attention(q, kq, vq, qsl, ctx, tables, 0.25, out=out, kv_scale=kv_scale, sliding_window=window)
    err = rel_error(out.cpu(), reference(q, kq, vq, qsl, ctx, tables, 0.25, window, kv_scale))
    assert err < REL_ERROR[dtype], f"relative error {err:.2e}"


@interpreted
@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float8_e4m3fn])
def test_quantized_cache_window_interpreted(cache_dtype, decode):
    check_quantized(cache_dtype, torch.float32, 7, decode)


# ----------------------------------------------------------------------------------- GPU, realistic shapes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nh,nkv,hd,window", [(32, 8, 128, 4096), (32, 8, 128, 1000), (48, 4, 128, 4096),
                                              (9, 3, 64, 33)])
def test_decode_attention_window_gpu(dtype, nh, nkv, hd, window):
    g = torch.Generator().manual_seed(hd + window)
    ctx_lens = torch.randint(window + 1, 3 * window, (20,), generator=g).tolist() + [1, window, window + 1]
    for num_splits in (1, 4, 13):
        check_decode(ctx_lens, nh, nkv, hd, block=32, dtype=dtype, num_splits=num_splits, seed=num_splits,
                     window=window, released=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nh,nkv,hd,window", [(32, 8, 128, 4096), (32, 8, 128, 700), (24, 24, 128, 100),
                                              (9, 3, 64, 33)])
def test_packed_attention_window_gpu(dtype, nh, nkv, hd, window):
    g = torch.Generator().manual_seed(hd + window)
    query_lens = [5000, 1, 17, 1, 300, 64, 1, 1500]
    # At least two blocks of context before each prompt: a window shorter than that leaves blocks to release.
    ctx_lens = [q + 64 + int(torch.randint(0, 2 * window, (1,), generator=g)) for q in query_lens]
    check_packed(query_lens, ctx_lens, nh, nkv, hd, block=32, dtype=dtype, seed=hd, window=window, released=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_decodes", [0, 3])
def test_mixed_step_window_gpu(dtype, num_decodes):
    check_mixed_step(dtype, num_decodes, window=5)


@pytest.mark.gpu
@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_cache_window_gpu(cache_dtype, dtype, decode):
    check_quantized(cache_dtype, dtype, 7, decode)
