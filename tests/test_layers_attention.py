"""Paged attention reference and KV writes vs naive dense causal attention (GQA, scattered blocks, mixed chunks)."""

import math

import pytest
import torch

from llmapi._kernels.paged_attention import paged_attention_ref, varlen_causal_attention_ref, write_kv_ref
from llmapi.layers.attention import Attention, AttentionMetadata


def dense_causal_attention(q, k, v, scale):
    """q [L, nh, hd] at the last L positions of k, v [S, nkv, hd]; plain softmax(q k^T) v with repeated kv heads."""
    seq_q, nh, _ = q.shape
    seq_k, nkv, _ = k.shape
    k = k.repeat_interleave(nh // nkv, dim=1)  # [S, nh, hd]
    v = v.repeat_interleave(nh // nkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale  # [nh, L, S]
    q_pos = torch.arange(seq_k - seq_q, seq_k)[:, None]
    scores = scores.masked_fill(torch.arange(seq_k)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).to(q.dtype)  # [L, nh, hd]


def make_case(query_lens, context_lens, nh=8, nkv=2, hd=16, block=4, num_blocks=64, seed=0):
    """Random full K/V per request, written into a cache at shuffled block ids; queries for each new chunk."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    k_cache = torch.zeros(num_blocks, block, nkv, hd)
    v_cache = torch.zeros(num_blocks, block, nkv, hd)
    width = max(math.ceil(c / block) for c in context_lens) + 2
    tables, full_k, full_v, new_k, new_v = [], [], [], [], []
    for q_len, ctx in zip(query_lens, context_lens):
        ids = [perm.pop() for _ in range(math.ceil(ctx / block))]
        tables.append(ids + [0] * (width - len(ids)))
        k = torch.randn(ctx, nkv, hd, generator=g)
        v = torch.randn(ctx, nkv, hd, generator=g)
        full_k.append(k)
        full_v.append(v)
        # Earlier tokens are already cached; this step's come through write_kv_ref.
        past = ctx - q_len
        slots = torch.tensor([ids[p // block] * block + p % block for p in range(past)], dtype=torch.long)
        k_cache.view(-1, nkv, hd)[slots] = k[:past]
        v_cache.view(-1, nkv, hd)[slots] = v[:past]
        new_k.append(k[past:])
        new_v.append(v[past:])
    attn = AttentionMetadata.build(query_lens, context_lens, tables, block)
    q = torch.randn(sum(query_lens), nh, hd, generator=g)
    return q, torch.cat(new_k), torch.cat(new_v), k_cache, v_cache, attn, full_k, full_v


@pytest.mark.parametrize("nh,nkv", [(8, 2), (4, 4), (6, 1)])
def test_paged_attention_matches_dense(nh, nkv):
    # Mixed batch: a whole prompt, a middle prefill chunk, decodes (one at a block boundary), a chunk ending mid-block.
    query_lens = [9, 5, 1, 1, 3, 1]
    context_lens = [9, 14, 7, 8, 11, 1]
    q, k, v, k_cache, v_cache, attn, full_k, full_v = make_case(query_lens, context_lens, nh=nh, nkv=nkv)
    write_kv_ref(k, v, k_cache, v_cache, attn.slot_mapping)
    scale = 16**-0.5
    out = paged_attention_ref(q, k_cache, v_cache, attn.query_start_loc, attn.context_lens, attn.block_tables, scale)
    assert out.shape == q.shape
    for r, (start, end) in enumerate(zip(attn.query_start_loc[:-1].tolist(), attn.query_start_loc[1:].tolist())):
        expected = dense_causal_attention(q[start:end], full_k[r], full_v[r], scale)
        torch.testing.assert_close(out[start:end], expected, atol=1e-5, rtol=1e-5)


def test_attention_module_writes_cache_then_attends():
    query_lens, context_lens = [4, 1, 6], [10, 5, 6]
    q, k, v, k_cache, v_cache, attn, full_k, full_v = make_case(query_lens, context_lens)
    kv_cache = torch.stack([k_cache, v_cache])  # [2, num_blocks, block, nkv, hd]
    out = Attention(scale=0.25)(q, k, v, kv_cache, attn)
    for r, (start, end) in enumerate(zip(attn.query_start_loc[:-1].tolist(), attn.query_start_loc[1:].tolist())):
        torch.testing.assert_close(out[start:end], dense_causal_attention(q[start:end], full_k[r], full_v[r], 0.25),
                                   atol=1e-5, rtol=1e-5)
    # The new keys landed in the layer's cache tensor itself.
    slot = int(attn.slot_mapping[0])
    torch.testing.assert_close(kv_cache[0].view(-1, *k.shape[1:])[slot], k[0])


def test_varlen_attention_without_cache_equals_dense():
    query_lens = [7, 1, 12]
    q, k, v, *_, full_k, full_v = make_case(query_lens, query_lens)
    query_start_loc = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    out = varlen_causal_attention_ref(q, k, v, query_start_loc, 0.3)
    start = 0
    for r, n in enumerate(query_lens):
        torch.testing.assert_close(out[start:start + n], dense_causal_attention(q[start:start + n], full_k[r],
                                                                                full_v[r], 0.3), atol=1e-5, rtol=1e-5)
        start += n


def test_write_kv_skips_negative_slots_and_casts():
    k_cache = torch.zeros(4, 2, 1, 3, dtype=torch.bfloat16)
    v_cache = torch.zeros(4, 2, 1, 3, dtype=torch.bfloat16)
    k = torch.arange(9.0).view(3, 1, 3)
    write_kv_ref(k, -k, k_cache, v_cache, torch.tensor([5, -1, 0]))
    assert k_cache.view(8, 1, 3)[5].tolist() == [[0.0, 1.0, 2.0]]
    assert k_cache.view(8, 1, 3)[0].tolist() == [[6.0, 7.0, 8.0]]
    assert v_cache.view(8, 1, 3)[0].tolist() == [[-6.0, -7.0, -8.0]]
    assert int((k_cache != 0).sum()) == 5  # the padding token (slot -1) wrote nothing; 0.0 is its one zero


def test_metadata_build_slot_mapping():
    attn = AttentionMetadata.build([3, 1], [5, 2], [[7, 2, 0], [4, 0, 0]], tokens_per_block=4)
    # Request 0 writes positions 2,3 (block 7) and 4 (block 2); request 1 writes position 1 of block 4.
    assert attn.slot_mapping.tolist() == [30, 31, 8, 17]
    assert attn.query_start_loc.tolist() == [0, 3, 4]
    assert (attn.max_query_len, attn.max_context_len, attn.tokens_per_block) == (3, 5, 4)
    assert attn.slot_mapping.dtype == torch.int64 and attn.block_tables.dtype == torch.int32
