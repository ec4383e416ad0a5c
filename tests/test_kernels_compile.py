"""The Triton kernels compile for sm_90 (H100) on a machine with no GPU (sm90_compile.py, in a subprocess
without TRITON_INTERPRET, which the other kernel tests set)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    lines = run.stdout.splitlines()
    # attention: 2 caches x 2 outputs x (2 decode + merge + packed), FP8 attention x 2 outputs x 2 tilings, 2 caches
    # x the long tiling, windowed decode and packed; encoder-decoder attention: biased decode and packed, 2 packed
    # cross, 2 varlen; argmax x 3 dtypes; rms_norm, silu, layer_norm x 2; rotary x 3; LoRA shrink and expand x 2;
    # the one-token int4 GEMVs (per channel, with quads and prefetch, group-wise), whose PTX has no int-to-float
    # conversion, and the bf16 GEMV, whose weight loads are 16 bytes wide
    assert len(lines) == 2 * 2 * 4 + 2 * 2 + 2 + 2 + 6 + 3 + 3 * 2 + 3 + 2 * 2 + 3 + 1 and all(line.endswith(" bytes") and int(line.split()[-2]) > 0 for line in lines), lines
