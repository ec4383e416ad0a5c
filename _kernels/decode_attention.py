"""Triton paged decode attention: one query token per request, GQA-aware, split-K over the context."""

# Reference: paged_attention_ref with every query length 1. Each program takes one (request, kv head,
# split): the GROUP query heads that share the kv head form the rows of one tile, so each K/V tile is
# read once per kv head. With several splits a second kernel merges them by their log-sum-exp; one split
# writes the output itself. An int8 / fp8 cache's codes enter the dots as they are (exact in the dot dtype:
# float16 on a GPU); the K scale joins the softmax scale and the V scale multiplies the output. With
# QUANT_OUT the output is stored as the E4M3 codes of the next FP8 linear (the output projection) at its
# static input scale: the codes quantize_fp8 makes of the output rounded to the query's dtype. With a
# sliding window (WINDOW > 0, a model constant: one compile) a request's splits share out only the tiles that
# hold its last WINDOW positions; the keys before them are masked out of the loads and never read. With a
# relative position bias (HAS_BIAS: T5's decoder), each score gets bias[h, clamp(pos - (ctx - 1), -(M-1), M-1)
# + M - 1] from the float32 [nh, 2M-1] table, times log2(e) since the softmax runs in base 2.

import torch
import triton
import triton.language as tl
from triton import knobs

from .common import dot_args
from .fp8_linear import FP8_DTYPE
from .kv_write import fp8_codes, kv_quant_args, load_kv_scales
from .paged_attention import check_position_bias

BLOCK_N = 64  # keys per tile
MAX_SPLITS = 32
"""The most splits of a request's context (num_splits_for gives no more; the merge reads this many lanes)."""


# The block-table width changes from step to step, and the split count with the batch: neither is specialized
# on (a mixed step's decodes, 1 to hundreds of rows, would compile a kernel for each new count: a second each,
# stalling the step). SPLIT says whether there are several.
@triton.jit(do_not_specialize=["bt_stride", "num_splits", "min_tiles"])
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, part_out_ptr,
                         part_lse_ptr, out_ptr, scale_ptr, qs_ptr, bias_ptr, q_stride_t, q_stride_h, out_stride_t,
                         out_stride_h, bt_stride, cache_stride_block, bias_m1, scale_log2, num_splits, min_tiles,
                         NH: tl.constexpr, NKV: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                         HD: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                         SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                         KV_QUANT: tl.constexpr, QUANT_OUT: tl.constexpr, WINDOW: tl.constexpr,
                         HAS_BIAS: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + r)
    num_tiles = tl.cdiv(ctx, BLOCK_N)
    if WINDOW > 0:  # the query (position ctx - 1) sees positions >= ctx - WINDOW
        lo = tl.maximum(ctx - WINDOW, 0)
        first_tile = lo // BLOCK_N
    else:
        first_tile = 0
    # A row's context in num_splits even parts of min_tiles tiles at least (a short row leaves its last splits
    # empty: they store no part, and the merge reads none of them).
    tiles_per_split = tl.maximum(tl.cdiv(num_tiles - first_tile, num_splits), min_tiles)
    tile_begin = first_tile + split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)
    k_scale, v_scale = load_kv_scales(scale_ptr, KV_QUANT)
    qk_scale = scale_log2 * k_scale

    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, BLOCK_D)
    head = kvh * GROUP + g  # [GROUP_P]
    row_ok = g < GROUP
    d_ok = d < HD
    q = tl.load(q_ptr + r * q_stride_t + head[:, None] * q_stride_h + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [GROUP_P, BLOCK_D]
    if KV_QUANT != 0 and DOT_DTYPE == tl.float16:  # a bfloat16 query in float16's range (see below)
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0)
    q = q.to(DOT_DTYPE)
    m = tl.full([GROUP_P], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for tile in range(tile_begin, tile_end):
        pos = tile * BLOCK_N + n  # [BLOCK_N]
        key_ok = pos < ctx
        if WINDOW > 0:
            key_ok = key_ok & (pos >= lo)
        block = tl.load(block_tables_ptr + r * bt_stride + pos // PAGE, mask=key_ok, other=0).to(tl.int64)
        row = block * cache_stride_block + (pos % PAGE) * (NKV * HD) + kvh * HD  # [BLOCK_N]
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * qk_scale  # [GROUP_P, BLOCK_N]
        if HAS_BIAS:
            s += position_bias_log2(bias_ptr, bias_m1, head, pos, tl.zeros([GROUP_P], tl.int32) + ctx - 1,
                                    row_ok[:, None] & key_ok[None, :])
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
        m = m_new
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None] * v_scale
    if not SPLIT:  # the whole context: the output itself, no merge (an empty context gives 0, as merged)
        tl.store(out_ptr + r * out_stride_t + head[:, None] * out_stride_h + d[None, :],
                 _output(out, q_ptr, qs_ptr, QUANT_OUT), mask=row_ok[:, None] & d_ok[None, :])
        return
    lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))  # base 2
    base = (r * NH + head) * num_splits + split  # [GROUP_P]: part_* are [R, nh, splits(, hd)]
    tl.store(part_out_ptr + base[:, None] * HD + d[None, :], out,
             mask=row_ok[:, None] & d_ok[None, :] & (tile_end > tile_begin))
    tl.store(part_lse_ptr + base, lse, mask=row_ok)  # -inf: an empty split (its part is neither stored nor read)


@triton.jit
def position_bias_log2(bias_ptr, bias_m1, head, key_pos, query_pos, mask):
    """[rows, keys] float32 bias of each row's head `head` [rows] for keys at `key_pos` [keys] seen from
    `query_pos` [rows], from the contiguous [nh, 2M-1] table (bias_m1 = M - 1), in base 2 (times log2(e)) as
    the scores; 0 where `mask` is False."""
    rel = key_pos[None, :] - query_pos[:, None]
    bucket = tl.minimum(tl.maximum(rel, -bias_m1), bias_m1) + bias_m1  # [rows, keys]
    b = tl.load(bias_ptr + head[:, None] * (2 * bias_m1 + 1) + bucket, mask=mask, other=0.0)
    return b * 1.4426950408889634


@triton.jit
def _output(out, q_ptr, qs_ptr, QUANT_OUT: tl.constexpr):
    """float32 attention output as stored: rounded to the query's dtype, then (QUANT_OUT) its E4M3 codes at
    the static scale *qs_ptr."""
    out = out.to(q_ptr.dtype.element_ty)
    if QUANT_OUT:
        out = fp8_codes(out.to(tl.float32), tl.load(qs_ptr))
    return out


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, q_ptr, qs_ptr, out_stride_t, out_stride_h, num_splits,
                         NH: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_S: tl.constexpr, QUANT_OUT: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    base = (r * NH + h) * num_splits
    lse = tl.load(part_lse_ptr + base + s, mask=s < num_splits, other=float("-inf"))  # [BLOCK_S]
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # an empty context (padding row): all weights 0
    w = tl.exp2(lse - top)  # [BLOCK_S]
    parts = tl.load(part_out_ptr + (base + s)[:, None] * HD + d[None, :],
                    mask=((s < num_splits) & (lse > float("-inf")))[:, None] & (d < HD)[None, :],
                    other=0.0)  # [BLOCK_S, BLOCK_D]
    total = tl.sum(w, axis=0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + r * out_stride_t + h * out_stride_h + d, _output(out, q_ptr, qs_ptr, QUANT_OUT), mask=d < HD)


def attention_out(q: torch.Tensor, out: torch.Tensor | None, quant_scale: torch.Tensor | None) -> torch.Tensor:
    """The output buffer of an attention launch: `out`, else q's shape in q's dtype (E4M3 with a quant scale)."""
    dtype = q.dtype if quant_scale is None else FP8_DTYPE
    if out is None:
        return torch.empty(q.shape, dtype=dtype, device=q.device)
    if out.dtype != dtype:
        raise ValueError(f"out is {out.dtype}; this launch stores {dtype}")
    return out


def bias_args(position_bias: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(table pointer, M - 1) of a launch: the checked, contiguous [nh, 2M-1] float32 table; without a bias q
    itself, never read, and 0."""
    m = check_position_bias(position_bias, q.shape[1], q.device)
    if position_bias is None:
        return q, 0
    return position_bias.contiguous(), m - 1


def window_arg(sliding_window: int | None) -> int:
    """The WINDOW constexpr of the attention kernels: the window in positions, 0 for none."""
    if sliding_window is None:
        return 0
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window!r} is invalid: must be None or an int >= 1")
    return sliding_window


LONG_CONTEXT = 8192
"""A quantized cache's one-warp programs over contexts this long take more splits (num_splits_for)."""
LONG_SPLIT = 1024
"""A quantized cache's splits of at least this many keys run unpipelined (paged_decode_attention); from four
of them a context (4,096 keys) takes a split per LONG_SPLIT keys (num_splits_for)."""
FLOOR_PROGRAMS = 16384
"""The most programs (requests x kv heads x splits) the one-split-per-LONG_SPLIT-keys floor may ask for: a CUDA
graph sizes its splits for its bound (max_seq_len, 131,072 for Llama 3.1 by default), and a large batch of short
rows would otherwise launch mostly idle programs and a float32 part per split (1,024 requests at 32 splits: 537 MB
a layer)."""
MIN_SPLIT_KEYS = 256
"""Where num_splits_for gave LONG_SPLIT splits, the shortest part of a row's context (paged_decode_attention)."""


def num_splits_for(num_requests: int, num_kv_heads: int, max_context_len: int, num_sms: int = 132,
                   quantized: bool = False) -> int:
    """Splits that give about four programs per multiprocessor (at most 32), never a split shorter than two
    tiles. Over an int8 / fp8 cache (`quantized`) and contexts of LONG_CONTEXT keys or more, about sixteen: its
    programs are one warp each. Over such a cache and contexts of 4 x LONG_SPLIT keys or more, at least one split
    per LONG_SPLIT keys, up to FLOOR_PROGRAMS programs (H100, `bench_kernels --decode-sweep --kv-dtype fp8`:
    48 requests at 20,001-22,000 keys 6 splits 848 us, 12 splits 736, 24 splits 748; 512 at 129-4,224 keys 1
    split 1,020 us, 4 splits 928; 400 at 2,049-4,096 1,002 -> 966 us; 955 at 1,001-2,000 keys stay fastest in one
    split, 1,105 us against 1,129 in two)."""
    per_sm = 16 if quantized and max_context_len >= LONG_CONTEXT else 4
    pairs = max(1, num_requests * num_kv_heads)
    want = triton.cdiv(per_sm * num_sms, pairs)
    if quantized and max_context_len >= 4 * LONG_SPLIT:
        want = max(want, min(triton.cdiv(max_context_len, LONG_SPLIT), triton.cdiv(FLOOR_PROGRAMS, pairs)))
    return int(max(1, min(want, triton.cdiv(max_context_len, 2 * BLOCK_N), MAX_SPLITS)))


def default_tiling(programs: int, num_splits: int, max_context_len: int | None, quantized: bool
                   ) -> tuple[int, int, int]:
    """(block_n, num_warps, num_stages) of the decode kernel by default (see paged_decode_attention)."""
    if not quantized:
        return BLOCK_N, 4, 3
    # A quantized cache with many programs (about thirty a multiprocessor and more) runs faster unpipelined:
    # 1,024 requests x 8 kv heads at 129-256 context, 223 -> 187 us on H100; at 4,096 programs the two
    # are even, below that two stages win. With long splits it does from about eight a multiprocessor (H100,
    # `bench_kernels --decode-sweep`: 400 requests at 2,049-4,096 keys 1,086 -> 1,031 us, 512 at 129-4,224
    # 1,079 -> 1,037 us, 48 at 20,001-22,000 in 4 splits 959 -> 767 us; in 2 splits, 768 programs, 2 stages
    # stay ahead).
    long_splits = max_context_len is not None and max_context_len >= LONG_SPLIT * num_splits
    return 32, 1, 1 if programs > 4096 or (programs > 1024 and long_splits) else 2


def default_min_split_keys(num_requests: int, num_kv_heads: int, max_context_len: int | None, quantized: bool
                           ) -> int:
    """The shortest part of a row's context a split reads by default (see paged_decode_attention)."""
    long_rows = quantized and max_context_len is not None and max_context_len >= 4 * LONG_SPLIT
    return MIN_SPLIT_KEYS if long_rows and num_requests * num_kv_heads >= 128 else 1


def paged_decode_attention(
    q: torch.Tensor,  # [R, nh, hd]: one query token per request (request r's token is row r)
    k_cache: torch.Tensor,  # [num_blocks, block, nkv, hd] contiguous
    v_cache: torch.Tensor,  # [num_blocks, block, nkv, hd] contiguous
    context_lens: torch.Tensor,  # [R] int32, this step's token included; 0 = padding row (output 0)
    block_tables: torch.Tensor,  # [R, max_blocks] int32
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,  # [R, nh, hd]
    kv_scale: torch.Tensor | None = None,  # [2] (K, V) scales of an int8 / fp8 cache
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    quant_scale: torch.Tensor | None = None,  # [1] float32: store E4M3 codes at this scale (`out` E4M3)
    sliding_window: int | None = None,  # each query sees only the last this many positions
    position_bias: torch.Tensor | None = None,  # [nh, 2M-1] float32 relative position bias (T5)
    max_context_len: int | None = None,  # the longest context (keys read) of these requests, when known
    min_split_keys: int | None = None,  # the shortest part of a row's context a split reads
) -> torch.Tensor:
    """Attention of each request's single query over its whole cached context, or with `sliding_window` W over
    its last W positions (the blocks before those are never read: their block-table entries may be -1). Tiles
    of `block_n` keys,
    `num_warps`, `num_stages`: by default 64, 4, 3 for a float cache and 32, 1, 2 for an int8 / fp8 one, the
    faster on H100 for each (sweeps over batch 1-1024, context 129-4096); the latter unpipelined (1 stage) above
    4,096 programs, and above 1,024 when `max_context_len` gives splits of LONG_SPLIT keys or more. Each row
    splits its own context in `num_splits` even parts, each `min_split_keys` long at least: by default
    MIN_SPLIT_KEYS over a quantized cache whose `max_context_len` is 4 x LONG_SPLIT or more with at least 128
    (request, kv head) pairs (num_splits_for sized its splits for the longest context, which may be a CUDA
    graph's bound: a short row then runs fewer, longer parts), else one tile. With
    `quant_scale` the output is the E4M3 codes quantize_fp8 makes of it at that static scale. With
    `position_bias` each score gets that of its distance from the query at position context_len - 1, as
    paged_attention_ref's. The same kernel serves cross-attention: the query sees every cached key of its
    request (context_lens = the encoder lengths)."""
    num_requests, nh, hd = q.shape
    page, nkv = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous() and block_tables.stride(1) == 1
    scale_ptr, kv_quant = kv_quant_args(k_cache, kv_scale)
    bias_ptr, bias_m1 = bias_args(position_bias, q)
    out = attention_out(q, out, quant_scale)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits={num_splits!r} is invalid: must be an int in [1, {MAX_SPLITS}]")
    if num_requests == 0:
        return out
    dot = dot_args(q.dtype)
    if kv_quant and q.dtype != torch.float32 and not knobs.runtime.interpret:
        # An int8 / fp8 code is exact in float16 too, and converts in one instruction per two codes (several
        # to bfloat16): the dots run in float16, the query clamped to its range (|q| > 65504 is no real query).
        dot["DOT_DTYPE"] = tl.float16
    defaults = default_tiling(num_requests * nkv * num_splits, num_splits, max_context_len, bool(kv_quant))
    block_n, num_warps, num_stages = (given or default for given, default in
                                      zip((block_n, num_warps, num_stages), defaults))
    if min_split_keys is None:
        min_split_keys = default_min_split_keys(num_requests, nkv, max_context_len, bool(kv_quant))
    if isinstance(min_split_keys, bool) or not isinstance(min_split_keys, int) or min_split_keys < 1:
        raise ValueError(f"min_split_keys={min_split_keys!r} is invalid: must be an int >= 1")
    group = nh // nkv
    assert out.stride(2) == 1
    # One split writes the output itself; several write float32 parts that a second kernel merges.
    parts = (num_requests, nh, num_splits) if num_splits > 1 else (1, 1, 1)
    part_out = torch.empty((*parts, hd), dtype=torch.float32, device=q.device)
    part_lse = torch.empty(parts, dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(hd)
    _decode_split_kernel[(num_requests, nkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part_out, part_lse, out, scale_ptr,
        out if quant_scale is None else quant_scale, bias_ptr, q.stride(0),
        q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), k_cache.stride(0), bias_m1,
        scale * 1.4426950408889634, num_splits, triton.cdiv(min_split_keys, block_n),
        NH=nh, NKV=nkv, GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), HD=hd, BLOCK_D=block_d,
        PAGE=page, BLOCK_N=block_n, SPLIT=num_splits > 1, KV_QUANT=kv_quant, QUANT_OUT=quant_scale is not None,
        WINDOW=window_arg(sliding_window), HAS_BIAS=position_bias is not None, **dot, num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits == 1:
        return out
    _merge_splits_kernel[(num_requests, nh)](
        part_out, part_lse, out, q, out if quant_scale is None else quant_scale, out.stride(0), out.stride(1),
        num_splits, NH=nh, HD=hd, BLOCK_D=block_d, BLOCK_S=MAX_SPLITS, QUANT_OUT=quant_scale is not None,
        num_warps=1,
    )
    return out
