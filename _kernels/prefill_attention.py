"""Triton packed attention over the paged KV cache, flash-style: prefill chunks and decodes in one launch."""

# Reference: paged_attention_ref. A program takes BLOCK_Q query tokens of one request and one kv head;
# its tile rows are (token, query head of the kv head's group) pairs, so K/V tiles are read once per
# kv head (GQA). Programs find their request by binary search over query_start_loc, so the grid is
# sized from the token and request counts alone, with no host sync. An int8 / fp8 cache is read as in
# decode_attention: codes into the dots, the K scale in the softmax scale, the V scale on the output. With a
# sliding window (WINDOW > 0) a program's key loop starts at the tile of the first key its first query sees,
# and keys before that are masked out of the loads (never read); each row masks its own window. Without CAUSAL
# (cross-attention) every query reads all its request's keys; with HAS_BIAS each score gets T5's relative
# position bias, as in decode_attention.

import torch
import triton
import triton.language as tl
from triton import knobs

from .common import dot_args
from .decode_attention import _output, attention_out, bias_args, position_bias_log2, window_arg
from .kv_write import KV_QUANT, kv_quant_args, load_kv_scales, round_to_e4m3
from .paged_attention import check_attention_mode

BLOCK_M = 64  # tile rows: BLOCK_Q tokens x GROUP_P heads
BLOCK_N = 32  # keys per tile
LONG_QUERY = 256
"""A step whose longest query has at least this many tokens (a long prompt's prefill) takes LONG_TILING."""
LONG_TILING = (128, 128, 8, 2)
"""(block_m, block_n, num_warps, num_stages) for long queries of 2-byte dtypes: 128 (token, head) rows by 128 keys
over 8 warps, double-buffered. H100, bfloat16 queries over an fp8 cache at Llama-3.1-8B's heads (`python -m
llmapi.bench_kernels --prefill --kv-dtype fp8`): 4 x 2048-token prompts 708 -> 578 us, a 5000-token prompt with a
3192-token chunk 1434 -> 1069 us, an 8192-token chunk after 8192 tokens 7452 -> 5358 us (221 -> 308 TFLOP/s), against
the 64 x 32 tiles, which stay the faster for 64 x 128-token prompts (99 us against 155). float32 tiles of that size
need 262,144 bytes of shared memory where an H100 has 232,448: float32 keeps the short tiling."""
P_SCALE = tl.constexpr(256.0)
"""FP8 attention: the softmax weights (at most 1) enter P.V as E4M3 codes of p * P_SCALE, which keeps weights down to
2**-17 (E4M3's smallest subnormal is 2**-9); the row sums carry the same factor, so it cancels."""


@triton.jit
def _e4m3(x, FP8_ATTN: tl.constexpr):
    """float32 x (|x| <= 448) as an FP8 attention dot operand: its E4M3 codes on a GPU (the cast rounds to nearest
    even); in Triton's interpreter (FP8_ATTN 2) the same values, rounded by round_to_e4m3, as float32."""
    if FP8_ATTN == 1:
        y = x.to(tl.float8e4nv)
    else:
        y = round_to_e4m3(x)
    return y


@triton.jit
def _codes(x, FP8_ATTN: tl.constexpr):
    """E4M3 codes of the cache as a dot operand: themselves on a GPU, their float32 values when interpreted."""
    if FP8_ATTN == 1:
        y = x
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _find_request(query_start_loc_ptr, num_requests, q_block, BLOCK_Q: tl.constexpr):
    """Largest r with query_start_loc[r] // BLOCK_Q + r <= q_block: request r's q blocks start there."""
    left: tl.int32 = 0
    right = num_requests
    while left < right:
        mid = (left + right) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if start <= q_block:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _tile(q, m, l, acc, start, kv_end, lo, q_pos, row_ok, head, kv_col, d, d_ok, bt_row, k_cache_ptr, v_cache_ptr,
          cache_stride_block, bias_ptr, bias_m1, qk_scale, NKV: tl.constexpr, HD: tl.constexpr, PAGE: tl.constexpr,
          BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, WINDOW: tl.constexpr,
          CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, MASKED: tl.constexpr, FP8_ATTN: tl.constexpr):
    """One online-softmax step over the BLOCK_N keys from `start`: (m, l, acc) updated. Without MASKED every
    key of the tile exists and every row sees it: no length, causal or window masks. With FP8_ATTN, `q` holds
    E4M3 codes and `qk_scale` is per row ([BLOCK_M]: each row's query scale in it); P.V takes the weights as
    E4M3 codes of p * P_SCALE."""
    pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    if MASKED:
        key_ok = pos < kv_end
        if WINDOW > 0:
            key_ok = key_ok & (pos >= lo)
        block = tl.load(bt_row + pos // PAGE, mask=key_ok, other=0).to(tl.int64)
        kv_mask = key_ok[:, None] & d_ok[None, :]
    else:
        block = tl.load(bt_row + pos // PAGE).to(tl.int64)
        kv_mask = d_ok[None, :]
    kv_row = block * cache_stride_block + (pos % PAGE) * (NKV * HD) + kv_col
    k = tl.load(k_cache_ptr + kv_row[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + kv_row[:, None] + d[None, :], mask=kv_mask, other=0.0)
    if FP8_ATTN:
        s = tl.dot(q, tl.trans(_codes(k, FP8_ATTN)), input_precision="ieee") * qk_scale[:, None]
    else:
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        if MASKED:
            bias_mask = row_ok[:, None] & key_ok[None, :]
        else:
            bias_mask = row_ok[:, None] & (pos >= 0)[None, :]
        s += position_bias_log2(bias_ptr, bias_m1, head, pos, q_pos, bias_mask)
    if MASKED:
        if CAUSAL:
            seen = key_ok[None, :] & (pos[None, :] <= q_pos[:, None])  # [BLOCK_M, BLOCK_N]
        else:
            seen = key_ok[None, :]  # [1, BLOCK_N]
        if WINDOW > 0:
            seen = seen & (pos[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    shift = m_new
    if WINDOW > 0:  # a later row's window may start past this tile: no key yet, weights 0 (not NaN)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - shift[:, None])
    alpha = tl.exp2(m - shift)
    if FP8_ATTN:
        l = l * alpha + tl.sum(p, axis=1) * P_SCALE
        acc = acc * alpha[:, None] + tl.dot(_e4m3(p * P_SCALE, FP8_ATTN), _codes(v, FP8_ATTN), input_precision="ieee")
    else:
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
    return m_new, l, acc


# The request count and block-table width change from step to step: not specialized on (a kernel
# compiled for each value class would stall serving for a second at a new batch shape).
@triton.jit(do_not_specialize=["num_requests", "bt_stride"])
def _packed_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, query_start_loc_ptr, context_lens_ptr,
                             block_tables_ptr, scale_ptr, qs_ptr, bias_ptr, num_requests, q_stride_t, q_stride_h,
                             out_stride_t, out_stride_h, bt_stride, cache_stride_block, bias_m1, scale_log2,
                             NKV: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                             HD: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
                             BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, KV_QUANT: tl.constexpr,
                             QUANT_OUT: tl.constexpr, WINDOW: tl.constexpr, CAUSAL: tl.constexpr,
                             HAS_BIAS: tl.constexpr, FP8_ATTN: tl.constexpr):
    # Last q blocks first: with causal attention a request's later blocks read the most keys, and starting them
    # first leaves the short ones to fill the last wave.
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    r = _find_request(query_start_loc_ptr, num_requests, q_block, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + r)
    q_len = tl.load(query_start_loc_ptr + r + 1) - q_start
    local = q_block - (q_start // BLOCK_Q + r)
    if local * BLOCK_Q < q_len:
        ctx = tl.load(context_lens_ptr + r)
        first_pos = ctx - q_len  # absolute position of the request's first query token
        m_idx = tl.arange(0, BLOCK_M)
        tok = local * BLOCK_Q + m_idx // GROUP_P  # [BLOCK_M] token index within the request
        g = m_idx % GROUP_P
        row_ok = (tok < q_len) & (g < GROUP)
        head = kvh * GROUP + g
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HD
        t_row = (q_start + tok).to(tl.int64)
        q = tl.load(q_ptr + t_row[:, None] * q_stride_t + head[:, None] * q_stride_h + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        k_scale, v_scale = load_kv_scales(scale_ptr, KV_QUANT)
        if FP8_ATTN:  # each row's E4M3 codes at its own scale (amax / 448), which joins the softmax scale
            qf = q.to(tl.float32)
            amax = tl.max(tl.abs(qf), axis=1)
            q_scale = tl.where(amax > 0, amax / 448.0, 1.0)
            q = _e4m3(tl.clamp(qf / q_scale[:, None], -448.0, 448.0), FP8_ATTN)
            qk_scale = scale_log2 * k_scale * q_scale  # [BLOCK_M]
        else:
            q = q.to(DOT_DTYPE)
            qk_scale = scale_log2 * k_scale
        q_pos = first_pos + tok  # [BLOCK_M]
        if CAUSAL:
            kv_end = first_pos + tl.minimum(q_len, (local + 1) * BLOCK_Q)  # keys past the block's last query: unused
        else:
            kv_end = ctx
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        bt_row = block_tables_ptr + r * bt_stride
        kv_col = kvh * HD
        lo = 0
        if WINDOW > 0:  # the block's first query (position first_pos + local * BLOCK_Q) sees keys >= lo
            lo = tl.maximum(first_pos + local * BLOCK_Q - WINDOW + 1, 0)
        kv_begin = lo // BLOCK_N * BLOCK_N
        # Tiles every valid row sees whole (before the block's first query when causal; all but a partial last
        # tile when not) run without the key masks; the rest (the diagonal, a window's edge) with them.
        if WINDOW > 0:
            full_end = kv_begin
        elif CAUSAL:
            full_end = (first_pos + local * BLOCK_Q + 1) // BLOCK_N * BLOCK_N
        else:
            full_end = kv_end // BLOCK_N * BLOCK_N
        for start in range(kv_begin, full_end, BLOCK_N):
            m, l, acc = _tile(q, m, l, acc, start, kv_end, lo, q_pos, row_ok, head, kv_col, d, d_ok, bt_row,
                              k_cache_ptr, v_cache_ptr, cache_stride_block, bias_ptr, bias_m1, qk_scale, NKV, HD,
                              PAGE, BLOCK_N, DOT_DTYPE, PRECISION, WINDOW, CAUSAL, HAS_BIAS, False, FP8_ATTN)
        for start in range(full_end, kv_end, BLOCK_N):
            m, l, acc = _tile(q, m, l, acc, start, kv_end, lo, q_pos, row_ok, head, kv_col, d, d_ok, bt_row,
                              k_cache_ptr, v_cache_ptr, cache_stride_block, bias_ptr, bias_m1, qk_scale, NKV, HD,
                              PAGE, BLOCK_N, DOT_DTYPE, PRECISION, WINDOW, CAUSAL, HAS_BIAS, True, FP8_ATTN)
        out = acc / tl.where(l > 0, l, 1.0)[:, None] * v_scale
        tl.store(out_ptr + t_row[:, None] * out_stride_t + head[:, None] * out_stride_h + d[None, :],
                 _output(out, q_ptr, qs_ptr, QUANT_OUT), mask=row_ok[:, None] & d_ok[None, :])


def packed_tiling(max_query_len: int | None, kv_quant: bool, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) for a step of `dtype` queries whose longest query has
    `max_query_len` tokens (None: unknown, the short-step tiling)."""
    if max_query_len is not None and max_query_len >= LONG_QUERY and dtype.itemsize <= 2:
        return LONG_TILING
    return BLOCK_M, BLOCK_N, 4, 1 if kv_quant else 2


def paged_packed_attention(
    q: torch.Tensor,  # [T, nh, hd]
    k_cache: torch.Tensor,  # [num_blocks, block, nkv, hd] contiguous
    v_cache: torch.Tensor,  # [num_blocks, block, nkv, hd] contiguous
    query_start_loc: torch.Tensor,  # [R+1] int32
    context_lens: torch.Tensor,  # [R] int32, this step's tokens included
    block_tables: torch.Tensor,  # [R, max_blocks] int32
    scale: float,
    out: torch.Tensor | None = None,  # [T, nh, hd]
    kv_scale: torch.Tensor | None = None,  # [2] (K, V) scales of an int8 / fp8 cache
    quant_scale: torch.Tensor | None = None,  # [1] float32: store E4M3 codes at this scale (`out` E4M3)
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    sliding_window: int | None = None,  # each query sees only the last this many positions (its own included)
    causal: bool = True,
    position_bias: torch.Tensor | None = None,  # [nh, 2M-1] float32 relative position bias (T5)
    max_query_len: int | None = None,  # the longest query (host int): picks the tiling
    fp8_attention: bool = False,  # Q.K and P.V on E4M3 operands (an fp8 cache and 2-byte queries only)
) -> torch.Tensor:
    """Causal attention of a packed batch (any query lengths) over the cache, as paged_attention_ref (with
    `sliding_window`, its windowed mask; tiles wholly before a query block's window are skipped; with
    `position_bias`, T5's relative bias on each score; with causal=False, cross-attention: every query of a
    request attends to all its context_lens keys, whatever its query length, with no window or bias); with
    `quant_scale`, the E4M3 codes quantize_fp8 makes of that output at that static scale. Tiles of
    `block_m` (token, head) rows by `block_n` keys, `num_stages` deep: by default (packed_tiling) 64 x 32, 4
    warps, 2 stages for a float cache and 1 for an int8 / fp8 one (64 requests x 128 tokens of Llama-3.1-8B's
    heads on H100: 110 -> 90 us bfloat16, 147 -> 118 us fp8, from 64-key tiles); LONG_TILING when
    `max_query_len` reaches LONG_QUERY (2-byte queries).

    With `fp8_attention` (TensorRT-LLM's FP8 context FMHA) both dots run on E4M3 operands, twice the tensor-core
    rate of bfloat16's on Hopper: each query row (token, head) as codes at its own scale (its amax / 448), the
    cache's K and V codes as stored, and the softmax weights as codes of p * P_SCALE; accumulation, the online
    softmax and the row sums stay float32. Its error is FP8's: a query and a weight each carry up to 2**-4
    relative rounding (see tests/test_kernels_fp8_attention.py for the bound against float64)."""
    num_tokens, nh, hd = q.shape
    num_requests = context_lens.shape[0]
    page, nkv = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous() and block_tables.stride(1) == 1
    scale_ptr, kv_quant = kv_quant_args(k_cache, kv_scale)
    check_attention_mode(causal, position_bias, sliding_window)
    bias_ptr, bias_m1 = bias_args(position_bias, q)
    if fp8_attention and (kv_quant != KV_QUANT[torch.float8_e4m3fn] or q.dtype.itemsize != 2):
        raise ValueError(f"fp8_attention needs an fp8 (float8_e4m3fn) KV cache and bfloat16 / float16 queries; "
                         f"got a {k_cache.dtype} cache and {q.dtype} queries")
    out = attention_out(q, out, quant_scale)
    if num_tokens == 0:
        return out
    tiling = packed_tiling(max_query_len, bool(kv_quant), q.dtype)
    block_m, block_n = block_m or tiling[0], block_n or tiling[1]
    num_warps, num_stages = num_warps or tiling[2], num_stages or tiling[3]
    group = nh // nkv
    group_p = triton.next_power_of_2(group)
    block_m = max(block_m, group_p)
    block_q = block_m // group_p
    # An upper bound on the q blocks: each request adds at most one partly filled block.
    grid = (num_tokens // block_q + num_requests, nkv)
    _packed_attention_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, context_lens, block_tables, scale_ptr,
        out if quant_scale is None else quant_scale, bias_ptr, num_requests,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), k_cache.stride(0), bias_m1,
        scale * 1.4426950408889634, NKV=nkv, GROUP=group, GROUP_P=group_p, HD=hd,
        BLOCK_D=triton.next_power_of_2(hd), PAGE=page, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        KV_QUANT=kv_quant, QUANT_OUT=quant_scale is not None, WINDOW=window_arg(sliding_window), CAUSAL=causal,
        HAS_BIAS=position_bias is not None, FP8_ATTN=(2 if knobs.runtime.interpret else 1) if fp8_attention else 0,
        **dot_args(q.dtype), num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
