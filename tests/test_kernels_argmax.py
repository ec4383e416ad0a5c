"""Triton row argmax vs torch.argmax: first index of the maximum, ties across and within chunks, NaN, -0/+0, inf."""

import pytest
import torch
from kernel_cases import DEVICE

triton = pytest.importorskip("triton")

from llmapi._kernels.argmax import CHUNK, row_argmax  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _cases(dtype):
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(r, v, generator=g).to(dtype) for r, v in ((1, 5), (3, CHUNK), (5, CHUNK + 1), (4, 10000))]
    x = torch.randn(6, 3 * CHUNK + 7, generator=g).to(dtype)
    x[0, [17, CHUNK + 3, 2 * CHUNK]] = 50  # ties in three chunks: the first
    x[1, [CHUNK + 9, CHUNK + 11]] = 50  # ties within one chunk
    x[2, 3 * CHUNK + 5] = 50  # in the partial last chunk
    x[3, [40, 2 * CHUNK + 1]] = float("nan")  # NaN counts as the largest: the first NaN
    x[3, 5] = float("inf")
    x[4] = -x[4].abs() - 1
    x[4, 9], x[4, CHUNK + 2] = -0.0, 0.0  # -0 == +0: the first
    x[5] = float("-inf")  # all -inf: index 0
    out.append(x)
    out.append(torch.full((2, 70), float("inf"), dtype=dtype))
    out.append(torch.empty(0, 100, dtype=dtype))
    return out


def check(dtype):
    for x in _cases(dtype):
        got = row_argmax(x.to(DEVICE)).cpu()
        assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1)), x.shape


@pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU the kernel runs compiled: the gpu test below")
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_argmax_interpreted(dtype):
    check(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_argmax_gpu(dtype):
    check(dtype)


def test_first_argmax_takes_the_kernel_where_triton_runs(monkeypatch):
    import llmapi._kernels.argmax as kernel
    import llmapi.layers.dispatch as dispatch
    from llmapi.runtime.sampler import first_argmax

    calls = []
    real = kernel.row_argmax
    monkeypatch.setattr(kernel, "row_argmax", lambda x: calls.append(x.shape) or real(x))
    x = torch.randn(3, 5000, generator=torch.Generator().manual_seed(1))
    x[1, [7, 4000]] = 9
    want = x.argmax(dim=-1)
    assert torch.equal(first_argmax(x), want) and not calls  # CPU tensors: torch's two-pass path
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
    assert torch.equal(first_argmax(x), want) and calls == [(3, 5000)]
