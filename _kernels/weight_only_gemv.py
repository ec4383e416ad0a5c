"""Triton weight-only GEMV for decode-sized batches: int8 or packed int4 weights dequantized in registers.

Reference: weight_only.weight_only_linear_ref (dequantize, then matmul). At a few rows the product is bound by
reading the weights, so reading 4 (or 8) bits per weight instead of 16 is the whole gain; larger batches take
the fused matmul (weight_only_matmul.py) or dequantize + cuBLAS.
"""

import os

import torch
import triton
import triton.language as tl

MAX_ROWS = 8
"""Most rows (tokens) this kernel takes."""


MAGIC = 0x4B000000
"""The float32 bits of 2**23, which the int4 kernels set each code's field into (_scaled_nibble). A runtime
argument, so that it sits in a register: the mask-and-set then compiles to one LOP3 (with both constants
immediate, ptxas emits two)."""
SIGN_BITS = tl.constexpr(-0x77777778)
"""0x88888888 as an int32: the sign bit of each of a word's eight fields."""


@triton.jit
def _scaled_nibble(w, P: tl.constexpr, magic):
    """float32 of the signed 4-bit field at bits P..P+3 of int32 words `w` (P <= 16) times 2**P, exact, where `w`
    has its fields' sign bits flipped already (w ^ SIGN_BITS, once per word) and `magic` is MAGIC: without an
    int-to-float conversion (a quarter-rate instruction) or a shift, the field (u ^ 8) masked in place into the
    mantissa of 2**23 gives the float 2**23 + (u ^ 8) * 2**P (one LOP3), less 2**23 + 8 * 2**P (one FADD) the
    field's two's-complement value times 2**P. The caller scales x by 2**-P: a power of two, so each product is
    the same float as the unscaled field's times x (SASS of the one-token kernel at 16 x 2048 tiles with zero
    points, sm_90: 1,680 instructions for its 272 FFMA against 2,072 when each field was shifted down and
    sign-extended: SHF 226 -> 86, SGXT 192 -> 0)."""
    bits = (w & (0xF << P)) | magic
    return bits.to(tl.float32, bitcast=True) - (8388608.0 + 8.0 * (1 << P))


@triton.jit
def _field(w, w_hi, J: tl.constexpr, magic):
    """Field J (bits 4J..4J+3, signed) of int32 words `w` (sign bits flipped) as _scaled_nibble gives it: the low
    five in place (bits 0-19: times 2**(4J)), the high three from `w_hi` = w >> 12, shifted once per word (times
    2**(4J - 12))."""
    if J < 5:
        return _scaled_nibble(w, 4 * J, magic)
    else:
        return _scaled_nibble(w_hi, 4 * J - 12, magic)


@triton.jit
def _field_x(x, J: tl.constexpr):
    """x for field J's products: times the power of two that undoes _field's."""
    if J < 5:
        return x * (1.0 / (1 << (4 * J)))
    else:
        return x * (1.0 / (1 << (4 * J - 12)))


@triton.jit(do_not_specialize=["M"])  # one compile for every row count
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
                 magic, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # BLOCK_K: input features per chunk (one group at most when GROUP > 0); w holds BLOCK_K * BITS / 8 bytes of it.
    pid = tl.program_id(0)
    rows_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output features
    rows_m = tl.arange(0, BLOCK_M)  # [BM] tokens
    mask_n, mask_m = rows_n < N, rows_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_sum = tl.zeros((BLOCK_M, 1), dtype=tl.float32)  # per-channel zero points: sum of x over all of K
    HALF: tl.constexpr = BLOCK_K // 2
    for k0 in range(0, K, BLOCK_K):
        if BITS == 4:
            cols = k0 // 2 + tl.arange(0, HALF)  # [BK/2] packed bytes: low nibble = even feature, high = odd
            packed = tl.load(w_ptr + rows_n[:, None] * stride_wn + cols[None, :], mask=mask_n[:, None],
                             other=0).to(tl.int32) ^ SIGN_BITS  # [BN, BK/2]: both fields' sign bits flipped
            lo = _scaled_nibble(packed, 0, magic)
            hi = _scaled_nibble(packed, 4, magic)  # times 16
            xe = tl.load(x_ptr + rows_m[:, None] * stride_xm + 2 * cols[None, :], mask=mask_m[:, None],
                         other=0.0).to(tl.float32)  # [BM, BK/2]
            xo = tl.load(x_ptr + rows_m[:, None] * stride_xm + 2 * cols[None, :] + 1, mask=mask_m[:, None],
                         other=0.0).to(tl.float32)
            part = tl.sum(xe[:, None, :] * lo[None, :, :] + (xo * 0.0625)[:, None, :] * hi[None, :, :],
                          axis=2)  # [BM, BN]
            chunk_sum = tl.sum(xe + xo, axis=1)[:, None]  # [BM, 1]
        else:
            cols = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(w_ptr + rows_n[:, None] * stride_wn + cols[None, :], mask=mask_n[:, None],
                        other=0).to(tl.float32)  # [BN, BK]
            xk = tl.load(x_ptr + rows_m[:, None] * stride_xm + cols[None, :], mask=mask_m[:, None],
                         other=0.0).to(tl.float32)  # [BM, BK]
            part = tl.sum(xk[:, None, :] * q[None, :, :], axis=2)
            chunk_sum = tl.sum(xk, axis=1)[:, None]
        if GROUP > 0:
            g = k0 // GROUP
            s = tl.load(s_ptr + rows_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)  # [BN]
            if HAS_ZERO:
                z = tl.load(z_ptr + rows_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
                part = part - chunk_sum * z[None, :]
            acc += part * s[None, :]
        else:
            acc += part
            x_sum += chunk_sum
    if GROUP == 0:
        s = tl.load(s_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc - x_sum * z[None, :]
        acc = acc * s[None, :]
    # The reference rounds the product to the model dtype before the bias, as F.linear with a bias does not;
    # adding in float32 then rounding once differs from it by at most one rounding.
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows_m[:, None] * stride_om + rows_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _quad_x(q0, q1, J: tl.constexpr):
    """float32 of feature J (0-7) of the eight bfloat16 held by int64 words q0 (features 0-3) and q1 (4-7),
    little-endian: a bfloat16 is the top half of a float32, so a shift or a mask converts it."""
    if J < 4:
        q = q0
    else:
        q = q1
    if J % 4 < 2:
        v = q.to(tl.int32)
    else:
        v = (q >> 32).to(tl.int32)
    if J % 2 == 0:
        v = v << 16
    else:
        v = v & -65536
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _gemv_row_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, N, K, stride_wn, magic,
                     BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_QUADS: tl.constexpr = False,
                     PREFETCH: tl.constexpr = False):
    # One token, per-channel scales (batch-1 decode): each thread keeps its partial products over the whole of K in
    # registers and the block reduces once at the end, instead of a cross-thread reduction per chunk. Packed int4
    # is read as int32 words of 8 codes (nibble j of word c is feature 8c + j, little-endian): wide weight loads,
    # and x read as 8 contiguous slices rather than even/odd gathers (measured 18% faster on Llama's linears).
    # X_QUADS (int4, bfloat16 x, 8-byte aligned): each word's eight x read as two int64 words rather than eight
    # 2-byte gathers, converted by a shift or a mask. PREFETCH: the next chunk's weights (and quads) are loaded
    # before this chunk's products, so that a program's loads overlap its arithmetic.
    pid = tl.program_id(0)
    rows_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = rows_n < N
    WIDTH: tl.constexpr = BLOCK_K // 8 if BITS == 4 else BLOCK_K  # int32 words (int4) or bytes (int8) per chunk
    cols = tl.arange(0, WIDTH)
    acc = tl.zeros((BLOCK_N, WIDTH), dtype=tl.float32)
    x_acc = tl.zeros((WIDTH,), dtype=tl.float32)  # zero points: sum of x over K
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + cols[None, :]  # [BN, WIDTH]: the first chunk
    quads = x_ptr.to(tl.pointer_type(tl.int64)) + 2 * cols  # [WIDTH]: word c's features 8c..8c+3 (+1: 8c+4..)
    if PREFETCH:
        w_next = tl.load(w_ptrs, mask=mask_n[:, None], other=0)
        if X_QUADS:
            q0_next = tl.load(quads)
            q1_next = tl.load(quads + 1)
    for k0 in range(0, K, BLOCK_K):
        if PREFETCH:
            more = k0 + BLOCK_K < K
            w = w_next.to(tl.int32)
            w_next = tl.load(w_ptrs + (k0 // BLOCK_K + 1) * WIDTH, mask=mask_n[:, None] & more, other=0)
            if X_QUADS:
                q0 = q0_next
                q1 = q1_next
                q0_next = tl.load(quads + (k0 + BLOCK_K) // 4, mask=more, other=0)
                q1_next = tl.load(quads + (k0 + BLOCK_K) // 4 + 1, mask=more, other=0)
        else:
            w = tl.load(w_ptrs + k0 // BLOCK_K * WIDTH, mask=mask_n[:, None], other=0).to(tl.int32)  # [BN, WIDTH]
            if X_QUADS:
                q0 = tl.load(quads + k0 // 4)
                q1 = tl.load(quads + k0 // 4 + 1)
        if BITS == 4:
            w = w ^ SIGN_BITS
            w_hi = w >> 12
            for j in tl.static_range(8):
                if X_QUADS:
                    xj = _quad_x(q0, q1, j)
                else:
                    xj = tl.load(x_ptr + k0 + 8 * cols + j).to(tl.float32)  # [WIDTH] features 8c + j
                acc += _field(w, w_hi, j, magic) * _field_x(xj, j)[None, :]  # nibble j, signed
                if HAS_ZERO:
                    x_acc += xj
        else:
            xs = tl.load(x_ptr + k0 + cols).to(tl.float32)
            acc += w.to(tl.float32) * xs[None, :]
            if HAS_ZERO:
                x_acc += xs
    y = tl.sum(acc, axis=1)  # [BN]
    if HAS_ZERO:
        y = y - tl.load(z_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32) * tl.sum(x_acc, axis=0)
    y = y * tl.load(s_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _gemv_row_group_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, N, K, stride_wn, stride_sn, magic,
                           BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One token, group-wise scales: a chunk of BLOCK_K features spans NG = BLOCK_K / GROUP whole groups, held as
    # [BN, NG, words or bytes per group] so each group's scale (and zero point) broadcasts over its own features;
    # long chunks keep enough bytes in flight however small the group. Packed int4 is read as int32 words of 8
    # codes, as in _gemv_row_kernel.
    pid = tl.program_id(0)
    rows_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = rows_n < N
    NG: tl.constexpr = BLOCK_K // GROUP
    GW: tl.constexpr = GROUP // 8 if BITS == 4 else GROUP  # int32 words (int4) or bytes (int8) per row and group
    groups = tl.arange(0, NG)
    within = tl.arange(0, GW)
    acc = tl.zeros((BLOCK_N, NG, GW), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 // GROUP * GW + groups[:, None] * GW + within[None, :]  # [NG, GW] word / byte columns
        w = tl.load(w_ptr + rows_n[:, None, None] * stride_wn + cols[None, :, :], mask=mask_n[:, None, None],
                    other=0).to(tl.int32)  # [BN, NG, GW]
        if BITS == 4:
            first = k0 + groups[:, None] * GROUP + 8 * within[None, :]  # [NG, GW] feature of each word's nibble 0
            prod = tl.zeros((BLOCK_N, NG, GW), dtype=tl.float32)
            xs = tl.zeros((NG, GW), dtype=tl.float32)
            w = w ^ SIGN_BITS
            w_hi = w >> 12
            for j in tl.static_range(8):
                xj = tl.load(x_ptr + first + j).to(tl.float32)
                prod += _field(w, w_hi, j, magic) * _field_x(xj, j)[None]
                if HAS_ZERO:
                    xs += xj
        else:
            xs = tl.load(x_ptr + cols).to(tl.float32)
            prod = w.to(tl.float32) * xs[None]
        g = k0 // GROUP + groups  # [NG]
        s = tl.load(s_ptr + rows_n[:, None] * stride_sn + g[None, :], mask=mask_n[:, None], other=0.0)
        if HAS_ZERO:
            z = tl.load(z_ptr + rows_n[:, None] * stride_sn + g[None, :], mask=mask_n[:, None], other=0.0)
            prod = prod - z.to(tl.float32)[:, :, None] * xs[None]
        acc += prod * s.to(tl.float32)[:, :, None]
    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BN]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)


def _block_k(k: int, group: int, bits: int = 4) -> int:
    """Input features per chunk: within one group; per channel, long chunks (measured best on an H100)."""
    if group:
        return min(group, 128)
    for size in ((1024, 512) if bits == 4 else (512,)):
        if k % size == 0:
            return size
    return 128


def _config(k: int, group: int, bits: int, block_k: int | None = None, block_n: int = 8,
            num_warps: int | None = None):
    """(BLOCK_K, BLOCK_N, num_warps), by default the best of a sweep over Llama-3.1-8B's four linears at one
    token on an H100; a chunk of input features never spans two groups."""
    block_k = block_k or _block_k(k, group, bits)
    assert k % block_k == 0 and (not group or group % block_k == 0), (k, group, block_k)
    return block_k, block_n, num_warps or (8 if group else 4)


ROW_MODES_ENV = "LLMAPI_INT4_GEMV_MODES"
ROW_MODES = ("quads", "prefetch")


def row_modes() -> tuple[bool, bool] | None:
    """(x_quads, prefetch) of the one-token int4 per-channel kernel as ROW_MODES_ENV sets them: a comma-separated
    subset of ROW_MODES, or "none"; None where it is unset or empty (_row_config's defaults). ValueError naming a
    value that is not one."""
    text = os.environ.get(ROW_MODES_ENV, "").strip()
    if not text:
        return None
    chosen = [mode.strip() for mode in text.split(",") if mode.strip()]
    bad = [mode for mode in chosen if mode not in ROW_MODES and not (mode == "none" and len(chosen) == 1)]
    if bad:
        raise ValueError(f"{ROW_MODES_ENV}={text!r} is invalid: {', '.join(map(repr, bad))} "
                         f"{'is' if len(bad) == 1 else 'are'} not among {', '.join(ROW_MODES)} (or 'none' alone)")
    return "quads" in chosen, "prefetch" in chosen


def _row_config(k: int, n: int, bits: int, block_k: int | None = None, block_n: int | None = None,
                num_warps: int | None = None, x_quads: bool | None = None, prefetch: bool | None = None):
    """(BLOCK_K, BLOCK_N, num_warps, X_QUADS, PREFETCH) of the one-token per-channel kernel. For int4 the defaults
    are the best of a sweep over Llama-3.1-8B's four linears on an H100 (--gemv, CUDA graphs): x read as quads
    (qkv 9.4 -> 7.9 us, o 8.1 -> 6.3 with the prefetch); 1024-feature chunks and 8 rows a program, but on long rows
    (K > 4096, down) 2048-feature chunks, 16 rows and 8 warps (16.9 -> 13.7 us with the prefetch); the next chunk
    prefetched except on wide outputs (N >= 16384, gate_up: 24.9 us without it, 26.3 with), whose many programs
    hide the loads' latency instead. ROW_MODES_ENV overrides the two modes. X_QUADS is asked for, not promised:
    weight_only_gemv drops it where x does not allow it. int8: 512-feature chunks where they tile K, 8 rows, 4
    warps, neither mode."""
    long_rows = bits == 4 and k > 4096
    if block_k is None:
        sizes = ((2048,) if long_rows else ()) + (1024, 512, 256, 128)
        block_k = _block_k(k, 0, bits) if bits != 4 else next((size for size in sizes if k % size == 0), 128)
    assert k % block_k == 0, (k, block_k)
    modes = row_modes() if bits == 4 else (False, False)
    default_quads, default_prefetch = modes if modes is not None else (True, n < 16384)
    return (block_k, block_n or (16 if long_rows else 8), num_warps or (8 if long_rows else 4),
            default_quads if x_quads is None else x_quads, default_prefetch if prefetch is None else prefetch)


def quads_allowed(x: torch.Tensor, bits: int) -> bool:
    """Whether the one-token kernel may read x as int64 words of four bfloat16 (X_QUADS): int4 codes, bfloat16 x
    whose row starts on an 8-byte boundary (its chunks, multiples of 128 features, then do too)."""
    return bits == 4 and x.dtype == torch.bfloat16 and x.data_ptr() % 8 == 0


def _row_group_config(k: int, group: int, block_k: int | None = None, block_n: int = 8,
                      num_warps: int = 8):
    """(BLOCK_K, BLOCK_N, num_warps) of the one-token group-wise kernel: chunks of whole groups, 1024 features
    when they tile K (the best of a sweep over Llama-3.1-8B's four linears, int4 group 128, on an H100)."""
    if block_k is None:
        block_k = next((size for size in (1024, 512, 256) if size % group == 0 and k % size == 0), group)
    assert k % block_k == 0 and block_k % group == 0, (k, group, block_k)
    return block_k, block_n, num_warps


def gemv_preferred(rows: int, group_size: int | None) -> bool:
    """Whether the GEMV beats dequantize + matmul (_kernels/weight_only_dequant.py) at this many rows: measured on
    an H100 over Llama-3.1-8B's four linears, per-channel scales up to 4 rows, group-wise ones at one row only."""
    return rows <= (1 if group_size else 4)


def gemv_supported(rows: int, in_features: int, bits: int, group_size: int | None) -> bool:
    """Whether weight_only_gemv takes this product (else: the dequantize + matmul reference)."""
    block_k = _block_k(in_features, group_size or 0, bits)
    pow2 = block_k & (block_k - 1) == 0
    return (rows <= MAX_ROWS and bits in (4, 8) and pow2 and block_k >= 16 and in_features % block_k == 0
            and (not group_size or group_size % block_k == 0))


def weight_only_gemv(
    x: torch.Tensor,  # [M, K], M <= MAX_ROWS, last axis contiguous
    qweight: torch.Tensor,  # [N, K] int8 (bits 8) or [N, K/2] packed int4
    scale: torch.Tensor,  # [N] or [N, K / group_size]
    bias: torch.Tensor | None,  # [N]
    bits: int,
    group_size: int | None = None,
    zero_point: torch.Tensor | None = None,  # shaped as scale: w = (q - zero_point) * scale
    **tune,  # block_k / block_n / num_warps (one token, per channel: x_quads / prefetch too) overrides, for tuning
) -> torch.Tensor:  # [M, N] in x's dtype
    m, k = x.shape
    n = qweight.shape[0]
    assert m <= MAX_ROWS and x.stride(1) == 1 and qweight.is_contiguous() and scale.is_contiguous()
    assert zero_point is None or zero_point.is_contiguous()
    group = group_size or 0
    assert gemv_supported(m, k, bits, group_size), (m, k, bits, group_size)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    stride_sn = scale.stride(0) if scale.dim() == 2 else 1
    zero = scale if zero_point is None else zero_point
    if m == 1 and group:
        block_k, block_n, warps = _row_group_config(k, group, **tune)
        w = qweight.view(torch.int32) if bits == 4 else qweight  # int4: words of 8 codes
        _gemv_row_group_kernel[(triton.cdiv(n, block_n),)](
            x, w, scale, zero, x if bias is None else bias, out, n, k, w.stride(0), stride_sn, MAGIC,
            BITS=bits, GROUP=group, HAS_ZERO=zero_point is not None, HAS_BIAS=bias is not None,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
        return out
    if m == 1:
        block_k, block_n, warps, x_quads, prefetch = _row_config(k, n, bits, **tune)
        w = qweight.view(torch.int32) if bits == 4 else qweight  # int4: words of 8 codes
        _gemv_row_kernel[(triton.cdiv(n, block_n),)](
            x, w, scale, zero, x if bias is None else bias, out, n, k, w.stride(0), MAGIC,
            BITS=bits, HAS_ZERO=zero_point is not None, HAS_BIAS=bias is not None,
            BLOCK_N=block_n, BLOCK_K=block_k, X_QUADS=x_quads and quads_allowed(x, bits), PREFETCH=prefetch,
            num_warps=warps)
        return out
    block_k, block_n, warps = _config(k, group, bits, **tune)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, qweight, scale, zero, x if bias is None else bias, out,
        m, n, k, x.stride(0), qweight.stride(0), stride_sn, out.stride(0), MAGIC,
        BITS=bits, GROUP=group, HAS_ZERO=zero_point is not None, HAS_BIAS=bias is not None,
        BLOCK_M=max(1, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )
    return out
