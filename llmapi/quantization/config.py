"""QuantConfig: which quantization an engine's weights get, named as TensorRT-LLM's QuantAlgo values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

WEIGHT_ONLY_BITS = {"W8A16": 8, "W4A16": 4, "W4A16_AWQ": 4, "W4A16_GPTQ": 4, "W8A16_GPTQ": 8}
"""The quant_algo values this library builds, and their weight bit width."""
GPTQ_ALGOS = ("W4A16_GPTQ", "W8A16_GPTQ")
"""Loaded from a GPTQ checkpoint (detected from its quantization_config), never made from float weights."""
GROUP_SIZES = (64, 128)
AWQ_DEFAULT_GROUP_SIZE = 128
KNOWN_STRINGS = {
    "int8_weight_only": "W8A16",
    "int4_weight_only": "W4A16",
    "int4_awq": "W4A16_AWQ",
}
"""Short `quant=` strings that are built today, and their quant_algo."""
PLANNED_STRINGS = ("fp8", "smoothquant", "int8_kv_cache", "fp8_kv_cache")
"""Documented short strings whose modes are not supported yet: a clear error rather than "unknown"."""
PLANNED_ALGOS = ("FP8", "W8A8_SQ_PER_CHANNEL", "W8A8_SQ_PER_TENSOR_PLUGIN",
                 "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "INT8", "FP8_PER_CHANNEL_PER_TOKEN")


@dataclass(frozen=True)
class QuantConfig:
    """How conversion quantizes the linear layers (qkv, dense, gate_up/fc, proj; never embeddings, head, norms)."""

    quant_algo: str = "W8A16"
    """TensorRT-LLM QuantAlgo name: "W8A16" / "W4A16" (int8 / int4 weight-only), "W4A16_AWQ" (int4 with
    activation-aware scales), "W4A16_GPTQ" / "W8A16_GPTQ" (a GPTQ checkpoint's weights, with zero points)."""
    group_size: Optional[int] = None
    """None: one scale per output channel; 64 or 128: one scale per group of that many input features
    (W4A16_AWQ: None means 128; GPTQ: the checkpoint's group size, any positive size)."""
    kv_cache_quant_algo: Optional[str] = None
    """KV-cache quantization ("FP8", "INT8"): not supported yet, must be None."""

    def __post_init__(self):
        algo = self.quant_algo
        if algo in PLANNED_ALGOS:
            raise ValueError(f"quant_algo={algo!r} is not supported yet; supported: {sorted(WEIGHT_ONLY_BITS)}")
        if algo not in WEIGHT_ONLY_BITS:
            raise ValueError(f"quant_algo={algo!r} is invalid: must be one of {sorted(WEIGHT_ONLY_BITS)}")
        g = self.group_size
        if algo == "W4A16_AWQ" and g is None:
            object.__setattr__(self, "group_size", AWQ_DEFAULT_GROUP_SIZE)  # AWQ is group-wise
        elif algo in GPTQ_ALGOS:
            if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0):
                raise ValueError(f"group_size={g!r} is invalid: must be None (per channel) or a positive int")
        elif g is not None and (isinstance(g, bool) or g not in GROUP_SIZES):
            raise ValueError(f"group_size={g!r} is invalid: must be None (per channel) or one of {GROUP_SIZES}")
        if self.kv_cache_quant_algo is not None:
            raise ValueError(f"kv_cache_quant_algo={self.kv_cache_quant_algo!r} is not supported yet: must be None")

    @property
    def bits(self) -> int:
        return WEIGHT_ONLY_BITS[self.quant_algo]

    @property
    def has_zero_point(self) -> bool:
        """Linears carry `weights_zero_point` (GPTQ): w = (q - zero_point) * scale."""
        return self.quant_algo in GPTQ_ALGOS

    @property
    def pre_quant_scale(self) -> bool:
        """Linears carry `prequant_scaling_factor` (AWQ), multiplied into the activation before the matmul."""
        return self.quant_algo == "W4A16_AWQ"

    def to_dict(self) -> dict:
        """The engine config.json `quantization` section (and the cache key's)."""
        return {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo,
                "group_size": self.group_size}

    @classmethod
    def from_dict(cls, section: Optional[dict]) -> Optional["QuantConfig"]:
        """The QuantConfig of a `quantization` section; None for an unquantized engine."""
        if not section or section.get("quant_algo") is None and section.get("kv_cache_quant_algo") is None:
            return None
        unknown = sorted(set(section) - {"quant_algo", "kv_cache_quant_algo", "group_size"})
        if unknown:
            raise ValueError(f"quantization has unknown field(s) {unknown}")
        return cls(quant_algo=section.get("quant_algo"), group_size=section.get("group_size"),
                   kv_cache_quant_algo=section.get("kv_cache_quant_algo"))


UNQUANTIZED = {"quant_algo": None, "kv_cache_quant_algo": None}
"""The `quantization` section of an unquantized engine."""


def resolve_quant(quant: Union[str, QuantConfig, None]) -> Optional[QuantConfig]:
    """LLM(quant=...): None, a short string ("int8_weight_only", "int4_weight_only", "int4_awq") or a QuantConfig."""
    if quant is None or isinstance(quant, QuantConfig):
        return quant
    if not isinstance(quant, str):
        raise ValueError(f"quant={quant!r} is invalid: must be None, a QuantConfig or one of {sorted(KNOWN_STRINGS)}")
    if quant in KNOWN_STRINGS:
        return QuantConfig(quant_algo=KNOWN_STRINGS[quant])
    if quant == "gptq":
        raise ValueError("quant='gptq' is invalid: GPTQ is detected from the checkpoint's quantization_config; "
                         "load a GPTQ checkpoint with quant=None")
    if quant in PLANNED_STRINGS:
        raise ValueError(f"quant={quant!r} is not supported yet; supported: {sorted(KNOWN_STRINGS)}")
    raise ValueError(f"quant={quant!r} is unknown: known values are {sorted(KNOWN_STRINGS)} "
                     f"(planned, not supported yet: {list(PLANNED_STRINGS)})")
