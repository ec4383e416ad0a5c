"""Triton paged attention kernels (decode split-K, packed prefill, KV write) vs the plain-torch references."""

import pytest
import torch
from kernel_cases import DEVICE, REL_ERROR, paged_case, rel_error

from llmapi._kernels.paged_attention import paged_attention_ref, write_kv_ref

triton = pytest.importorskip("triton")

from llmapi._kernels.decode_attention import (  # noqa: E402
    default_min_split_keys, default_tiling, num_splits_for, paged_decode_attention)
from llmapi._kernels.kv_write import write_kv  # noqa: E402
from llmapi._kernels.prefill_attention import (  # noqa: E402
    LONG_QUERY, LONG_TILING, packed_tiling, paged_packed_attention)

interpreted = pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU these kernels run compiled: pytest -m gpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _reference(q, k_cache, v_cache, qsl, ctx, tables, scale):
    """paged_attention_ref in float64 on the CPU: the oracle for every dtype."""
    return paged_attention_ref(q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(), qsl.cpu(),
                               ctx.cpu(), tables.cpu(), scale)


def check_decode(ctx_lens, nh, nkv, hd, block, dtype, num_splits, seed, **kw):
    q, kc, vc, qsl, ctx, tables = paged_case([1] * len(ctx_lens), ctx_lens, nh, nkv, hd, block, dtype, seed)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    paged_decode_attention(q, kc, vc, ctx, tables, hd**-0.5, num_splits, out=out, **kw)
    err = rel_error(out.cpu(), _reference(q, kc, vc, qsl, ctx, tables, hd**-0.5))
    assert err < REL_ERROR[dtype], f"relative error {err:.2e}"


def check_packed(query_lens, ctx_lens, nh, nkv, hd, block, dtype, seed, **tiling):
    q, kc, vc, qsl, ctx, tables = paged_case(query_lens, ctx_lens, nh, nkv, hd, block, dtype, seed)
    out = torch.full_like(q, float("nan"))
    paged_packed_attention(q, kc, vc, qsl, ctx, tables, hd**-0.5, out=out, **tiling)
    err = rel_error(out.cpu(), _reference(q, kc, vc, qsl, ctx, tables, hd**-0.5))
    assert err < REL_ERROR[dtype], f"relative error {err:.2e}"


def check_write_kv(num_tokens, nkv, hd, block, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    num_blocks = num_tokens // block + 4
    slots = torch.randperm(num_blocks * block, generator=g)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=g)[: num_tokens // 4]] = -1  # padding tokens: skipped
    qkv = torch.randn(num_tokens, 3 * nkv, hd, generator=g).to(dtype)  # k, v as strided views, as in a model
    cache = torch.randn(2, num_blocks, block, nkv, hd, generator=g).to(dtype)
    expected = cache.clone()
    write_kv_ref(qkv[:, nkv:2 * nkv], qkv[:, 2 * nkv:], expected[0], expected[1], slots)
    qkv, cache = qkv.to(DEVICE), cache.to(DEVICE)
    write_kv(qkv[:, nkv:2 * nkv], qkv[:, 2 * nkv:], cache[0], cache[1], slots.to(DEVICE))
    assert torch.equal(cache.cpu(), expected)  # a copy: exact


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_interpreted(dtype):
    # GQA group 2, a context inside one tile, one over several tiles and blocks; two splits (one may be empty),
    # and one split (the kernel writes the output itself, no merge).
    for num_splits in (2, 1):
        check_decode([1, 37, 130], nh=4, nkv=2, hd=16, block=4, dtype=dtype, num_splits=num_splits, seed=1)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_interpreted_min_split_keys(dtype):
    # Each row splits its own context in 8 parts of 3 tiles (24 keys) at least: 130 keys in 6 parts (the last
    # short), 37 in 2, 1 in 1; the empty splits store no part and the merge reads none.
    check_decode([130, 37, 1, 9, 64], nh=4, nkv=2, hd=16, block=4, dtype=dtype, num_splits=8, seed=2, block_n=8,
                 min_split_keys=24)
    q, kc, vc, qsl, ctx, tables = paged_case([1], [5], 2, 1, 16, 4, torch.float32, 0)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match=f"min_split_keys={bad!r} is invalid: must be an int >= 1"):
            paged_decode_attention(q, kc, vc, ctx, tables, 1.0, 2, min_split_keys=bad)


def test_decode_splits_and_tiling_defaults():
    # Splits: ceil(4 x 132 SMs / (requests x kv heads)), 16 x 132 over a quantized cache from 8,192 keys, and
    # there from 4,096 keys one a 1,024 at least; never more than 32 or than two 64-key tiles a split.
    assert num_splits_for(48, 8, 22001) == 2  # ceil(528 / 384)
    assert num_splits_for(48, 8, 22001, quantized=True) == 22  # ceil(22001 / 1024) > ceil(2112 / 384)
    assert num_splits_for(48, 8, 8191, quantized=True) == 8  # ceil(8191 / 1024)
    assert num_splits_for(1, 8, 8192, quantized=True) == num_splits_for(1, 8, 8192) == 32
    assert num_splits_for(4, 8, 300, quantized=True) == 3  # ceil(300 / 128)
    assert num_splits_for(400, 8, 4096, quantized=True) == 4
    assert num_splits_for(400, 8, 4096) == num_splits_for(955, 8, 2000, quantized=True) == 1
    assert num_splits_for(1, 8, 100_000, quantized=True) == 32
    # ... up to 16,384 programs: a large batch under a CUDA graph's bound of 131,072 keys stays near one split.
    assert num_splits_for(512, 8, 4224, quantized=True) == 4  # 16,384 programs (5 by the keys)
    assert num_splits_for(1024, 8, 131072, quantized=True) == 2
    assert num_splits_for(2048, 8, 131072, quantized=True) == 1
    # A quantized cache from 4,096 keys with 128 (request, kv head) pairs or more: parts of 256 keys at least.
    assert default_min_split_keys(16, 8, 4096, True) == 256
    assert default_min_split_keys(15, 8, 22001, True) == default_min_split_keys(16, 8, 4095, True) == 1
    assert default_min_split_keys(400, 8, 4096, False) == default_min_split_keys(400, 8, None, True) == 1
    # Tiling: (64, 4, 3) for a float cache; (32, 1, 2) for a quantized one, one stage above 4,096 programs, or
    # above 1,024 when each split reads 1,024 keys or more.
    assert default_tiling(8192, 1, 256, False) == (64, 4, 3)
    assert default_tiling(8192, 1, 256, True) == (32, 1, 1)
    assert default_tiling(4096, 1, 256, True) == (32, 1, 2)
    assert default_tiling(4096, 1, None, True) == (32, 1, 2)
    assert default_tiling(3200, 1, 4096, True) == (32, 1, 1)
    assert default_tiling(2304, 6, 22001, True) == (32, 1, 1)
    assert default_tiling(768, 2, 22001, True) == (32, 1, 2)  # few programs: pipelined
    assert default_tiling(2048, 4, 4000, True) == (32, 1, 2)  # splits of 1,000 keys


@interpreted
def test_decode_attention_interpreted_odd_head_dim_mha():
    check_decode([5, 70], nh=3, nkv=3, hd=24, block=8, dtype=torch.float32, num_splits=3, seed=2)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_attention_interpreted(dtype):
    # A whole prompt, a later chunk ending mid-block, decodes: one launch.
    check_packed([9, 5, 1, 1], [9, 14, 7, 33], nh=4, nkv=2, hd=16, block=4, dtype=dtype, seed=3)


@interpreted
@pytest.mark.parametrize("dtype,tiling", [(torch.float32, dict(block_m=8, block_n=4)),
                                          (torch.float32, dict(block_m=16, block_n=8)),
                                          (torch.bfloat16, dict(max_query_len=LONG_QUERY))])
def test_packed_attention_interpreted_unmasked_tiles(dtype, tiling):
    # Small tiles over long queries and contexts: most key tiles lie wholly before their query block (the loop
    # without masks), the rest on the diagonal; a prompt from 0, chunks after context (one starting mid-tile),
    # a decode past many tiles. And the tiling a bfloat16 step with a long query takes (LONG_TILING).
    assert packed_tiling(LONG_QUERY, False, torch.bfloat16) == LONG_TILING
    assert packed_tiling(LONG_QUERY, False, torch.float32) == packed_tiling(None, False, torch.bfloat16)
    check_packed([45, 19, 1, 30], [45, 61, 53, 101], nh=4, nkv=2, hd=16, block=4, dtype=dtype, seed=5, **tiling)


@interpreted
def test_packed_attention_interpreted_group3():
    check_packed([20, 1, 3], [20, 6, 11], nh=6, nkv=2, hd=8, block=4, dtype=torch.float32, seed=4)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_interpreted(dtype):
    check_write_kv(12, nkv=2, hd=8, block=4, dtype=dtype, seed=5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nh,nkv,hd", [(32, 8, 128), (9, 3, 64), (16, 16, 96)])
def test_decode_attention_gpu(dtype, nh, nkv, hd):
    g = torch.Generator().manual_seed(hd)
    ctx_lens = torch.randint(1, 3000, (24,), generator=g).tolist() + [1, 32, 33, 64, 65]
    for num_splits in (1, 4, 13):
        check_decode(ctx_lens, nh, nkv, hd, block=32, dtype=dtype, num_splits=num_splits, seed=num_splits)


@pytest.mark.gpu
def test_decode_split_counts_share_one_compiled_kernel():
    # A mixed step's decodes take a split count from their number (1 to hundreds of rows): each count must not
    # compile a kernel of its own. One kernel serves every count above 1 (and one merge kernel).
    from llmapi._kernels.decode_attention import _decode_split_kernel, _merge_splits_kernel

    def compiled(fn):
        return len(fn.device_caches[torch.cuda.current_device()][0])

    ctx_lens = [700, 5, 1200, 64]
    check_decode(ctx_lens, 32, 8, 128, block=32, dtype=torch.bfloat16, num_splits=2, seed=0)
    before = compiled(_decode_split_kernel), compiled(_merge_splits_kernel)
    for num_splits in (3, 5, 7, 11, 16, 17, 32):
        check_decode(ctx_lens, 32, 8, 128, block=32, dtype=torch.bfloat16, num_splits=num_splits, seed=num_splits)
    assert (compiled(_decode_split_kernel), compiled(_merge_splits_kernel)) == before


def test_decode_split_count_is_checked():
    q, kc, vc, qsl, ctx, tables = paged_case([1], [5], 2, 1, 16, 4, torch.float32, 0)
    for bad in (0, 33, 2.0, True):
        with pytest.raises(ValueError, match=f"num_splits={bad!r} is invalid: must be an int in \\[1, 32\\]"):
            paged_decode_attention(q, kc, vc, ctx, tables, 1.0, bad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nh,nkv,hd", [(32, 8, 128), (9, 3, 64), (16, 16, 96)])
def test_packed_attention_gpu(dtype, nh, nkv, hd):
    g = torch.Generator().manual_seed(hd + 1)
    query_lens = [1000, 1, 17, 1, 300, 64, 1, 129]
    ctx_lens = [q + int(torch.randint(0, 900, (1,), generator=g)) for q in query_lens]
    check_packed(query_lens, ctx_lens, nh, nkv, hd, block=32, dtype=dtype, seed=hd)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,block_m,block_n,num_warps,num_stages", [
    (torch.float32, 64, 32, 4, 2), (torch.bfloat16, 64, 32, 4, 1), (torch.float32, 128, 64, 4, 3),
    (torch.bfloat16, 128, 64, 8, 2), (torch.bfloat16, *LONG_TILING)])
def test_packed_attention_tilings_gpu(dtype, block_m, block_n, num_warps, num_stages):
    # Long prompts and chunks after long contexts (most key tiles unmasked) at tilings the kernel may pick (float32
    # keeps the short one: LONG_TILING's float32 tiles do not fit an H100's shared memory).
    query_lens = [1024, 1, 700, 1500, 5]
    ctx_lens = [1024, 2500, 1800, 2600, 5]
    check_packed(query_lens, ctx_lens, 32, 8, 128, block=32, dtype=dtype, seed=block_m + block_n, block_m=block_m,
                 block_n=block_n, num_warps=num_warps, num_stages=num_stages)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_gpu(dtype):
    check_write_kv(3000, nkv=8, hd=128, block=32, dtype=dtype, seed=6)


def check_mixed_step_splits_decodes(dtype, num_decodes):
    """A step whose leading requests decode and the rest prefill: with num_decodes set, those go through the
    decode kernel and the rest through the packed one; the output equals dense attention either way."""
    import dataclasses

    import llmapi.layers.dispatch as dispatch
    from test_layers_attention import dense_causal_attention, make_case

    from llmapi.layers.attention import Attention

    query_lens, context_lens = [1, 1, 1, 6, 1, 9], [7, 40, 1, 11, 3, 9]
    q, k, v, k_cache, v_cache, attn, full_k, full_v = make_case(query_lens, context_lens, nh=8, nkv=2, hd=16)
    kv_cache = torch.stack([k_cache, v_cache]).to(DEVICE, dtype)
    meta = dataclasses.replace(attn, **{f.name: getattr(attn, f.name).to(DEVICE) for f in dataclasses.fields(attn)
                                        if isinstance(getattr(attn, f.name), torch.Tensor)}, num_decodes=num_decodes)
    old, dispatch.TRITON_ON_CPU = dispatch.TRITON_ON_CPU, True
    try:
        out = Attention(scale=0.25)(q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype), kv_cache, meta)
    finally:
        dispatch.TRITON_ON_CPU = old
    for r, (start, end) in enumerate(zip(attn.query_start_loc[:-1].tolist(), attn.query_start_loc[1:].tolist())):
        want = dense_causal_attention(q[start:end].to(dtype).float(), full_k[r].to(dtype).float(),
                                      full_v[r].to(dtype).float(), 0.25)
        assert rel_error(out[start:end].float().cpu(), want) < REL_ERROR[dtype], r


@interpreted
@pytest.mark.parametrize("num_decodes", [0, 3])
def test_mixed_step_decodes_through_decode_kernel_interpreted(num_decodes):
    check_mixed_step_splits_decodes(torch.float32, num_decodes)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_decodes", [0, 3])
def test_mixed_step_decodes_through_decode_kernel_gpu(dtype, num_decodes):
    check_mixed_step_splits_decodes(dtype, num_decodes)
