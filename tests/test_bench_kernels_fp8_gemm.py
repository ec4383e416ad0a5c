"""`python -m llmapi.bench_kernels --fp8-gemm`: its row counts, the flagging of a row count slower than a larger one
(checked on hand-made timings), and on a GPU a sweep whose FLOP rates stay under the device's."""

import argparse

import pytest

from llmapi.bench_kernels import FP8_GEMM_ROWS, _rows, fp8_gemm_sweep, slower_than_larger
from llmapi.runtime.cuda_graph import GRAPH_BATCH_SIZES


def test_slower_than_larger():
    assert slower_than_larger({256: 10.0, 320: 12.0, 384: 14.0, 448: 20.0, 512: 18.0, 640: 22.0}) == [448]
    assert slower_than_larger({512: 9.0, 256: 10.0, 384: 8.0}) == [256]  # unordered keys; 384 beats 256
    assert slower_than_larger({256: 1.0, 512: 2.0, 1024: 4.0}) == []
    assert slower_than_larger({256: 5.0, 512: 5.0}) == []  # a tie pads for nothing but loses nothing


def test_default_rows_and_parsing():
    assert FP8_GEMM_ROWS == tuple(sorted(FP8_GEMM_ROWS))
    assert set(FP8_GEMM_ROWS) == {m for m in GRAPH_BATCH_SIZES if m >= 256} | {448}
    assert _rows("512,448,512") == [448, 512]
    for bad in ("0", "x", "256,-1", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            _rows(bad)


@pytest.mark.gpu
def test_fp8_gemm_sweep_runs(capsys):
    # Like the other FP8 GPU tests (test_quant_fp8.py), this one expects FP8 tensor cores (sm_89+: Ada, Hopper).
    assert fp8_gemm_sweep([256, 448, 512]) == 0
    out = capsys.readouterr().out
    rates = [float(line.split("us")[1].split("TFLOP/s")[0]) for line in out.splitlines() if "TFLOP/s" in line]
    assert len(rates) == 4 * 3  # four linears, three row counts
    assert all(0 < r < 5000 for r in rates), rates  # no dense FP8 GEMM on any GPU reaches 5 PFLOP/s
    assert out.count("slower than a larger row count") == 5
