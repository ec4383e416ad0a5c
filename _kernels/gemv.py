"""Triton GEMV for one token through a float (bfloat16 / float16) linear: y = x W^T (+ b), x [1, K], W [N, K].

At one token the product is bound by reading W. Each program holds BLOCK_N rows of W and walks K in chunks of
BLOCK_K, keeping its threads' partial products in registers and reducing them once at the end (the layout of
weight_only_gemv's one-token kernels, without the codes' decode). A model's float linears on a GPU take it for bs 1
decode instead of cuBLAS (F.linear) unless LLMAPI_ONE_TOKEN_GEMV=cublas (llmapi.layers.linear);
`python -m llmapi.bench_kernels --gemv` times both on Llama-3.1-8B's linears.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = tl.load(w_ptr + rows[:, None] * stride_wn + (k0 + cols)[None, :], mask=mask[:, None], other=0.0)
        x = tl.load(x_ptr + k0 + cols).to(tl.float32)  # [BK]
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)  # [BN]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=mask)


def gemv_config(k: int, block_n: int | None = None, block_k: int | None = None, num_warps: int = 8
                ) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): by default 16 rows a program, 8 warps and the longest power-of-two chunk up to
    1024 features that tiles K (on an H100 this beat 8 rows / 4 warps and cuBLAS on all of Llama-3.1-8B's linears)."""
    if block_k is None:
        block_k = next((size for size in (1024, 512, 256, 128, 64, 32, 16) if k % size == 0), 0)
    return block_n or 16, block_k, num_warps


def gemv_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether gemv takes this product: one row, float weights of x's dtype, K a multiple of 16, contiguous."""
    return (x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.dim() == 2 and weight.shape[1] == x.shape[1]
            and x.shape[1] % 16 == 0 and weight.stride(1) == 1 and x.is_contiguous())


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
         **tune) -> torch.Tensor:
    """[1, K] x [N, K] (+ [N]) -> [1, N] in x's dtype, accumulated in float32, as F.linear(x, weight, bias) (which
    may round the product before adding the bias: the two differ by one rounding at most). `tune`: block_n /
    block_k / num_warps overrides."""
    assert gemv_supported(x, weight), (tuple(x.shape), x.dtype, tuple(weight.shape), weight.dtype)
    n, k = weight.shape
    block_n, block_k, warps = gemv_config(k, **tune)
    assert k % block_k == 0, (k, block_k)
    if out is None:
        out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, x if bias is None else bias, out, n, k, weight.stride(0),
                                             HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                                             num_warps=warps)
    return out
