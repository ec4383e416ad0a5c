"""Triton weight-only matmul for a few to a few hundred rows: int8 or packed int4 tiles dequantized in registers
to the model dtype, then tensor-core dots.

Reference: weight_only.weight_only_linear_ref (dequantize to the model dtype, then matmul); each weight is
rounded to the model dtype exactly as the reference's, so the two differ only in the order of the float32 sums.
Between the one-token GEMV (weight_only_gemv) and dequantize + cuBLAS for long prefills, this reads the weights
once at 4 (or 8) bits instead of writing and re-reading them at 16.
"""

import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Triton's CPU interpreter multiplies bfloat16 dot operands wrongly (3.7): there the dots run in float32, which
holds every bfloat16 and float16 product exactly."""


@triton.jit(do_not_specialize=["M"])  # one compile for every row count of a tile size
def _matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                   stride_om, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    # BLOCK_K features per step, within one group when GROUP > 0. Packed int4 is read as int32 words of 8 codes:
    # nibble j of word c is feature 8c + j (little-endian), so [BN, BK/8, 8] nibbles reshape to [BN, BK].
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(0)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rows_m < M, rows_n < N
    feats = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GROUP == 0:
        s = tl.load(s_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)  # [BN]
        if HAS_ZERO:
            z = tl.load(z_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + (k0 + feats)[None, :], mask=mask_m[:, None],
                    other=0.0)  # [BM, BK]
        if BITS == 4:
            words = tl.load(w_ptr + rows_n[:, None] * stride_wn + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :],
                            mask=mask_n[:, None], other=0)  # [BN, BK/8] int32
            shifts = 28 - 4 * tl.arange(0, 8)
            q = tl.reshape((words[:, :, None] << shifts[None, None, :]) >> 28, (BLOCK_N, BLOCK_K))
        else:
            q = tl.load(w_ptr + rows_n[:, None] * stride_wn + (k0 + feats)[None, :], mask=mask_n[:, None],
                        other=0).to(tl.int32)  # [BN, BK]
        if GROUP > 0:
            g = k0 // GROUP
            s = tl.load(s_ptr + rows_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + rows_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
        w = q.to(tl.float32)
        if HAS_ZERO:
            w = w - z[:, None]
        w = (w * s[:, None]).to(x_ptr.dtype.element_ty, fp_downcast_rounding="rtne")  # as the reference rounds
        if IEEE:  # float32 products to float32 sums, not TF32
            acc = tl.dot(x.to(tl.float32), tl.trans(w).to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    # The reference rounds the product to the model dtype before the bias, as F.linear with a bias does not;
    # adding in float32 then rounding once differs from it by at most one rounding.
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows_m[:, None] * stride_om + rows_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _config(m: int, k: int, group: int, block_m: int | None = None, block_n: int = 64, block_k: int | None = None,
            num_warps: int = 4, num_stages: int | None = None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by row count, the best of a sweep over Llama-3.1-8B's four
    linears (int4 per channel, 16 and 128 rows) on an H100; BLOCK_K never spans two groups."""
    if block_m is None:
        block_m = 16 if m <= 16 else 64
    if block_k is None:
        block_k = next(size for size in (128, 64, 32, 16) if k % size == 0 and (not group or group % size == 0))
    assert k % block_k == 0 and (not group or group % block_k == 0), (k, group, block_k)
    return block_m, block_n, block_k, num_warps, num_stages or (4 if m <= 16 else 3)


def matmul_supported(in_features: int, bits: int, group_size: int | None) -> bool:
    """Whether weight_only_matmul takes weights of this shape (else: dequantize + matmul)."""
    group = group_size or 0
    return (bits in (4, 8) and in_features % 16 == 0
            and (not group or (group % 16 == 0 and group & (group - 1) == 0)))


def matmul_preferred(rows: int, bits: int, group_size: int | None) -> bool:
    """Whether this kernel beats both the GEMV and dequantize + cuBLAS at this many rows, as measured on an H100
    over Llama-3.1-8B's four linears: int4 per channel from 4 to 128 rows (at 4-64 rows within 10% of bf16
    cuBLAS, 1.8x faster than dequantize + matmul). Group-wise scales reloaded every step make it slower than
    dequantize + matmul there, and int8 was not measured: both keep the other paths."""
    return bits == 4 and not group_size and 4 <= rows <= 128


def weight_only_matmul(
    x: torch.Tensor,  # [M, K], last axis contiguous
    qweight: torch.Tensor,  # [N, K] int8 (bits 8) or [N, K/2] packed int4
    scale: torch.Tensor,  # [N] or [N, K / group_size]
    bias: torch.Tensor | None,  # [N]
    bits: int,
    group_size: int | None = None,
    zero_point: torch.Tensor | None = None,  # shaped as scale: w = (q - zero_point) * scale
    **tune,  # block_m / block_n / block_k / num_warps / num_stages overrides (for tuning)
) -> torch.Tensor:  # [M, N] in x's dtype
    m, k = x.shape
    n = qweight.shape[0]
    assert x.stride(1) == 1 and qweight.is_contiguous() and scale.is_contiguous()
    assert zero_point is None or zero_point.is_contiguous()
    assert matmul_supported(k, bits, group_size), (k, bits, group_size)
    group = group_size or 0
    block_m, block_n, block_k, warps, stages = _config(m, k, group, **tune)
    w = qweight.view(torch.int32) if bits == 4 else qweight  # int4: words of 8 codes
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _matmul_kernel[grid](
        x, w, scale, scale if zero_point is None else zero_point, x if bias is None else bias, out,
        m, n, k, x.stride(0), w.stride(0), scale.stride(0) if scale.dim() == 2 else 1, out.stride(0),
        BITS=bits, GROUP=group, HAS_ZERO=zero_point is not None, HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32 or _INTERPRETED, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)
    return out
