"""Base of the W8A8 linears: their float8/int8 weights and float32 scales keep their dtype when the model is cast."""

from __future__ import annotations

import torch
from torch import nn


class QuantizedLinear(nn.Module):
    """A linear whose parameters other than `bias` have storage dtypes of their own.

    `model.to(dtype)` (CausalLM.materialize casts every floating tensor, float8 included) must not turn an
    E4M3 weight or a float32 scale into the model dtype; device moves and `to_empty` still apply to them.
    """

    def _apply(self, fn, recurse=True):
        kept = {name: p for name, p in self._parameters.items() if name != "bias" and p is not None}
        for name in kept:
            del self._parameters[name]
        try:
            super()._apply(fn, recurse)
        finally:
            for name, p in kept.items():
                # Where `fn` sends a tensor, learned from an empty slice of it (free, whatever fn does).
                device = fn(p.detach().reshape(-1)[:0]).device
                data = torch.empty_like(p, device=device) if p.is_meta else p.detach().to(device)
                self._parameters[name] = nn.Parameter(data, requires_grad=False)
        return self
