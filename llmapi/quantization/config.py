"""QuantConfig: which quantization an engine's weights get, named as TensorRT-LLM's QuantAlgo values."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

WEIGHT_ONLY_BITS = {"W8A16": 8, "W4A16": 4, "W4A16_AWQ": 4, "W4A16_GPTQ": 4, "W8A16_GPTQ": 8}
"""Weight-only quant_algo values and their weight bit width."""
GPTQ_ALGOS = ("W4A16_GPTQ", "W8A16_GPTQ")
"""Loaded from a GPTQ checkpoint (detected from its quantization_config), never made from float weights."""
FP8_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN")
"""FP8 W8A8 (E4M3): per-tensor weight scale + static calibrated activation scale; or per-channel + per-token."""
SMOOTHQUANT_ALGOS = {
    "W8A8_SQ_PER_CHANNEL": (True, False),
    "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN": (True, False),
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": (True, True),
    "W8A8_SQ_PER_TENSOR_PLUGIN": (False, False),
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN": (False, True),
}
"""SmoothQuant INT8 W8A8 quant_algo -> (per-channel weight scales, per-token activation scales); otherwise
per-tensor weights and a static calibrated per-tensor activation scale."""
CALIBRATED_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W4A16_AWQ", *SMOOTHQUANT_ALGOS)
"""The quant_algo values whose conversion runs the float model over calibration text."""
SUPPORTED_ALGOS = (*WEIGHT_ONLY_BITS, *FP8_ALGOS, *SMOOTHQUANT_ALGOS)
GROUP_SIZES = (64, 128)
AWQ_DEFAULT_GROUP_SIZE = 128
KNOWN_STRINGS = {
    "int8_weight_only": "W8A16",
    "int4_weight_only": "W4A16",
    "int4_awq": "W4A16_AWQ",
    "fp8": "FP8",
    "fp8_per_token": "FP8_PER_CHANNEL_PER_TOKEN",
    "smoothquant": "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
}
"""Short `quant=` strings that are built today, and their quant_algo."""
KV_CACHE_ALGOS = ("FP8", "INT8")
"""kv_cache_quant_algo values: the paged KV cache in float8 E4M3 or int8, per-layer K and V scales."""
KV_CACHE_STRINGS = {"fp8_kv_cache": "FP8", "int8_kv_cache": "INT8"}
"""Short `quant=` strings that quantize only the KV cache, and their kv_cache_quant_algo."""
PLANNED_ALGOS = ("INT8",)
"""TensorRT-LLM QuantAlgo names not built yet: a clear error rather than "invalid"."""
DEFAULT_ALPHA = 0.5
"""SmoothQuant's migration strength default (the paper's choice for most models)."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class QuantConfig:
    """How conversion quantizes the linear layers (qkv, dense, gate_up/fc, proj; never embeddings, head, norms),
    and the KV cache's dtype."""

    quant_algo: Optional[str] = "W8A16"
    """TensorRT-LLM QuantAlgo name: "W8A16" / "W4A16" (int8 / int4 weight-only), "W4A16_AWQ" (int4 with
    activation-aware scales), "W4A16_GPTQ" / "W8A16_GPTQ" (a GPTQ checkpoint's weights, with zero points),
    "FP8", "FP8_PER_CHANNEL_PER_TOKEN", or a SmoothQuant "W8A8_SQ_*" value (see SMOOTHQUANT_ALGOS); None leaves
    the weights float (with a kv_cache_quant_algo)."""
    group_size: Optional[int] = None
    """Weight-only: None, one scale per output channel; 64 or 128, one scale per group of that many inputs
    (W4A16_AWQ: None means 128; GPTQ: the checkpoint's group size, any positive size)."""
    kv_cache_quant_algo: Optional[str] = None
    """KV-cache dtype: None (the model dtype), "FP8" (E4M3, K/V scales amax / 448) or "INT8" (K/V scales amax /
    127), the amax calibrated per layer at conversion; see llmapi.quantization.kv_cache."""
    smoothquant_alpha: float = DEFAULT_ALPHA
    """SmoothQuant (W8A8_SQ_*): migration strength in [0, 1]; s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)."""
    calibration_dataset: Optional[str] = None
    """Calibrated modes (FP8, W4A16_AWQ, W8A8_SQ_*, the FP8 and INT8 KV caches): a text file, one sample per line;
    None: gensim's lee_background.cor."""
    calibration_samples: int = 64
    """Calibrated modes: how many texts of the dataset calibration runs (drawn with a fixed seed)."""
    calibration_max_seq_len: int = 512
    """Calibrated modes: each calibration text is cut to this many tokens."""
    calibration_dataset_sha256: Optional[str] = field(default=None, repr=False)
    """The dataset file's digest, so the cache key changes with its content; computed from the file when None."""

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
            self._check_common()
            return
        if algo in PLANNED_ALGOS:
            raise ValueError(f"quant_algo={algo!r} is not supported yet; supported: {list(SUPPORTED_ALGOS)}")
        if algo not in SUPPORTED_ALGOS:
            raise ValueError(f"quant_algo={algo!r} is invalid: must be one of {list(SUPPORTED_ALGOS)}")
        g = self.group_size
        if algo == "W4A16_AWQ" and g is None:
            object.__setattr__(self, "group_size", AWQ_DEFAULT_GROUP_SIZE)  # AWQ is group-wise
        elif algo in GPTQ_ALGOS:
            if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0):
                raise ValueError(f"group_size={g!r} is invalid: must be None (per channel) or a positive int")
        elif g is not None and (isinstance(g, bool) or g not in GROUP_SIZES):
            raise ValueError(f"group_size={g!r} is invalid: must be None (per channel) or one of {GROUP_SIZES}")
        if g is not None and algo not in WEIGHT_ONLY_BITS:
            raise ValueError(f"group_size={g!r} is invalid for quant_algo={algo!r}: only weight-only modes have groups")
        self._check_common()

    def _check_common(self) -> None:
        """Checks that hold with or without weight quantization."""
        algo = self.quant_algo
        a = self.smoothquant_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ValueError(f"smoothquant_alpha={a!r} is invalid: must be a number in [0, 1]")
        object.__setattr__(self, "smoothquant_alpha", float(a))
        if a != DEFAULT_ALPHA and algo not in SMOOTHQUANT_ALGOS:
            raise ValueError(f"smoothquant_alpha={a!r} applies to SmoothQuant (W8A8_SQ_*) only, not {algo!r}")
        self._check_calibration()

    def _check_calibration(self) -> None:
        for name, low in (("calibration_samples", 1), ("calibration_max_seq_len", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                raise ValueError(f"{name}={v!r} is invalid: must be an int >= {low}")
        custom = (self.calibration_dataset is not None or self.calibration_samples != 64
                  or self.calibration_max_seq_len != 512)
        if custom and not self.needs_calibration:
            raise ValueError(f"calibration settings apply to calibrated modes {list(CALIBRATED_ALGOS)} and the "
                             f"quantized KV caches only, not quant_algo={self.quant_algo!r}")
        path = self.calibration_dataset
        if path is None:
            if self.calibration_dataset_sha256 is not None:
                raise ValueError("calibration_dataset_sha256 is set but calibration_dataset is None")
            return
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"calibration_dataset={path!r} is invalid: must be None or a path to a text file")
        object.__setattr__(self, "calibration_dataset", os.path.abspath(os.fspath(path)))
        if self.calibration_dataset_sha256 is None:  # a new config: the file must be there
            from llmapi.engine.format import sha256_file

            if not os.path.isfile(self.calibration_dataset):
                raise ValueError(f"calibration_dataset={os.fspath(path)!r} is not a file (one sample per line)")
            object.__setattr__(self, "calibration_dataset_sha256", sha256_file(self.calibration_dataset))

    @property
    def bits(self) -> int:
        return WEIGHT_ONLY_BITS[self.quant_algo]

    @property
    def has_zero_point(self) -> bool:
        """Linears carry `weights_zero_point` (GPTQ, AWQ): w = (q - zero_point) * scale."""
        return self.quant_algo in GPTQ_ALGOS or self.quant_algo == "W4A16_AWQ"

    @property
    def from_gptq_checkpoint(self) -> bool:
        """The integer weights come from a GPTQ checkpoint, not from quantizing float weights."""
        return self.quant_algo in GPTQ_ALGOS

    @property
    def pre_quant_scale(self) -> bool:
        """Linears carry `prequant_scaling_factor` (AWQ), multiplied into the activation before the matmul."""
        return self.quant_algo == "W4A16_AWQ"

    @property
    def needs_hessians(self) -> bool:
        """Conversion rounds the weights with GPTQ's error feedback, on the calibration's mean x^T x per linear."""
        return self.quant_algo in ("W4A16_AWQ", *FP8_ALGOS)

    @property
    def needs_calibration(self) -> bool:
        return self.quant_algo in CALIBRATED_ALGOS or self.kv_cache_quant_algo is not None

    def to_dict(self) -> dict:
        """The engine config.json `quantization` section (and the cache key's)."""
        out = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo,
               "group_size": self.group_size}
        if self.quant_algo in SMOOTHQUANT_ALGOS:
            out["smoothquant_alpha"] = self.smoothquant_alpha
        if self.needs_calibration:
            out.update(calibration_dataset=self.calibration_dataset, calibration_samples=self.calibration_samples,
                       calibration_max_seq_len=self.calibration_max_seq_len,
                       calibration_dataset_sha256=self.calibration_dataset_sha256)
        return out

    @classmethod
    def from_dict(cls, section: Optional[dict]) -> Optional["QuantConfig"]:
        """The QuantConfig of a `quantization` section; None for an unquantized engine."""
        if not section or section.get("quant_algo") is None and section.get("kv_cache_quant_algo") is None:
            return None
        fields = ("quant_algo", "kv_cache_quant_algo", "group_size", "smoothquant_alpha", "calibration_dataset",
                  "calibration_samples", "calibration_max_seq_len", "calibration_dataset_sha256")
        unknown = sorted(set(section) - set(fields))
        if unknown:
            raise ValueError(f"quantization has unknown field(s) {unknown}")
        return cls(**{name: section[name] for name in fields if name in section})


UNQUANTIZED = {"quant_algo": None, "kv_cache_quant_algo": None}
"""The `quantization` section of an unquantized engine."""


def resolve_quant(quant: Union[str, QuantConfig, None]) -> Optional[QuantConfig]:
    """LLM(quant=...): None, a short string (a KNOWN_STRINGS or KV_CACHE_STRINGS key, e.g. "fp8", "int4_awq",
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
    if quant == "gptq":
        raise ValueError("quant='gptq' is invalid: GPTQ is detected from the checkpoint's quantization_config; "
                         "load a GPTQ checkpoint with quant=None")
    raise ValueError(f"quant={quant!r} is unknown: known values are {known}")
