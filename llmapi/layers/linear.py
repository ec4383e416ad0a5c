"""One-token products of float linears through the Triton GEMV (_kernels/gemv.py) instead of cuBLAS.

On by default for a model on a GPU (ModelRunner calls use_triton_gemv): on an H100 bs 1 decode of Llama-3.1-8B shapes
ran 172-174 output tok/s through it against cuBLAS's 160-161, alternating on one machine.
`LLMAPI_ONE_TOKEN_GEMV=cublas` in the environment of the process that loads the model keeps F.linear
(`llmapi bench --concurrency 1` times either); `python -m llmapi.bench_kernels --gemv` compares the kernels alone.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

from llmapi.layers.dispatch import use_triton

GEMV_ENV = "LLMAPI_ONE_TOKEN_GEMV"
GEMV_CHOICES = ("cublas", "triton")


class GemvLinear(nn.Linear):
    """nn.Linear whose one-row products (a bs 1 decode step) of bfloat16 / float16 run the Triton GEMV; every
    other product is F.linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] == 1 and use_triton(x):
            from llmapi._kernels.gemv import gemv, gemv_supported

            if gemv_supported(x, self.weight):
                return gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def one_token_gemv() -> str:
    """GEMV_ENV's choice ("triton" when unset); ValueError naming a value that is not one."""
    choice = os.environ.get(GEMV_ENV, "") or "triton"
    if choice not in GEMV_CHOICES:
        raise ValueError(f"{GEMV_ENV}={choice!r} is invalid: must be one of {', '.join(GEMV_CHOICES)}")
    return choice


def use_triton_gemv(model: nn.Module) -> int:
    """Every plain nn.Linear of `model` (not the quantized ones, which have their own kernels) becomes a
    GemvLinear, in place; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = GemvLinear
            count += 1
    return count
