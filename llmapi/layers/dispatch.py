"""Which path a layer takes: the Triton kernels for CUDA tensors, the plain-torch references otherwise."""

import torch

TRITON_ON_CPU = False
"""Tests set this to run the kernels on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1)."""


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or TRITON_ON_CPU
