"""GPTQ's error feedback: round a weight column by column, spreading each column's rounding error over the
columns not yet rounded so that the output error over the calibration tokens ends lower than rounding to nearest.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
Algorithm 1 (lazy batches of columns, the Cholesky factor of H^-1). For y = x W^T and H = mean over tokens of
x^T x ([K, K], ActivationStats.input_hessian), the output error of a weight error D [N, K] is tr(D H D^T); the
rounding of any format plugs in as `round_column`: int4 groups for AWQ (llmapi.quantization.awq), E4M3 for FP8
(llmapi.quantization.fp8).
"""

from __future__ import annotations

from typing import Callable

import torch

DAMP = 0.01
"""This fraction of H's mean diagonal is added to its diagonal (H may be singular)."""
BLOCK = 128
"""Columns rounded between two updates of the columns after them (GPTQ's lazy batch)."""

RoundColumn = Callable[[torch.Tensor, int], torch.Tensor]
"""(w [N, K] float32 as updated so far, column j) -> column j rounded onto the format's grid, [N] float32. It
may read the columns after j (to set a group's scale when j starts a group) and record its codes itself."""


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error over the tokens, summed over output channels: tr(D H D^T)."""
    return float(((delta @ hessian) * delta).sum())


def error_feedback_round(weight: torch.Tensor, hessian: torch.Tensor, round_column: RoundColumn,
                         damp: float = DAMP, block: int = BLOCK) -> torch.Tensor:
    """Round weight [N, K] column by column with `round_column`, feeding each error forward under H [K, K];
    returns the rounded weight [N, K] float32. A column no token excites (H_jj = 0) is rounded on its own."""
    w = weight.float().clone()
    n, k = w.shape
    h = hessian.float().to(w.device).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(k, device=w.device)
    # Upper Cholesky factor of H^-1: row j holds what column j's error does to the columns after it.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    rounded = torch.empty_like(w)
    for start in range(0, k, block):
        end = min(start + block, k)
        errors = torch.empty(n, end - start, device=w.device)
        for j in range(start, end):
            rounded[:, j] = round_column(w, j)
            err = (w[:, j] - rounded[:, j]) / hinv[j, j]
            w[:, j:end] -= err[:, None] * hinv[j, j:end][None, :]
            errors[:, j - start] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    return rounded
