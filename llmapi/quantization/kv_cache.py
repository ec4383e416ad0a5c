"""Quantized KV cache (kv_cache_quant_algo FP8 / INT8): the cache dtype, the per-layer K/V scales and their calibration."""

# Each layer's attention holds `kv_cache_scaling_factor`, a [2] tensor (K scale, V scale): a cached code c
# stands for c * scale. Engine tensor: transformer.layers.{i}.attention.attn.kv_cache_scaling_factor, written
# by conversion in the engine dtype (the model holds it in that dtype, as every float tensor). An
# encoder-decoder model caches two K/V sets per decoder layer, each with its own scales:
# decoder.layers.{i}.attention.kv_cache_scaling_factor (self-attention) and
# decoder.layers.{i}.cross_attention.kv_cache_scaling_factor (cross-attention: K/V of the encoder output).
#   INT8: scales max|x| / 127 per layer for K (after rotary) and V, from the calibration text run through
#         the float model (llmapi.quantization.calibration), as int8 has one fixed step per tensor.
#   FP8:  scales max|x| / 448 the same way (as llm-compressor's calibrated k_scale / v_scale): E4M3 keeps ~2
#         significant digits over [2**-6, 448] x scale, so mapping the largest value to 448 moves small values
#         out of the subnormal range. Dummy-weight engines (nothing to calibrate on) get 1.0, as vLLM without
#         checkpoint scales.

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from llmapi._kernels.kv_quant import CACHE_DTYPES, kv_scales_from_amax
from llmapi.errors import CorruptEngineError, UnsupportedDeviceError
from llmapi.quantization.config import QuantConfig

SCALE_NAME = "transformer.layers.{}.attention.attn.kv_cache_scaling_factor"
SELF_SCALE_NAME = "decoder.layers.{}.attention.kv_cache_scaling_factor"
"""An encoder-decoder model's decoder layer {i}: the scales of its self-attention cache."""
CROSS_SCALE_NAME = "decoder.layers.{}.cross_attention.kv_cache_scaling_factor"
"""An encoder-decoder model's decoder layer {i}: the scales of its cross-attention cache."""
FP8_MIN_CAPABILITY = (8, 9)
"""CUDA compute capability whose Triton has float8 E4M3 (Ada sm_89, Hopper sm_90)."""
DUMMY_INT8_AMAX = 4.0
"""The K/V amax assumed for a dummy-weight INT8 engine (nothing to calibrate on; speed does not depend on it):
dummy weights (std 0.02) give K/V of a few units."""


def kv_cache_algo(engine_config: dict) -> str | None:
    """The engine's kv_cache_quant_algo (None: a cache in the model dtype)."""
    return (engine_config.get("quantization") or {}).get("kv_cache_quant_algo")


def kv_cache_dtype(engine_config: dict, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the paged KV cache is allocated in: int8 / float8_e4m3fn, or the model dtype."""
    algo = kv_cache_algo(engine_config)
    if algo is None:
        return model_dtype
    if algo not in CACHE_DTYPES:
        raise CorruptEngineError(f"engine config has kv_cache_quant_algo={algo!r}; known: {sorted(CACHE_DTYPES)}")
    return CACHE_DTYPES[algo]


def check_kv_cache_device(engine_config: dict, device) -> None:
    """UnsupportedDeviceError for an FP8 KV cache on a CUDA device below sm_89; the CPU path emulates it."""
    device = torch.device(device)
    if kv_cache_algo(engine_config) != "FP8" or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_MIN_CAPABILITY:
        raise UnsupportedDeviceError(
            f"kv_cache_quant_algo='FP8' needs float8 E4M3 support (compute capability >= 8.9, Ada or Hopper), but "
            f"{device} has compute capability {major}.{minor}; use kv_cache_quant_algo='INT8' on this GPU")


def apply_kv_cache_quant(model: nn.Module, quant: QuantConfig | None) -> None:
    """Give every attention over the paged cache of `model` (built on meta) its [2] kv_cache_scaling_factor
    parameter: those `model.kv_cache_attentions()` lists (each Attention of a decoder-only model; an
    encoder-decoder model's decoder self- and cross-attention, not the encoder's)."""
    if quant is None or quant.kv_cache_quant_algo is None:
        return
    for module in model.kv_cache_attentions():
        module.kv_cache_scaling_factor = nn.Parameter(torch.empty(2, device="meta"), requires_grad=False)


def _scale_names(layer: int, encoder_decoder: bool) -> tuple[str, ...]:
    """The engine names of layer `layer`'s scales: its attention's, or its self- and cross-attention's."""
    if encoder_decoder:
        return SELF_SCALE_NAME.format(layer), CROSS_SCALE_NAME.format(layer)
    return (SCALE_NAME.format(layer),)


def default_kv_scales(quant: QuantConfig, num_layers: int, dtype: torch.dtype,
                      encoder_decoder: bool = False) -> dict[str, torch.Tensor]:
    """Dummy engines' scales (no calibration): 1.0 for FP8; for INT8 those of DUMMY_INT8_AMAX. An
    encoder-decoder model (`num_layers` decoder layers) gets them for its self- and cross-attention caches."""
    cache_dtype = CACHE_DTYPES[quant.kv_cache_quant_algo]
    amax = DUMMY_INT8_AMAX if quant.kv_cache_quant_algo == "INT8" else 0.0  # amax 0 gives scale 1.0
    scales = kv_scales_from_amax(amax, amax, cache_dtype).to(dtype)
    return {name: scales.clone() for i in range(num_layers) for name in _scale_names(i, encoder_decoder)}


def kv_cache_scales(quant: QuantConfig, weights: Mapping[str, torch.Tensor],
                    kv_amax: Mapping[int, tuple[float, float]] | None,
                    cross_kv_amax: Mapping[int, tuple[float, float]] | None = None) -> dict[str, torch.Tensor]:
    """The engine's kv_cache_scaling_factor tensors, in the dtype of the float `weights`.

    kv_amax: layer -> (max |k| after rotary, max |v|) from calibration (ActivationStats.kv_amax); None (dummy
    weights): default_kv_scales. Encoder-decoder weights (decoder.layers.*): kv_amax is each decoder layer's
    self-attention's, cross_kv_amax (ActivationStats.cross_kv_amax) its cross-attention's.
    """
    encoder_decoder = any(name.startswith("decoder.layers.") for name in weights)
    prefix = "decoder.layers." if encoder_decoder else "transformer.layers."
    num_layers = 1 + max(int(name.split(".")[2]) for name in weights if name.startswith(prefix))
    dtype = next(iter(weights.values())).dtype
    if kv_amax is None:
        return default_kv_scales(quant, num_layers, dtype, encoder_decoder)
    cache_dtype = CACHE_DTYPES[quant.kv_cache_quant_algo]
    sources = [(SELF_SCALE_NAME, kv_amax, "self-attention "), (CROSS_SCALE_NAME, cross_kv_amax, "cross-attention ")] \
        if encoder_decoder else [(SCALE_NAME, kv_amax, "")]
    out = {}
    for name, amax, what in sources:
        missing = sorted(set(range(num_layers)) - set(amax or {}))
        if missing:
            raise ValueError(f"KV-cache calibration gave no {what}amax for layer(s) {missing}")
        out.update({name.format(i): kv_scales_from_amax(*amax[i], cache_dtype).to(dtype) for i in range(num_layers)})
    return out
