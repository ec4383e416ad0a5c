"""Triton weight-only GEMV (int8, packed int4; per channel or per group; GPTQ zero points) vs the
dequantize-then-matmul reference, and the Triton dequantization vs the reference's, on fresh random inputs."""

import pytest
import torch
from kernel_cases import DEVICE, REL_ERROR, rel_error

from llmapi import QuantConfig
from llmapi._kernels.weight_only import dequantize_ref, quantize_weight_ref, weight_only_linear_ref
from llmapi.quantization.weight_only import WeightOnlyLinear

triton = pytest.importorskip("triton")

from llmapi._kernels.weight_only_dequant import dequantize_weight  # noqa: E402
from llmapi._kernels.weight_only_gemv import (ROW_MODES_ENV, _row_config, gemv_supported, quads_allowed,  # noqa: E402
                                              row_modes, weight_only_gemv)
from llmapi._kernels.weight_only_matmul import matmul_preferred, matmul_supported, weight_only_matmul  # noqa: E402

interpreted = pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU the kernel runs compiled: pytest -m gpu")
CASES = [  # rows, out features, in features, bits, group size, zero points, bias, dtype
    (1, 40, 256, 4, None, False, False, torch.bfloat16),
    (3, 24, 128, 4, 64, True, True, torch.float16),
    (8, 17, 256, 8, None, True, False, torch.float32),
    (2, 32, 256, 8, 128, False, True, torch.bfloat16),
    (5, 16, 64, 4, 32, True, False, torch.float32),
    (1, 24, 256, 4, 64, True, True, torch.float32),  # one row: its own kernels (per channel, per group)
    (1, 20, 2048, 4, 128, True, False, torch.bfloat16),  # one row, chunks of 8 groups, two chunks
    (1, 12, 512, 8, 64, False, True, torch.float16),
    (1, 9, 96, 4, 32, True, True, torch.float32),  # no chunk of several groups tiles K: one group a chunk
    (1, 20, 256, 8, None, True, True, torch.float16),
    (1, 24, 6144, 4, None, True, True, torch.float32),  # one row per channel, 2048-feature chunks
]


def check(rows, n, k, bits, group, zero, bias, dtype, seed=0, kernel="gemv", **tune):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    q, scale = quantize_weight_ref(w, bits, group)
    scale = scale.to(dtype)
    zp = (torch.randint(-2, 3, scale.shape, generator=g).to(dtype) if zero else None)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, k, generator=g).to(dtype)
    # float64 reference of the same quantized weights: the kernel accumulates in float32.
    ref = weight_only_linear_ref(x.double(), q, scale.double(), None if b is None else b.double(), bits, group,
                                 None if zp is None else zp.double())
    dev = (lambda t: None if t is None else t.to(DEVICE))
    if kernel == "gemv":
        assert gemv_supported(rows, k, bits, group)
        out = weight_only_gemv(dev(x), dev(q), dev(scale), dev(b), bits, group, dev(zp), **tune)
    else:
        assert matmul_supported(k, bits, group)
        out = weight_only_matmul(dev(x), dev(q), dev(scale), dev(b), bits, group, dev(zp))
    assert out.dtype == dtype and out.shape == (rows, n)
    assert rel_error(out.cpu(), ref) < REL_ERROR[dtype]


@interpreted
@pytest.mark.parametrize("case", CASES)
def test_weight_only_gemv_interpreted(case):
    check(*case)


ROW_MODE_CASES = [  # one token, per channel, with X_QUADS and / or PREFETCH asked for: (case, tune)
    ((1, 40, 256, 4, None, False, False, torch.bfloat16), {}),  # one chunk: the prefetch of a chunk past K masked
    ((1, 24, 6144, 4, None, True, True, torch.bfloat16), {}),  # three 2048-feature chunks, zero points, bias
    ((1, 20, 2048, 4, None, True, False, torch.bfloat16), {"block_k": 512, "block_n": 16}),  # four chunks
    ((1, 24, 6144, 4, None, True, True, torch.float32), {}),  # float32 x: no quads (dropped), prefetch kept
    ((1, 20, 256, 8, None, True, True, torch.float16), {"block_k": 128}),  # int8: prefetch only
]


def check_row_modes(case, tune):
    for x_quads, prefetch in ((True, False), (False, True), (True, True)):
        check(*case, x_quads=x_quads, prefetch=prefetch, **tune)


@interpreted
@pytest.mark.parametrize("case,tune", ROW_MODE_CASES)
def test_weight_only_gemv_row_modes_interpreted(case, tune):
    check_row_modes(case, tune)


@pytest.mark.gpu
@pytest.mark.parametrize("case,tune", ROW_MODE_CASES + [((1, 6144, 4096, 4, None, False, False, torch.bfloat16), {}),
                                                       ((1, 4096, 14336, 4, None, True, False, torch.bfloat16), {})])
def test_weight_only_gemv_row_modes_gpu(case, tune):
    check_row_modes(case, tune)


def test_row_modes_from_the_environment(monkeypatch):
    monkeypatch.delenv(ROW_MODES_ENV, raising=False)
    assert row_modes() is None  # the defaults: quads on, the prefetch on all but wide outputs
    assert _row_config(4096, 6144, 4)[3:] == (True, True) and _row_config(4096, 28672, 4)[3:] == (True, False)
    assert _row_config(14336, 4096, 4) == (2048, 16, 8, True, True)
    assert _row_config(4096, 6144, 8)[3:] == (False, False)  # int8: neither
    monkeypatch.setenv(ROW_MODES_ENV, "prefetch, quads")
    assert row_modes() == (True, True)
    monkeypatch.setenv(ROW_MODES_ENV, "none")
    assert row_modes() == (False, False) and _row_config(4096, 6144, 4)[3:] == (False, False)
    assert _row_config(4096, 6144, 4, x_quads=True)[3:] == (True, False)  # an argument beats the environment
    for bad, named in (("quads,prefech", "'prefech' is not"), ("none,quads", "'none' is not")):
        monkeypatch.setenv(ROW_MODES_ENV, bad)
        with pytest.raises(ValueError, match=named):
            row_modes()


def test_quads_allowed_needs_bfloat16_int4_and_8_byte_alignment():
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    assert quads_allowed(x, 4) and not quads_allowed(x, 8) and not quads_allowed(x.half(), 4)
    assert not quads_allowed(torch.zeros(300, dtype=torch.bfloat16)[1:257].view(1, 256), 4)  # 2-byte offset


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES + [(1, 6144, 4096, 4, 128, False, False, torch.bfloat16),
                                          (4, 4096, 14336, 4, None, False, False, torch.bfloat16),
                                          (1, 28672, 4096, 4, None, True, False, torch.bfloat16)])
def test_weight_only_gemv_gpu(case):
    for seed in range(3):
        check(*case, seed=seed)


MATMUL_CASES = [  # rows, out features, in features, bits, group size, zero points, bias, dtype
    (5, 24, 256, 4, None, False, True, torch.bfloat16),
    (20, 70, 512, 4, None, True, False, torch.float32),  # rows and features not multiples of the tiles
    (33, 40, 256, 4, 64, True, True, torch.float16),
    (7, 17, 256, 8, None, True, False, torch.bfloat16),
    (70, 24, 384, 8, 128, False, True, torch.float32),
]


@interpreted
@pytest.mark.parametrize("case", MATMUL_CASES)
def test_weight_only_matmul_interpreted(case):
    check(*case, kernel="matmul")


@pytest.mark.gpu
@pytest.mark.parametrize("case", MATMUL_CASES + [(16, 4096, 14336, 4, None, False, False, torch.bfloat16),
                                                 (128, 6144, 4096, 4, None, True, True, torch.bfloat16)])
def test_weight_only_matmul_gpu(case):
    for seed in range(2):
        check(*case, seed=seed, kernel="matmul")


def test_matmul_routing():
    assert matmul_preferred(4, 4, None) and matmul_preferred(128, 4, None)
    assert not matmul_preferred(3, 4, None) and not matmul_preferred(129, 4, None)  # the GEMV; dequantize + matmul
    assert not matmul_preferred(16, 4, 128) and not matmul_preferred(16, 8, None)
    assert matmul_supported(4096, 4, None) and matmul_supported(4096, 4, 64) and not matmul_supported(4096, 4, 96)


def test_gemv_supported_shapes():
    assert gemv_supported(1, 4096, 4, 128) and gemv_supported(8, 4096, 8, None)
    assert not gemv_supported(9, 4096, 4, 128)  # more rows: dequantize + matmul
    assert not gemv_supported(1, 4096, 4, 96)  # a group that is not a power of two
    assert not gemv_supported(1, 100, 4, None)  # features not a multiple of the chunk


DEQUANT_CASES = [  # out features, in features, bits, group size, zero points, dtype
    (40, 256, 4, None, False, torch.bfloat16),
    (33, 384, 4, 128, True, torch.bfloat16),  # K not a multiple of the 512-feature tile, N of the 16-row tile
    (24, 192, 4, 64, False, torch.float16),
    (17, 320, 8, 64, True, torch.float32),
    (8, 100, 8, None, True, torch.bfloat16),
    (10, 192, 4, 96, True, torch.float32),  # a group that is not a power of two: each feature gathers its scale
    (6, 2048, 4, 1024, True, torch.float32),  # a group longer than the 512-feature tile
]


def check_dequant(n, k, bits, group, zero, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_weight_ref(torch.randn(n, k, generator=g), bits, group)
    scale = scale.to(dtype)
    zp = torch.randint(-3, 4, scale.shape, generator=g).to(dtype) if zero else None
    ref = dequantize_ref(q, scale, bits, group, None, zp)
    dev = (lambda t: None if t is None else t.to(DEVICE))
    out = dequantize_weight(dev(q), dev(scale), bits, group, dev(zp))
    assert out.dtype == dtype and out.shape == (n, k)
    if DEVICE == "cuda" or dtype != torch.bfloat16:
        assert torch.equal(out.cpu(), ref)  # the same float32 products, rounded once: bit-identical
    else:  # the interpreter rounds float32 to bfloat16 toward zero (CUDA and torch: to nearest even)
        torch.testing.assert_close(out.cpu(), ref, rtol=2 ** -7, atol=0)
        assert bool((out.float().abs() <= ref.float().abs()).all())


@interpreted
@pytest.mark.parametrize("case", DEQUANT_CASES)
def test_dequantize_weight_interpreted(case):
    check_dequant(*case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", DEQUANT_CASES + [(28672, 4096, 4, 128, True, torch.bfloat16)])
def test_dequantize_weight_gpu(case):
    for seed in range(2):
        check_dequant(*case, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [QuantConfig("W4A16"), QuantConfig("W8A16", group_size=64),
                                   QuantConfig("W4A16_AWQ", group_size=128)])
@pytest.mark.parametrize("rows", [1, 2, 5, 64, 200])
def test_weight_only_linear_on_gpu_every_path(quant, rows):
    """WeightOnlyLinear on CUDA (the GEMV for a few rows, the fused matmul for tens of int4 rows per channel,
    dequantize + matmul for more) vs the float64 reference."""
    g = torch.Generator().manual_seed(rows)
    n, k = 96, 512
    q, scale = quantize_weight_ref(torch.randn(n, k, generator=g), quant.bits, quant.group_size)
    linear = WeightOnlyLinear(torch.nn.Linear(k, n, dtype=torch.bfloat16), quant).cuda()
    params = {"weight": q, "weights_scaling_factor": scale.bfloat16(), "bias": torch.randn(n, generator=g).bfloat16()}
    if quant.has_zero_point:
        params["weights_zero_point"] = torch.randint(-3, 4, scale.shape, generator=g).bfloat16()
    if quant.pre_quant_scale:
        params["prequant_scaling_factor"] = (torch.rand(k, generator=g) + 0.5).bfloat16()
    with torch.no_grad():
        for name, value in params.items():
            getattr(linear, name).copy_(value)
    x = torch.randn(rows, k, generator=g).bfloat16()
    ref = weight_only_linear_ref(x.double(), q, params["weights_scaling_factor"].double(), params["bias"].double(),
                                 quant.bits, quant.group_size, params.get("weights_zero_point"),
                                 params.get("prequant_scaling_factor"))
    out = linear(x.cuda())
    assert out.dtype == torch.bfloat16 and rel_error(out.cpu(), ref) < REL_ERROR[torch.bfloat16]
