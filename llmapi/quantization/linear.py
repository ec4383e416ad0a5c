"""Bases of the quantized linears: tensor-parallel shards (every mode), and for W8A8 storage dtypes of their own."""

from __future__ import annotations

import torch
from torch import nn

from llmapi.distributed.tensor_parallel import cut_ranges
from llmapi.errors import UnsupportedModelError

_PER_OUTPUT = ("weight", "bias", "weights_scaling_factor", "weights_zero_point")
"""The parameters indexed by output feature along dim 0 (a per-tensor scale, one element, is not)."""


class ShardableLinear(nn.Module):
    """A quantized linear that may stand for a tensor-parallel one (distributed.tensor_parallel): `tp_split` is
    ("rows", ranges) for a column-parallel linear (this rank's output features) or ("cols", ranges) for a
    row-parallel one (its input features; `tp_comm` sums the partial products, then the bias is added once).
    Ranges are (start, length) in features of the full linear. Subclasses compute `product(x, bias)`."""

    tp_split: tuple[str, list[tuple[int, int]]] | None = None
    tp_comm = None

    def product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
        if self.tp_comm is None:
            return self.product(x, self.bias)
        y = self.tp_comm.all_reduce(self.product(x, None))
        return y if self.bias is None else y + self.bias

    def split_like(self, parallel: nn.Module) -> None:
        """Take the split of the ColumnParallelLinear / RowParallelLinear this module replaces (no-op for a plain
        linear); check_split has passed."""
        if hasattr(parallel, "rows"):
            self.tp_split = ("rows", list(parallel.rows))
        elif hasattr(parallel, "cols"):
            self.tp_split, self.tp_comm = ("cols", list(parallel.cols)), parallel.comm

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full engine tensor `full` of parameter `name` (distributed.sharding)."""
        if self.tp_split is None:
            return full
        kind, ranges = self.tp_split
        if kind == "rows":
            per_output = name in _PER_OUTPUT and full.numel() > 1
            return cut_ranges(full, 0, ranges) if per_output else full  # per-tensor scales, [K] prequant: whole
        if name == "prequant_scaling_factor":  # [K]
            return cut_ranges(full, 0, ranges)
        if name == "weight" or (name in ("weights_scaling_factor", "weights_zero_point") and full.dim() == 2):
            # [N, K], packed [N, K/2], or per group [N, K/group]: columns in proportion to the features
            per = getattr(self, name).shape[1] / sum(length for _, length in ranges)
            return cut_ranges(full, 1, [(int(start * per), int(length * per)) for start, length in ranges])
        return full  # bias (added after the sum), per-channel [N] and per-tensor [1] scales


def check_split(parallel: nn.Module, unit: int) -> None:
    """UnsupportedModelError unless each rank's input features of a row-parallel linear come in whole units:
    quantization groups, or int4's pairs of features (one byte)."""
    for start, length in getattr(parallel, "cols", ()):
        if start % unit or length % unit:
            raise UnsupportedModelError(
                f"tensor parallelism gives a rank input features {start}..{start + length} of a row-parallel "
                f"linear, which do not split into whole quantization groups of {unit} features: use fewer ranks "
                f"or a smaller group_size")


class QuantizedLinear(ShardableLinear):
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
