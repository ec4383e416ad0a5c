"""Tensor parallelism applied from outside: swap a model's linears and embeddings for sharded ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmapi.distributed.mapping import Mapping, local_kv_heads
from llmapi.models.gpt import layer_linears


def cut_ranges(full: torch.Tensor, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """The (start, length) ranges of `full` along `dim`, concatenated."""
    parts = [full.narrow(dim, start, length) for start, length in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _vocab_rows(vocab: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(first row, rows per rank): every rank holds ceil(V / tp) rows, the last one padded with zeros."""
    per = -(-vocab // tp_size)
    return tp_rank * per, per


def _pad_rows(full: torch.Tensor, start: int, per: int) -> torch.Tensor:  # [V, H] -> [per, H]
    rows = full[start:start + per]
    if rows.shape[0] == per:
        return rows
    pad = torch.zeros((per - rows.shape[0],) + tuple(full.shape[1:]), dtype=full.dtype, device=full.device)
    return torch.cat([rows, pad])


class ColumnParallelLinear(nn.Module):
    """A linear whose output features are split: this rank computes rows `rows` of W x + b, no communication."""

    def __init__(self, linear: nn.Linear, rows: list[tuple[int, int]]):
        super().__init__()
        self.rows = rows  # (start, length) in the full weight's rows, e.g. this rank's q, k and v heads
        out = sum(length for _, length in rows)
        w = linear.weight
        self.weight = nn.Parameter(torch.empty(out, w.shape[1], dtype=w.dtype, device=w.device))
        has_bias = linear.bias is not None
        self.bias = nn.Parameter(torch.empty(out, dtype=w.dtype, device=w.device)) if has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out / tp]
        return F.linear(x, self.weight, self.bias)

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return cut_ranges(full, 0, self.rows)


class RowParallelLinear(nn.Module):
    """A linear whose input features are split: partial products are summed over the TP group, then + bias."""

    def __init__(self, linear: nn.Linear, cols: list[tuple[int, int]], comm):
        super().__init__()
        self.cols, self.comm = cols, comm
        w = linear.weight
        self.weight = nn.Parameter(torch.empty(w.shape[0], sum(n for _, n in cols), dtype=w.dtype, device=w.device))
        self.bias = nn.Parameter(torch.empty_like(linear.bias, device=w.device)) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in / tp] -> [T, out]
        y = self.comm.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return cut_ranges(full, 1, self.cols) if name == "weight" else full  # the bias is added once, after the sum


class VocabParallelEmbedding(nn.Module):
    """Embedding split along the vocabulary (dim 0): each rank looks up its rows, zeros elsewhere, then a sum."""

    def __init__(self, embedding: nn.Embedding, tp_size: int, tp_rank: int, comm):
        super().__init__()
        self.start, self.per = _vocab_rows(embedding.num_embeddings, tp_size, tp_rank)
        self.comm = comm
        w = embedding.weight
        self.weight = nn.Parameter(torch.empty(self.per, w.shape[1], dtype=w.dtype, device=w.device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        local = ids - self.start
        mine = (local >= 0) & (local < self.per)  # [T]
        out = F.embedding(torch.where(mine, local, 0), self.weight)  # [T, H]
        return self.comm.all_reduce(out * mine[:, None].to(out.dtype))

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return _pad_rows(full, self.start, self.per)


class HiddenParallelEmbedding(nn.Module):
    """Embedding split along the hidden size (dim 1): each rank looks up its columns, then an all-gather."""

    def __init__(self, embedding: nn.Embedding, tp_size: int, tp_rank: int, comm):
        super().__init__()
        w = embedding.weight
        self.cols, self.comm = [(tp_rank * (w.shape[1] // tp_size), w.shape[1] // tp_size)], comm
        self.weight = nn.Parameter(torch.empty(w.shape[0], self.cols[0][1], dtype=w.dtype, device=w.device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        return self.comm.all_gather(F.embedding(ids, self.weight), dim=-1)  # [T, H / tp] gathered

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return cut_ranges(full, 1, self.cols)


class ParallelLMHead(nn.Module):
    """Vocab-parallel head: each rank's rows of the logits, all-gathered to [N, V].

    Tied to a VocabParallelEmbedding, it uses that embedding's shard (same rows) and owns no parameter;
    otherwise it owns its rows of `source`, the full engine tensor it is cut from.
    """

    def __init__(self, vocab: int, hidden: int, tp_size: int, tp_rank: int, comm, dtype, device,
                 tied: VocabParallelEmbedding | None = None, source: str = "lm_head.weight"):
        super().__init__()
        self.vocab, self.comm = vocab, comm
        self.start, self.per = _vocab_rows(vocab, tp_size, tp_rank)
        self._tied = (tied,) if tied is not None else None  # a tuple: not registered as a submodule
        if tied is None:
            self.weight = nn.Parameter(torch.empty(self.per, hidden, dtype=dtype, device=device))
            self.full_names = {"weight": source}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V]
        weight = self._tied[0].weight if self._tied is not None else self.weight
        logits = F.linear(hidden, weight)  # [N, V / tp]
        return self.comm.all_gather(logits, dim=-1)[:, :self.vocab]

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return _pad_rows(full, self.start, self.per)


def apply_tensor_parallel(model: nn.Module, cfg: dict, mapping: Mapping, comm, embedding_sharding_dim: int = 0) -> None:
    """Swap the model's modules for this rank's shards (model on the meta device; check_mapping passed).

    Each layer's linears are cut as the family declares them (llmapi.models.layer_linears): by heads (attention
    qkv and dense) or by intermediate features (the MLP), column- or row-parallel.
    """
    tp, r = mapping.tp_size, mapping.tp_rank
    if tp == 1:
        return
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    nh_l, nkv_l = nh // tp, local_kv_heads(nkv, tp)
    # With more ranks than KV heads, rank r serves q heads that all read KV head r // (tp // nkv).
    kv_first = r * nkv_l if nkv >= tp else r // (tp // nkv)
    q_rows = [(r * nh_l * hd, nh_l * hd)]
    kv_rows = [(kv_first * hd, nkv_l * hd), ((nkv + kv_first) * hd, nkv_l * hd)]
    qkv_rows = q_rows + [(nh * hd + start, count) for start, count in kv_rows]
    if hasattr(model, "linear_layers"):  # a model with several stacks (encoder-decoder) lists its layers itself
        layers = model.linear_layers()
    else:
        specs = layer_linears(cfg)
        layers = [(layer, specs) for layer in model.transformer.layers]  # this pipeline stage's
    for layer, specs in layers:
        layer_inter = layer.mlp.proj.in_features  # the encoder's may differ from the decoder's
        inter_rows = [(r * (layer_inter // tp), layer_inter // tp)]
        for spec in specs:
            block_name, linear_name = spec.name.split(".")
            block = getattr(layer, block_name)
            linear = getattr(block, linear_name)
            rows = q_rows if spec.unit == "heads" else inter_rows
            if spec.split == "qkv":
                parallel = ColumnParallelLinear(linear, qkv_rows)
            elif spec.split == "kv":
                parallel = ColumnParallelLinear(linear, kv_rows)
            elif spec.split == "gate_up":
                parallel = ColumnParallelLinear(linear, inter_rows + [(layer_inter + r * (layer_inter // tp),
                                                                       layer_inter // tp)])
            elif spec.split == "column":
                parallel = ColumnParallelLinear(linear, rows)
            else:
                parallel = RowParallelLinear(linear, rows, comm)
            setattr(block, linear_name, parallel)
            if spec.unit == "heads":
                block.num_heads, block.num_kv_heads = nh_l, nkv_l
    if hasattr(model, "linear_layers"):
        # Encoder-decoder: the relative position biases keep this rank's heads; embeddings and head stay whole
        # (each rank computes the full logits).
        for module in model.modules():
            if hasattr(module, "split_heads"):
                module.split_heads(r * nh_l, nh_l)
        return

    t = model.transformer
    embedding = t.vocab_embedding
    tied = cfg["tie_word_embeddings"]
    if embedding is not None:
        cls = VocabParallelEmbedding if embedding_sharding_dim == 0 else HiddenParallelEmbedding
        t.vocab_embedding = cls(embedding, tp, r, comm)
    if not mapping.is_last_stage:
        return
    w = (model.lm_head or embedding).weight
    head_args = (cfg["vocab_size"], w.shape[1], tp, r, comm, w.dtype, w.device)  # the embedding's width
    if not tied:
        model.lm_head = ParallelLMHead(*head_args)
    elif embedding_sharding_dim == 0:
        model.lm_head = ParallelLMHead(*head_args, tied=t.vocab_embedding)
    else:
        # Column shards of the embedding cannot serve as the head's row shards: the head gets its own copy.
        model.lm_head = ParallelLMHead(*head_args, source="transformer.vocab_embedding.weight")
        if not mapping.is_first_stage:
            t.vocab_embedding = None  # kept by the pipeline split only for the tie
