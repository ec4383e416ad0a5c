"""QuantConfig: which quantization an engine's weights get, named as TensorRT-LLM's QuantAlgo values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

WEIGHT_ONLY_BITS = {"W8A16": 8, "W4A16": 4}
"""The quant_algo values this library builds, and their weight bit width."""
GROUP_SIZES = (64, 128)
KNOWN_STRINGS = {
    "int8_weight_only": "W8A16",
    "int4_weight_only": "W4A16",
}
"""Short `quant=` strings that are built today, and their quant_algo."""
KV_CACHE_ALGOS = ("FP8", "INT8")
"""kv_cache_quant_algo values: the paged KV cache in float8 E4M3 or int8, per-layer K and V scales."""
KV_CACHE_STRINGS = {"fp8_kv_cache": "FP8", "int8_kv_cache": "INT8"}
"""Short `quant=` strings that quantize only the KV cache, and their kv_cache_quant_algo."""
PLANNED_STRINGS = ("fp8", "int4_awq", "smoothquant")
"""Documented short strings whose modes are not supported yet: a clear error rather than "unknown"."""
PLANNED_ALGOS = ("FP8", "W4A16_AWQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL", "W8A8_SQ_PER_TENSOR_PLUGIN",
                 "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "INT8", "FP8_PER_CHANNEL_PER_TOKEN")


@dataclass(frozen=True)
class QuantConfig:
    """How conversion quantizes the linear layers (qkv, dense, gate_up/fc, proj; never embeddings, head, norms),
    and the KV cache's dtype."""

    quant_algo: Optional[str] = "W8A16"
    """TensorRT-LLM QuantAlgo name: "W8A16" (int8 weight-only) or "W4A16" (int4 weight-only); None leaves the
    weights float (with a kv_cache_quant_algo)."""
    group_size: Optional[int] = None
    """None: one scale per output channel; 64 or 128: one scale per group of that many input features."""
    kv_cache_quant_algo: Optional[str] = None
    """KV-cache dtype: None (the model dtype), "FP8" (E4M3, K/V scales 1.0) or "INT8" (K/V scales amax / 127
    calibrated at conversion); see llmapi.quantization.kv_cache."""

    def __post_init__(self):
        algo, kv = self.quant_algo, self.kv_cache_quant_algo
        if kv is not None and kv not in KV_CACHE_ALGOS:
            raise ValueError(f"kv_cache_quant_algo={kv!r} is invalid: must be None or one of {list(KV_CACHE_ALGOS)}")
        if algo is None:
            if kv is None:
                raise ValueError("quant_algo=None and kv_cache_quant_algo=None: this QuantConfig quantizes nothing "
                                 "(pass quant=None for a float engine)")
            if self.group_size is not None:
                raise ValueError(f"group_size={self.group_size!r} is invalid with quant_algo=None: must be None")
            return
        if algo in PLANNED_ALGOS:
            raise ValueError(f"quant_algo={algo!r} is not supported yet; supported: {sorted(WEIGHT_ONLY_BITS)}")
        if algo not in WEIGHT_ONLY_BITS:
            raise ValueError(f"quant_algo={algo!r} is invalid: must be one of {sorted(WEIGHT_ONLY_BITS)}")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or g not in GROUP_SIZES):
            raise ValueError(f"group_size={g!r} is invalid: must be None (per channel) or one of {GROUP_SIZES}")

    @property
    def bits(self) -> int:
        return WEIGHT_ONLY_BITS[self.quant_algo]

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
    """LLM(quant=...): None, a short string ("int8_weight_only", "int4_weight_only", "fp8_kv_cache",
    "int8_kv_cache") or a QuantConfig (which combines a weight mode with a KV-cache dtype)."""
    known = sorted(KNOWN_STRINGS) + sorted(KV_CACHE_STRINGS)
    if quant is None or isinstance(quant, QuantConfig):
        return quant
    if not isinstance(quant, str):
        raise ValueError(f"quant={quant!r} is invalid: must be None, a QuantConfig or one of {known}")
    if quant in KNOWN_STRINGS:
        return QuantConfig(quant_algo=KNOWN_STRINGS[quant])
    if quant in KV_CACHE_STRINGS:
        return QuantConfig(quant_algo=None, kv_cache_quant_algo=KV_CACHE_STRINGS[quant])
    if quant in PLANNED_STRINGS:
        raise ValueError(f"quant={quant!r} is not supported yet; supported: {known}")
    raise ValueError(f"quant={quant!r} is unknown: known values are {known} "
                     f"(planned, not supported yet: {list(PLANNED_STRINGS)})")
