"""Mapping: how an engine is split over tp x pp ranks, and which model shapes a split supports."""

from __future__ import annotations

from dataclasses import dataclass

from llmapi.errors import UnsupportedModelError


@dataclass(frozen=True)
class Mapping:
    """Rank layout: rank = pp_rank * tp_size + tp_rank, so a pipeline stage's TP ranks are neighbours."""

    tp_size: int = 1
    """Tensor-parallel ranks per stage."""
    pp_size: int = 1
    """Pipeline stages."""
    rank: int = 0
    """This rank, in [0, world_size)."""

    def __post_init__(self):
        for name in ("tp_size", "pp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be an int >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank!r} is invalid: must be in [0, {self.world_size})")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def for_rank(self, rank: int) -> "Mapping":
        return Mapping(self.tp_size, self.pp_size, rank)

    def stage_ranks(self, pp_rank: int) -> list[int]:
        """The TP group of stage `pp_rank`."""
        return [pp_rank * self.tp_size + t for t in range(self.tp_size)]

    def peer(self, pp_rank: int) -> int:
        """This rank's counterpart (same tp_rank) in stage `pp_rank`."""
        return pp_rank * self.tp_size + self.tp_rank

    @property
    def sampler_rank(self) -> int:
        """The rank that samples: TP rank 0 of the last stage."""
        return (self.pp_size - 1) * self.tp_size

    def stage_layers(self, num_layers: int, pp_rank: int | None = None) -> range:
        """Layers of stage `pp_rank` (this rank's by default): contiguous, earlier stages take the remainder."""
        pp_rank = self.pp_rank if pp_rank is None else pp_rank
        base, extra = divmod(num_layers, self.pp_size)
        start = pp_rank * base + min(pp_rank, extra)
        return range(start, start + base + (pp_rank < extra))

    def to_dict(self) -> dict:
        """The engine config's `mapping` entry."""
        return {"world_size": self.world_size, "tp_size": self.tp_size, "pp_size": self.pp_size}

    @classmethod
    def from_dict(cls, mapping: dict, rank: int = 0) -> "Mapping":
        return cls(int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1)), rank)


def local_kv_heads(num_kv_heads: int, tp_size: int) -> int:
    """KV heads one TP rank holds: a share of them, or one replicated head when tp exceeds them (MQA)."""
    return max(num_kv_heads // tp_size, 1)


def check_mapping(engine_config: dict, mapping: Mapping, embedding_sharding_dim: int = 0) -> None:
    """Raise UnsupportedModelError naming the numbers when the model cannot be split this way."""
    tp, pp = mapping.tp_size, mapping.pp_size
    cfg = engine_config
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if heads % tp:
        raise UnsupportedModelError(
            f"tensor_parallel_size={tp} does not divide num_attention_heads={heads}")
    if kv_heads % tp and (tp < kv_heads or tp % kv_heads):
        raise UnsupportedModelError(
            f"tensor_parallel_size={tp} cannot split num_key_value_heads={kv_heads}: it must divide them, "
            f"or be a multiple of them (then each KV head is replicated on {tp} // {kv_heads} ranks)")
    if cfg["intermediate_size"] % tp:
        raise UnsupportedModelError(
            f"tensor_parallel_size={tp} does not divide intermediate_size={cfg['intermediate_size']}")
    if embedding_sharding_dim not in (0, 1):
        raise ValueError(f"embedding_sharding_dim={embedding_sharding_dim!r} is invalid: must be 0 (vocab) or 1 (hidden)")
    width = cfg.get("embedding_projection") or cfg["hidden_size"]  # the embedding's width (OPT-350m: 512)
    if embedding_sharding_dim == 1 and width % tp:
        raise UnsupportedModelError(
            f"tensor_parallel_size={tp} does not divide the embedding width {width} "
            "(needed to split the embedding along the hidden size; use embedding_sharding_dim=0)")
    if cfg.get("is_encoder_decoder"):
        if pp > 1:
            raise UnsupportedModelError(
                f"pipeline_parallel_size={pp}: encoder-decoder models do not run as pipeline stages (a step runs the "
                "encoder of its starting requests before the decoder, which every stage would wait for); use "
                "tensor_parallel_size")
        if cfg["encoder"]["intermediate_size"] % tp:
            raise UnsupportedModelError(f"tensor_parallel_size={tp} does not divide the encoder's intermediate_size="
                                        f"{cfg['encoder']['intermediate_size']}")
    if cfg["num_hidden_layers"] < pp:
        raise UnsupportedModelError(
            f"pipeline_parallel_size={pp} exceeds num_hidden_layers={cfg['num_hidden_layers']}")
