"""Activations by their Hugging Face names (same formulas, so outputs match), and the gated act-and-mul."""

import math

import torch
import torch.nn.functional as F

from llmapi.errors import UnsupportedModelError
from llmapi.layers.dispatch import use_triton


def _gelu_tanh_python(x: torch.Tensor) -> torch.Tensor:
    # GPT-2's original formula; F.gelu(approximate="tanh") differs from it in the last bits.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    # transformers' FastGELUActivation (SantaCoder's remote-code config): the tanh approximation, written its way.
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh_python,
    "gelu_python_tanh": _gelu_tanh_python,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: torch.square(F.relu(x)),  # squared ReLU (Nemotron, NeMo's "squared-relu")
    "gelu_fast": _gelu_fast,
}


def fused_input_scale(linear, x: torch.Tensor) -> torch.Tensor | None:
    """The static E4M3 input scale of `linear` (an FP8 linear: its `static_input_scale`) when the Triton
    kernel producing its input `x` can quantize as it writes (RMSNorm, SiLU-and-mul); None otherwise."""
    scale = getattr(linear, "static_input_scale", None)
    return scale if scale is not None and use_triton(x) else None


def get_activation(name: str):
    """The activation function named `name` in a Hugging Face config (hidden_act / activation_function)."""
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def act_and_mul(x: torch.Tensor, act, quant_scale: torch.Tensor | None = None):  # [T, 2*I] -> [T, I]
    """Gated MLP input: act(gate) * up, where x holds gate then up along the last axis. `quant_scale` (the
    next FP8 linear's static input scale) makes the Triton SiLU kernel write its E4M3 input (an Fp8Input);
    other paths ignore it."""
    if use_triton(x) and act is F.silu:
        from llmapi._kernels.activation import silu_and_mul

        return silu_and_mul(x, quant_scale)
    gate, up = x.chunk(2, dim=-1)  # each [T, I]
    return act(gate) * up
