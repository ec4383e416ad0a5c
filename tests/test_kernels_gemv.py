"""The Triton one-token GEMV of float linears vs a float64 product of the same weights, and what it refuses."""

import pytest
import torch
from kernel_cases import DEVICE, REL_ERROR, rel_error

triton = pytest.importorskip("triton")

from llmapi._kernels.gemv import gemv, gemv_config, gemv_supported  # noqa: E402

interpreted = pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU the kernel runs compiled: pytest -m gpu")

CASES = [  # out features, in features, bias, dtype, tiling overrides
    (40, 256, False, torch.bfloat16, {}),
    (17, 96, True, torch.float16, {}),  # rows not a multiple of the block, K of 32-feature chunks
    (24, 2048, True, torch.bfloat16, {"block_n": 4, "block_k": 512}),  # four chunks
    (9, 48, False, torch.bfloat16, {"block_n": 16}),  # fewer rows than one block
]


def check(n, k, bias, dtype, tune, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(1, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    dev = (lambda t: None if t is None else t.to(DEVICE))
    out = gemv(dev(x), dev(w), dev(b), **tune)
    assert out.dtype == dtype and out.shape == (1, n)
    assert rel_error(out.cpu(), ref) < REL_ERROR[dtype]


@interpreted
@pytest.mark.parametrize("case", CASES)
def test_gemv_interpreted(case):
    check(*case)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
@pytest.mark.parametrize("case", CASES + [(6144, 4096, False, torch.bfloat16, {}),
                                          (4096, 14336, True, torch.bfloat16, {"block_k": 2048, "num_warps": 8})])
def test_gemv_gpu(case):
    for seed in range(3):
        check(*case, seed=seed)


def test_gemv_supported_and_config():
    x, w = torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.bfloat16)
    assert gemv_supported(x, w)
    assert not gemv_supported(torch.zeros(2, 64, dtype=torch.bfloat16), w)  # two rows
    assert not gemv_supported(x.float(), w.float())  # float32: cuBLAS's
    assert not gemv_supported(x, w.half())  # mixed dtypes
    assert not gemv_supported(x[:, :40], w[:, :40])  # K not a multiple of 16
    assert not gemv_supported(x, w.t().contiguous().t())  # weights' rows not contiguous
    assert gemv_config(14336) == (16, 1024, 8) and gemv_config(96) == (16, 32, 8)
    assert gemv_config(4096, block_n=4, block_k=512, num_warps=8) == (4, 512, 8)
    with pytest.raises(AssertionError):
        gemv(torch.zeros(2, 64, dtype=torch.bfloat16), w)
