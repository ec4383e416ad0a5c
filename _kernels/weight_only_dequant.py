"""Triton dequantization of int8 / packed int4 weights into the model dtype, for products of more rows than
the GEMV takes (prefill): dequantize once, then one cuBLAS matmul.

Reference: weight_only.dequantize_ref. Both compute (q - zero_point) * scale in float32 (exact: a small integer
times a scale of the model dtype) and round once to the output dtype, so the results are bit-identical.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_qn, stride_sn, stride_on,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, TILED: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One tile of BLOCK_N rows x BLOCK_K input features; GROUP 0: one scale per row. TILED (int4, a power-of-two
    # GROUP dividing BLOCK_K): the tile's groups are loaded once, [BN, BLOCK_K / GROUP], and broadcast over their
    # features; otherwise each feature gathers its group's scale.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = rows < N
    if BITS == 4:
        HALF: tl.constexpr = BLOCK_K // 2
        cols = tl.program_id(1) * HALF + tl.arange(0, HALF)  # [BK/2] packed bytes
        mask = mask_n[:, None] & (cols < K // 2)[None, :]
        packed = tl.load(q_ptr + rows[:, None] * stride_qn + cols[None, :], mask=mask, other=0).to(tl.int32)
        lo = ((packed << 28) >> 28).to(tl.float32)  # even features (low nibbles), sign-extended
        hi = (packed >> 4).to(tl.float32)  # odd features
        feature = 2 * cols  # the pair's even feature; both features of a byte share a group (GROUP is even)
        if TILED:
            NG: tl.constexpr = BLOCK_K // GROUP
            GW: tl.constexpr = GROUP // 2
            g = tl.program_id(1) * NG + tl.arange(0, NG)  # [NG]
            gmask = mask_n[:, None] & (g < K // GROUP)[None, :]
            s3 = tl.load(s_ptr + rows[:, None] * stride_sn + g[None, :], mask=gmask, other=0.0).to(tl.float32)
            lo3 = tl.reshape(lo, (BLOCK_N, NG, GW))
            hi3 = tl.reshape(hi, (BLOCK_N, NG, GW))
            if HAS_ZERO:
                z3 = tl.load(z_ptr + rows[:, None] * stride_sn + g[None, :], mask=gmask, other=0.0).to(tl.float32)
                lo3, hi3 = lo3 - z3[:, :, None], hi3 - z3[:, :, None]
            lo = tl.reshape(lo3 * s3[:, :, None], (BLOCK_N, HALF))
            hi = tl.reshape(hi3 * s3[:, :, None], (BLOCK_N, HALF))
            s = 1.0
        elif GROUP > 0:
            g = feature // GROUP
            s = tl.load(s_ptr + rows[:, None] * stride_sn + g[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + rows[:, None] * stride_sn + g[None, :], mask=mask, other=0.0).to(tl.float32)
                lo, hi = lo - z, hi - z
        else:
            s = tl.load(s_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            if HAS_ZERO:
                z = tl.load(z_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)[:, None]
                lo, hi = lo - z, hi - z
        w = tl.reshape(tl.join(lo * s, hi * s), (BLOCK_N, BLOCK_K))  # features in order: lo, hi, lo, hi, ...
        out_cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    else:
        out_cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (out_cols < K)[None, :]
        w = tl.load(q_ptr + rows[:, None] * stride_qn + out_cols[None, :], mask=mask, other=0).to(tl.float32)
        if GROUP > 0:
            g = out_cols // GROUP
            s = tl.load(s_ptr + rows[:, None] * stride_sn + g[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                w = w - tl.load(z_ptr + rows[:, None] * stride_sn + g[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            s = tl.load(s_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            if HAS_ZERO:
                w = w - tl.load(z_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        w = w * s
    out_mask = mask_n[:, None] & (out_cols < K)[None, :]
    w = w.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")  # round to nearest even, as torch
    tl.store(out_ptr + rows[:, None] * stride_on + out_cols[None, :], w, mask=out_mask)


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int | None = None,
                      zero_point: torch.Tensor | None = None, block_n: int = 16, block_k: int = 512
                      ) -> torch.Tensor:  # -> [N, K] in scale's dtype
    """dequantize_ref(qweight, scale, bits, group_size, None, zero_point) as one Triton kernel. The default tile
    (16 rows x 512 features) is the best or within 5% of it on Llama-3.1-8B's linears (H100: 2.1-2.6 TB/s)."""
    assert bits in (4, 8) and qweight.is_contiguous() and scale.is_contiguous()
    assert zero_point is None or zero_point.is_contiguous()
    n = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    group = group_size or 0
    assert group == 0 or (k % group == 0 and group % 2 == 0), (k, group)
    tiled = bits == 4 and group >= 2 and group & (group - 1) == 0
    if tiled:
        block_k = max(block_k, group)
    out = torch.empty(n, k, dtype=scale.dtype, device=qweight.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_kernel[grid](qweight, scale, scale if zero_point is None else zero_point, out, n, k,
                          qweight.stride(0), scale.stride(0) if scale.dim() == 2 else 1, out.stride(0),
                          BITS=bits, GROUP=group, HAS_ZERO=zero_point is not None, TILED=tiled,
                          BLOCK_N=block_n, BLOCK_K=block_k)
    return out
