"""Encoder-decoder attention (non-causal, T5's relative position bias): the torch references and the Triton
kernels vs a dense attention written here from the definition, loop by loop."""

import math
from itertools import accumulate

import pytest
import torch
from kernel_cases import DEVICE, REL_ERROR, rel_error

from llmapi._kernels.paged_attention import paged_attention_ref, varlen_attention_ref


def dense_attention(q, k, v, scale, q_pos, k_pos, causal, bias=None, window=None):
    """q [L, nh, hd] at positions q_pos, k, v [S, nkv, hd] at k_pos (lists of ints): for each head h (kv head
    h // (nh / nkv)) scores = scale * q k^T + bias[h, clamp(kp - qp, -(M-1), M-1) + M - 1], keys after the
    query (causal) or at or before qp - window masked, softmax, times v; float64, a query with no key gets 0."""
    seq_q, nh, _ = q.shape
    seq_k, nkv, _ = k.shape
    out = torch.zeros(q.shape, dtype=torch.float64)
    m = 0 if bias is None else (bias.shape[1] + 1) // 2
    for h in range(nh):
        kvh = h // (nh // nkv)
        scores = scale * (q[:, h].double() @ k[:, kvh].double().T)  # [L, S]
        for i in range(seq_q):
            for j in range(seq_k):
                if bias is not None:
                    rel = min(max(k_pos[j] - q_pos[i], -(m - 1)), m - 1)
                    scores[i, j] += float(bias[h, rel + m - 1])
                if causal and (k_pos[j] > q_pos[i] or (window and k_pos[j] <= q_pos[i] - window)):
                    scores[i, j] = float("-inf")
        for i in range(seq_q):
            if seq_k and scores[i].max() > float("-inf"):
                out[i, h] = scores[i].softmax(-1) @ v[:, kvh].double()
    return out


def cache_case(query_lens, context_lens, nh, nkv, hd, block, dtype, seed):
    """Full K/V per request written slot by slot into a paged cache at shuffled block ids (tables padded with
    the request's first block), and the queries. Returns q, k_cache, v_cache, query_start_loc, context_lens,
    block_tables (on DEVICE) and the per-request K, V lists (CPU)."""
    g = torch.Generator().manual_seed(seed)
    needed = [math.ceil(c / block) for c in context_lens]
    num_blocks = sum(needed) + 2
    perm = torch.randperm(num_blocks, generator=g).tolist()
    k_cache = torch.randn(num_blocks, block, nkv, hd, generator=g).to(dtype)  # unused slots: random
    v_cache = torch.randn(num_blocks, block, nkv, hd, generator=g).to(dtype)
    width = max(needed) + 1
    tables, full_k, full_v = [], [], []
    for n, ctx in zip(needed, context_lens):
        ids = [perm.pop() for _ in range(n)]
        tables.append(ids + [ids[0] if ids else 0] * (width - n))
        k = torch.randn(ctx, nkv, hd, generator=g).to(dtype)
        v = torch.randn(ctx, nkv, hd, generator=g).to(dtype)
        for p in range(ctx):
            k_cache[ids[p // block], p % block] = k[p]
            v_cache[ids[p // block], p % block] = v[p]
        full_k.append(k)
        full_v.append(v)
    q = torch.randn(sum(query_lens), nh, hd, generator=g).to(dtype)
    qsl = torch.tensor([0, *accumulate(query_lens)], dtype=torch.int32)
    to = dict(device=DEVICE)
    return (q.to(**to), k_cache.to(**to), v_cache.to(**to), qsl.to(**to),
            torch.tensor(context_lens, dtype=torch.int32, **to), torch.tensor(tables, dtype=torch.int32, **to),
            full_k, full_v)


def varlen_case(lens, nh, nkv, hd, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q = torch.randn(t, nh, hd, generator=g).to(dtype)
    k = torch.randn(t, nkv, hd, generator=g).to(dtype)
    v = torch.randn(t, nkv, hd, generator=g).to(dtype)
    qsl = torch.tensor([0, *accumulate(lens)], dtype=torch.int32)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), qsl.to(DEVICE)


def t5_bias(nh, m, seed):
    """A [nh, 2M-1] float32 table of the size of T5's learned buckets."""
    return (2 * torch.randn(nh, 2 * m - 1, generator=torch.Generator().manual_seed(seed))).to(DEVICE)


def dense_paged(q, qsl, ctx_lens, full_k, full_v, scale, causal, bias=None, window=None):
    """dense_attention for every request of a paged case: query j of request r at ctx - len + j (causal)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    starts = qsl.tolist()
    for r, ctx in enumerate(ctx_lens):
        start, end = starts[r], starts[r + 1]
        q_pos = list(range(ctx - (end - start), ctx))
        out[start:end] = dense_attention(q[start:end].cpu(), full_k[r], full_v[r], scale, q_pos, list(range(ctx)),
                                         causal, None if bias is None else bias.cpu(), window)
    return out


def dense_varlen(q, k, v, qsl, scale, causal, bias=None, window=None):
    out = torch.zeros(q.shape, dtype=torch.float64)
    starts = qsl.tolist()
    for start, end in zip(starts[:-1], starts[1:]):
        pos = list(range(end - start))
        out[start:end] = dense_attention(q[start:end].cpu(), k[start:end].cpu(), v[start:end].cpu(), scale, pos,
                                         pos, causal, None if bias is None else bias.cpu(), window)
    return out


# Self-attention steps: a whole prompt, a chunk, decodes (one at position 0), a chunk ending mid-block.
SELF_QUERY, SELF_CTX = [9, 5, 1, 1, 3, 1], [9, 14, 7, 1, 11, 23]
# Cross-attention steps: a decoder prompt longer than its encoder input, decodes, a row with no encoder keys.
CROSS_QUERY, CROSS_CTX = [6, 1, 3, 1, 1], [4, 13, 9, 1, 0]


def _cpu(*tensors):
    return [t.cpu() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_paged_attention_ref_causal_bias_and_cross(dtype, with_bias):
    nh, nkv, hd, scale = 4, 2, 8, 0.7
    q, kc, vc, qsl, ctx, tables, full_k, full_v = cache_case(SELF_QUERY, SELF_CTX, nh, nkv, hd, 4, dtype, 1)
    q, kc, vc, qsl, ctx, tables = _cpu(q, kc, vc, qsl, ctx, tables)
    bias = t5_bias(nh, 4, 2).cpu() if with_bias else None  # M = 4: distances past 3 share a bucket
    out = paged_attention_ref(q, kc, vc, qsl, ctx, tables, scale, position_bias=bias)
    want = dense_paged(q, qsl, SELF_CTX, full_k, full_v, scale, True, bias)
    assert out.dtype == dtype and rel_error(out, want) < REL_ERROR[dtype]
    if with_bias:  # the bias matters in this case
        assert rel_error(paged_attention_ref(q, kc, vc, qsl, ctx, tables, scale), want) > 0.05
    q, kc, vc, qsl, ctx, tables, full_k, full_v = cache_case(CROSS_QUERY, CROSS_CTX, nh, nkv, hd, 4, dtype, 3)
    q, kc, vc, qsl, ctx, tables = _cpu(q, kc, vc, qsl, ctx, tables)
    out = paged_attention_ref(q, kc, vc, qsl, ctx, tables, scale, causal=False)
    assert rel_error(out, dense_paged(q, qsl, CROSS_CTX, full_k, full_v, scale, False)) < REL_ERROR[dtype]


def test_paged_attention_ref_bias_with_sliding_window():
    q, kc, vc, qsl, ctx, tables, full_k, full_v = cache_case(SELF_QUERY, SELF_CTX, 4, 2, 8, 4, torch.float32, 4)
    q, kc, vc, qsl, ctx, tables = _cpu(q, kc, vc, qsl, ctx, tables)
    bias = t5_bias(4, 6, 5).cpu()
    out = paged_attention_ref(q, kc, vc, qsl, ctx, tables, 0.5, sliding_window=5, position_bias=bias)
    want = dense_paged(q, qsl, SELF_CTX, full_k, full_v, 0.5, True, bias, window=5)
    assert rel_error(out, want) < REL_ERROR[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_varlen_attention_ref(dtype, causal, with_bias):
    lens = [7, 1, 12, 0, 5]
    q, k, v, qsl = _cpu(*varlen_case(lens, 4, 2, 8, dtype, 6))
    bias = t5_bias(4, 5, 7).cpu() if with_bias else None
    out = varlen_attention_ref(q, k, v, qsl, 0.6, causal=causal, position_bias=bias)
    assert out.dtype == dtype
    assert rel_error(out, dense_varlen(q, k, v, qsl, 0.6, causal, bias)) < REL_ERROR[dtype]


def test_reference_errors_name_the_problem():
    q, kc, vc, qsl, ctx, tables, *_ = _cpu(*cache_case([2, 1], [3, 5], 4, 2, 8, 4, torch.float32, 8)[:6])
    args = (q, kc, vc, qsl, ctx, tables, 1.0)
    with pytest.raises(ValueError, match="causal"):
        paged_attention_ref(*args, causal=False, position_bias=torch.zeros(4, 7))
    with pytest.raises(ValueError, match="causal"):
        paged_attention_ref(*args, causal=False, sliding_window=4)
    with pytest.raises(ValueError, match="float32"):
        paged_attention_ref(*args, position_bias=torch.zeros(4, 7, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="shape"):
        paged_attention_ref(*args, position_bias=torch.zeros(2, 7))
    with pytest.raises(ValueError, match="shape"):
        varlen_attention_ref(q, q[:, :2], q[:, :2], qsl, 1.0, position_bias=torch.zeros(4, 6))


# ---- Triton kernels --------------------------------------------------------------------------------------------

triton = pytest.importorskip("triton")

from llmapi._kernels.decode_attention import paged_decode_attention  # noqa: E402
from llmapi._kernels.kv_quant import dequantize_kv_ref, kv_scales_from_amax, quantize_kv_ref  # noqa: E402
from llmapi._kernels.prefill_attention import paged_packed_attention  # noqa: E402
from llmapi._kernels.varlen_attention import varlen_attention  # noqa: E402

interpreted = pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU these kernels run compiled: pytest -m gpu")
CACHE_DTYPES = [torch.int8, torch.float8_e4m3fn]


def _ref64(*tensors):
    """float64 copies of the float tensors (the oracle's inputs, on their device), the others as they are."""
    return [t.double() if t.is_floating_point() else t for t in tensors]


def check_paged(kernel, query_lens, ctx_lens, nh, nkv, hd, block, dtype, seed, causal=True, bias_m=0,
                num_splits=1, cache_dtype=None, oracle="dense"):
    """A kernel's output vs the dense attention of the same inputs (float64) and vs paged_attention_ref in
    float64; with `cache_dtype` over the int8 / fp8 codes of the cache (the oracle sees their values)."""
    q, kc, vc, qsl, ctx, tables, full_k, full_v = cache_case(query_lens, ctx_lens, nh, nkv, hd, block, dtype, seed)
    bias = t5_bias(nh, bias_m, seed + 1) if bias_m else None
    scale = hd**-0.5 if bias is None else 1.0  # T5 scales by 1
    kv_scale = None
    if cache_dtype is not None:
        kv_scale = kv_scales_from_amax(float(kc.abs().max()), float(vc.abs().max()), cache_dtype).to(DEVICE)
        kc, vc = quantize_kv_ref(kc, kv_scale[0], cache_dtype), quantize_kv_ref(vc, kv_scale[1], cache_dtype)
        k_deq = dequantize_kv_ref(kc, kv_scale[0], torch.float64)  # the values the codes stand for
        v_deq = dequantize_kv_ref(vc, kv_scale[1], torch.float64)
        full_k = [k_deq.cpu()[tables[r].cpu().long()].flatten(0, 1)[:c] for r, c in enumerate(ctx_lens)]
        full_v = [v_deq.cpu()[tables[r].cpu().long()].flatten(0, 1)[:c] for r, c in enumerate(ctx_lens)]
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    if kernel == "decode":
        paged_decode_attention(q, kc, vc, ctx, tables, scale, num_splits, out=out, kv_scale=kv_scale,
                               position_bias=bias)
    else:
        paged_packed_attention(q, kc, vc, qsl, ctx, tables, scale, out=out, kv_scale=kv_scale, causal=causal,
                               position_bias=bias)
    if oracle == "dense":
        want = dense_paged(q, qsl, ctx_lens, full_k, full_v, scale, causal, bias)
    else:  # large cases: the reference in float64
        cache = (k_deq, v_deq) if cache_dtype is not None else _ref64(kc, vc)
        want = paged_attention_ref(*_ref64(q), *cache, qsl, ctx, tables, scale, causal=causal,
                                   position_bias=bias).cpu()
    err = rel_error(out.cpu(), want)
    assert err < REL_ERROR[dtype], f"relative error {err:.2e}"


def check_varlen(lens, nh, nkv, hd, dtype, seed, causal, bias_m=0, fused=False, oracle="dense", **tiles):
    q, k, v, qsl = varlen_case(lens, nh, nkv, hd, dtype, seed)
    if fused:  # q, k, v as strided views of one [T, nh + 2 nkv, hd] projection, as in a model
        qkv = torch.cat([q, k, v], dim=1)
        q, k, v = qkv[:, :nh], qkv[:, nh:nh + nkv], qkv[:, nh + nkv:]
    bias = t5_bias(nh, bias_m, seed + 1) if bias_m else None
    scale = 1.0 if bias is not None else hd**-0.5
    out = torch.full_like(q, float("nan"))
    varlen_attention(q, k, v, qsl, max(lens), scale, causal=causal, position_bias=bias, out=out, **tiles)
    if oracle == "dense":
        want = dense_varlen(q, k, v, qsl, scale, causal, bias)
    else:
        want = varlen_attention_ref(*_ref64(q, k, v), qsl, scale, causal=causal, position_bias=bias).cpu()
    err = rel_error(out.cpu(), want)
    assert err < REL_ERROR[dtype], f"relative error {err:.2e}"


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_bias_interpreted(dtype):
    # GQA group 2; a context in one tile, several tiles, bias buckets clamped both ways (M = 6); 1 and 2 splits.
    for num_splits in (1, 2):
        check_paged("decode", [1, 1, 1, 1], [1, 5, 37, 80], nh=4, nkv=2, hd=16, block=4, dtype=dtype, seed=11,
                    bias_m=6, num_splits=num_splits)


@interpreted
def test_decode_attention_cross_interpreted():
    # Cross-attention decode is the plain kernel over the encoder lengths (a row with none gets 0).
    check_paged("decode", [1, 1, 1], [13, 0, 70], nh=4, nkv=2, hd=16, block=4, dtype=torch.float32, seed=12,
                causal=False, num_splits=2)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias_m", [0, 5])
def test_packed_attention_causal_bias_interpreted(dtype, bias_m):
    # A whole prompt, chunks, decodes (one at position 0) in one launch; bias_m 0: the unchanged causal kernel.
    check_packed_case = dict(nh=4, nkv=2, hd=16, block=4, dtype=dtype, seed=13, bias_m=bias_m)
    check_paged("packed", SELF_QUERY, SELF_CTX, **check_packed_case)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_attention_cross_interpreted(dtype):
    # Decoder queries longer than the encoder input, decodes, a row with no encoder keys; and MHA with group 3.
    check_paged("packed", CROSS_QUERY, CROSS_CTX, nh=4, nkv=2, hd=16, block=4, dtype=dtype, seed=14, causal=False)
    check_paged("packed", [20, 1, 3], [7, 40, 11], nh=6, nkv=2, hd=8, block=4, dtype=torch.float32, seed=15,
                causal=False)


@interpreted
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_quantized_cache_bias_and_cross_interpreted(cache_dtype):
    kw = dict(nh=4, nkv=2, hd=16, block=4, dtype=torch.float32, cache_dtype=cache_dtype)
    check_paged("decode", [1, 1, 1], [3, 37, 70], seed=16, bias_m=4, num_splits=2, **kw)
    check_paged("packed", SELF_QUERY, SELF_CTX, seed=17, bias_m=4, **kw)
    check_paged("packed", CROSS_QUERY, CROSS_CTX, seed=18, causal=False, **kw)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias_m", [0, 6])
def test_varlen_attention_interpreted(dtype, causal, bias_m):
    # GQA group 2; rows of one token, none, within a tile, over several tiles with a partial last one.
    check_varlen([23, 1, 0, 70, 9], nh=4, nkv=2, hd=16, dtype=dtype, seed=19, causal=causal, bias_m=bias_m,
                 block_m=16, block_n=16)


@interpreted
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_fused_mha_default_tiles_interpreted(causal):
    # Strided views of one QKV tensor, MHA, head_dim 24 (masked lanes), the default 64 x 32 tiles.
    check_varlen([70, 33], nh=3, nkv=3, hd=24, dtype=torch.float32, seed=20, causal=causal, bias_m=8, fused=True)
    check_varlen([5, 40], nh=6, nkv=2, hd=8, dtype=torch.float32, seed=21, causal=causal)  # group 3


@interpreted
def test_kernel_errors_name_the_problem():
    q, kc, vc, qsl, ctx, tables, *_ = cache_case([2, 1], [3, 5], 4, 2, 8, 4, torch.float32, 22)
    with pytest.raises(ValueError, match="causal"):
        paged_packed_attention(q, kc, vc, qsl, ctx, tables, 1.0, causal=False, position_bias=torch.zeros(4, 7))
    with pytest.raises(ValueError, match="causal"):
        paged_packed_attention(q, kc, vc, qsl, ctx, tables, 1.0, causal=False, sliding_window=2)
    with pytest.raises(ValueError, match="shape"):
        paged_decode_attention(q[:2], kc, vc, ctx, tables, 1.0, 1, position_bias=torch.zeros(4, 8))
    with pytest.raises(ValueError, match="float32"):
        paged_decode_attention(q[:2], kc, vc, ctx, tables, 1.0, 1, position_bias=torch.zeros(4, 7).half())
    q, k, v, qsl = varlen_case([3, 4], 4, 2, 8, torch.float32, 23)
    with pytest.raises(ValueError, match="nkv"):
        varlen_attention(q, k[:, :1].expand(-1, 3, -1), v, qsl, 4, 1.0)
    with pytest.raises(ValueError, match="max_len"):
        varlen_attention(q, k, v, qsl, 4.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        varlen_attention(q, k, v, qsl, 4, 1.0, causal=False, position_bias=torch.zeros(2, 7))


# ---- GPU, at T5 / BART encoder-decoder sizes --------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias_m", [0, 128])
def test_varlen_attention_gpu(causal, bias_m):
    # The encoder of a 512-token batch: 256 rows x 512 tokens, 16 heads of 64; T5's bias table (M = 128).
    check_varlen([512] * 256, nh=16, nkv=16, hd=64, dtype=torch.bfloat16, seed=30, causal=causal, bias_m=bias_m,
                 oracle="ref")
    g = torch.Generator().manual_seed(31)
    lens = torch.randint(1, 513, (64,), generator=g).tolist() + [1, 64, 65, 512]
    check_varlen(lens, nh=16, nkv=4, hd=64, dtype=torch.bfloat16, seed=32, causal=causal, bias_m=bias_m,
                 oracle="ref")
    check_varlen(lens, nh=8, nkv=8, hd=64, dtype=torch.float32, seed=33, causal=causal, bias_m=bias_m, fused=True,
                 oracle="ref")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_attention_bias_gpu(dtype):
    g = torch.Generator().manual_seed(34)
    ctx_lens = torch.randint(1, 600, (60,), generator=g).tolist() + [1, 127, 128, 129]
    for num_splits in (1, 4):
        check_paged("decode", [1] * len(ctx_lens), ctx_lens, nh=16, nkv=16, hd=64, block=16, dtype=dtype, seed=35,
                    bias_m=128, num_splits=num_splits, oracle="ref")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_attention_bias_and_cross_gpu(dtype, causal):
    g = torch.Generator().manual_seed(36)
    query_lens = [300, 1, 17, 1, 129, 64, 1, 2]
    if causal:  # the decoder's self-attention with T5's bias: chunks after earlier ones, decodes
        ctx_lens = [n + int(torch.randint(0, 400, (1,), generator=g)) for n in query_lens]
    else:  # cross-attention: any encoder length, shorter or longer than the decoder's query
        ctx_lens = [int(n) for n in torch.randint(1, 513, (len(query_lens),), generator=g)]
    check_paged("packed", query_lens, ctx_lens, nh=16, nkv=16, hd=64, block=16, dtype=dtype, seed=37,
                causal=causal, bias_m=128 if causal else 0, oracle="ref")


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_quantized_cache_bias_and_cross_gpu(cache_dtype):
    g = torch.Generator().manual_seed(38)
    ctx_lens = torch.randint(1, 600, (32,), generator=g).tolist()
    kw = dict(nh=16, nkv=16, hd=64, block=16, dtype=torch.bfloat16, cache_dtype=cache_dtype, oracle="ref")
    check_paged("decode", [1] * 32, ctx_lens, seed=39, bias_m=128, num_splits=4, **kw)
    check_paged("packed", [100, 1, 7, 1] * 8, [c + 100 for c in ctx_lens], seed=40, bias_m=128, **kw)
    check_paged("packed", [100, 1, 7, 1] * 8, ctx_lens, seed=41, causal=False, **kw)
