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
