"""Triton flash attention of packed rows over their own tokens (no cache): the encoder of T5 / BART / FSMT."""

# Reference: varlen_attention_ref. A program takes BLOCK_Q query tokens of one row and one kv head; as in the
# packed kernel its tile rows are (token, query head of the kv head's group) pairs, so each K/V tile is read
# once per kv head (GQA). The grid is (rows x q blocks of the longest row, kv heads), a row's q blocks
# adjacent so that they share its K/V in L2; blocks past a row's end return at once. K/V tiles stream with an
# online softmax in base 2. Only the tiles that need it are masked: without CAUSAL the row's last, partly
# filled tile; with CAUSAL those on the diagonal (the loop stops at the block's last query). With HAS_BIAS each
# score gets T5's relative position bias as in decode_attention, gathered from the table only for the tiles
# within M-1 positions of the block's tokens: farther tiles take each head's first or last bucket.

import numbers

import torch
import triton
import triton.language as tl

from .common import dot_args
from .decode_attention import attention_out, bias_args, position_bias_log2
from .paged_attention import check_attention_mode

BLOCK_M = 64  # tile rows: BLOCK_Q tokens x GROUP_P heads
BLOCK_N = 32  # keys per tile


@triton.jit
def _attend_tiles(q, m, l, acc, k_base, v_base, k_stride_t, v_stride_t, bias_ptr, bias_m1, bias_before,
                  bias_after, head, tok, tok_first, tok_last, row_ok, d, d_ok, lo, hi, kv_end, scale_log2,
                  BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The online softmax over the key tiles starting at lo, lo + BLOCK_N, .. < hi; MASKED masks the keys at or
    past kv_end and (CAUSAL) those after each row's token, else every key of the tiles counts. A tile whose
    keys all lie M-1 or more after (before) every token of the block takes the bias of the table's last (first)
    bucket, bias_after (bias_before) [BLOCK_M], with no gather."""
    n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        pos = start + n  # [BLOCK_N] key positions in the row
        key_ok = pos < kv_end
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + pos[:, None] * k_stride_t + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + pos[:, None] * v_stride_t + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        if HAS_BIAS:
            if start - tok_last >= bias_m1:
                s += bias_after[:, None]
            elif start + BLOCK_N - 1 - tok_first <= -bias_m1:
                s += bias_before[:, None]
            else:
                s += position_bias_log2(bias_ptr, bias_m1, head, pos, tok, row_ok[:, None] & key_ok[None, :])
        if MASKED:
            if CAUSAL:
                s = tl.where(key_ok[None, :] & (pos[None, :] <= tok[:, None]), s, float("-inf"))
            else:
                s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every row sees the tile's first key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
        m = m_new
    return m, l, acc


# The row count and the longest row change from step to step: not specialized on.
@triton.jit(do_not_specialize=["max_q_blocks"])
def _varlen_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, query_start_loc_ptr, bias_ptr, max_q_blocks,
                             q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                             out_stride_t, out_stride_h, bias_m1, scale_log2,
                             GROUP: tl.constexpr, GROUP_P: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, CAUSAL: tl.constexpr,
                             HAS_BIAS: tl.constexpr):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    r = pid // max_q_blocks
    local = pid % max_q_blocks
    q_start = tl.load(query_start_loc_ptr + r)
    q_len = tl.load(query_start_loc_ptr + r + 1) - q_start
    if local * BLOCK_Q < q_len:
        m_idx = tl.arange(0, BLOCK_M)
        tok = local * BLOCK_Q + m_idx // GROUP_P  # [BLOCK_M] token index within the row: its position
        g = m_idx % GROUP_P
        row_ok = (tok < q_len) & (g < GROUP)
        head = kvh * GROUP + g
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HD
        t_row = (q_start + tok).to(tl.int64)
        q = tl.load(q_ptr + t_row[:, None] * q_stride_t + head[:, None] * q_stride_h + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_D]
        if CAUSAL:
            kv_end = tl.minimum(q_len, (local + 1) * BLOCK_Q)  # keys past the block's last query: unused
            full_end = (local * BLOCK_Q + 1) // BLOCK_N * BLOCK_N  # tiles every query of the block sees whole
        else:
            kv_end = q_len
            full_end = q_len // BLOCK_N * BLOCK_N
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        k_base = k_ptr + q_start.to(tl.int64) * k_stride_t + kvh * k_stride_h
        v_base = v_ptr + q_start.to(tl.int64) * v_stride_t + kvh * v_stride_h
        tok_first = local * BLOCK_Q
        tok_last = tok_first + BLOCK_Q - 1
        if HAS_BIAS:  # the two clamped ends of each row's head's bias (keys far before / after the token)
            row_bias = bias_ptr + head * (2 * bias_m1 + 1)
            bias_before = tl.load(row_bias, mask=row_ok, other=0.0) * 1.4426950408889634  # [BLOCK_M], base 2
            bias_after = tl.load(row_bias + 2 * bias_m1, mask=row_ok, other=0.0) * 1.4426950408889634
        else:
            bias_before = tl.zeros([BLOCK_M], tl.float32)
            bias_after = bias_before
        m, l, acc = _attend_tiles(q, m, l, acc, k_base, v_base, k_stride_t, v_stride_t, bias_ptr, bias_m1,
                                  bias_before, bias_after, head, tok, tok_first, tok_last, row_ok, d, d_ok, 0,
                                  full_end, kv_end, scale_log2, BLOCK_N, DOT_DTYPE, PRECISION, False, CAUSAL,
                                  HAS_BIAS)
        m, l, acc = _attend_tiles(q, m, l, acc, k_base, v_base, k_stride_t, v_stride_t, bias_ptr, bias_m1,
                                  bias_before, bias_after, head, tok, tok_first, tok_last, row_ok, d, d_ok,
                                  full_end, kv_end, kv_end, scale_log2, BLOCK_N, DOT_DTYPE, PRECISION, True, CAUSAL,
                                  HAS_BIAS)
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + t_row[:, None] * out_stride_t + head[:, None] * out_stride_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def varlen_attention(
    q: torch.Tensor,  # [T, nh, hd]
    k: torch.Tensor,  # [T, nkv, hd]
    v: torch.Tensor,  # [T, nkv, hd]
    query_start_loc: torch.Tensor,  # [R+1] int32, cumsum of the rows' lengths
    max_len: int,  # >= every row's length: the grid is sized from it (not checked, that would wait for the GPU)
    scale: float,
    causal: bool = True,
    position_bias: torch.Tensor | None = None,  # [nh, 2M-1] float32 relative position bias (T5)
    out: torch.Tensor | None = None,  # [T, nh, hd] in q's dtype
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of each row over its own tokens at positions 0..len-1, as varlen_attention_ref: with `causal`
    token i sees tokens j <= i, without it all tokens of its row (the encoder); `position_bias` adds
    bias[h, clamp(j - i, -(M-1), M-1) + M - 1] to head h's scaled score. q, k, v may be strided views (the
    last dim contiguous), e.g. of a fused QKV projection. Tiles of `block_m` (token, head) rows by `block_n`
    keys, `num_stages` deep."""
    num_tokens, nh, hd = q.shape
    num_requests = query_start_loc.shape[0] - 1
    nkv = k.shape[1]
    if k.shape != v.shape or k.shape[0] != num_tokens or k.shape[2] != hd or nh % nkv != 0:
        raise ValueError(f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}: k and v must be [T, nkv, hd] "
                         f"with nkv dividing q's heads")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("q, k and v must be contiguous in their last (head_dim) dimension")
    if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < 0:
        raise ValueError(f"max_len={max_len!r} is invalid: must be an int >= 0, the longest row")
    max_len = int(max_len)
    if max_len * max(k.stride(0), v.stride(0)) >= 2**31:  # a key's offset in its row is an int32 in the kernel
        raise ValueError(f"max_len={max_len} is too long: rows of that many tokens overflow the kernel's offsets")
    check_attention_mode(causal, None, None)
    bias_ptr, bias_m1 = bias_args(position_bias, q)
    out = attention_out(q, out, None)
    if out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out {list(out.shape)} must be q's shape {list(q.shape)}, its last dim contiguous")
    if num_tokens == 0 or num_requests == 0 or max_len == 0:
        return out
    group = nh // nkv
    group_p = triton.next_power_of_2(group)
    block_m = max(block_m, group_p)
    block_q = block_m // group_p
    max_q_blocks = triton.cdiv(max_len, block_q)
    _varlen_attention_kernel[(num_requests * max_q_blocks, nkv)](
        q, k, v, out, query_start_loc, bias_ptr, max_q_blocks,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        bias_m1, scale * 1.4426950408889634,
        GROUP=group, GROUP_P=group_p, HD=hd, BLOCK_D=triton.next_power_of_2(hd), BLOCK_Q=block_q, BLOCK_M=block_m,
        BLOCK_N=block_n, CAUSAL=causal, HAS_BIAS=position_bias is not None, **dot_args(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
