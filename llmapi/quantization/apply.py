"""Quantization applied from outside, one dispatch for every mode: calibrate, quantize weights, swap linears."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from llmapi.models.gpt import LinearSpec, layer_linears
from llmapi.quantization.calibration import ActivationStats, calibration_texts, collect_activation_stats
from llmapi.quantization.config import FP8_ALGOS, SMOOTHQUANT_ALGOS, WEIGHT_ONLY_BITS, QuantConfig
from llmapi.quantization.kv_cache import apply_kv_cache_quant, kv_cache_scales
from llmapi.quantization.fp8 import Fp8Linear, check_fp8_device, quantize_fp8_linear
from llmapi.quantization.linear import check_split
from llmapi.quantization.smoothquant import SmoothQuantLinear, quantize_smoothquant_linear, smooth_weights
from llmapi.quantization.weight_only import WeightOnlyLinear, quantize_weights

# The linears each family declares (llmapi.models.layer_linears) are quantized; embeddings, head, norms stay float.


def _quantized_linear(linear: nn.Linear, quant: QuantConfig, spec: LinearSpec) -> nn.Module:
    """The quantized module that replaces `linear`."""
    algo = quant.quant_algo
    if algo in WEIGHT_ONLY_BITS:
        return WeightOnlyLinear(linear, quant)
    if algo in FP8_ALGOS:
        return Fp8Linear(linear, quant)
    assert algo in SMOOTHQUANT_ALGOS, algo  # QuantConfig admits no other value
    return SmoothQuantLinear(linear, quant, prequant=spec.norm is None)


def quantized_linears(engine_config: dict) -> dict[str, LinearSpec]:
    """Full engine name ("transformer.layers.{i}.mlp.proj"; "encoder.layers.{i}..." and "decoder.layers.{i}..." of
    an encoder-decoder model) -> declaration, of every linear quantization swaps."""
    if engine_config.get("is_encoder_decoder"):
        from llmapi.models.encdec import encdec_linears

        counts = {"encoder": engine_config["encoder"]["num_layers"], "decoder": engine_config["num_hidden_layers"]}
        return {f"{stack}.layers.{i}.{spec.name}": spec
                for stack, specs in encdec_linears(engine_config).items() for i in range(counts[stack])
                for spec in specs}
    specs = layer_linears(engine_config)
    return {f"transformer.layers.{i}.{spec.name}": spec
            for i in range(engine_config["num_hidden_layers"]) for spec in specs}


def apply_quantization(model: nn.Module, quant: QuantConfig | None) -> None:
    """Swap every decoder layer's qkv, dense, gate_up/fc and proj for the mode's quantized linear, and give the
    attentions their KV-cache scales when the cache is quantized (model on meta). On a tensor-parallel rank the
    linears are already this rank's column- or row-parallel shards: the quantized ones keep their split."""
    apply_kv_cache_quant(model, quant)
    if quant is None or quant.quant_algo is None:
        return
    # A rank's input features of a row-parallel linear: whole groups, and whole bytes of packed int4.
    four_bits = quant.quant_algo in WEIGHT_ONLY_BITS and quant.bits == 4
    unit = quant.group_size or (2 if four_bits else 1)
    if hasattr(model, "linear_layers"):  # a model with several stacks (encoder-decoder) lists its layers itself
        layers = model.linear_layers()
    else:
        specs = layer_linears(model.config)
        layers = [(layer, specs) for layer in model.transformer.layers]
    for layer, specs in layers:
        for spec in specs:
            block_name, linear_name = spec.name.split(".")
            block = getattr(layer, block_name)
            linear = getattr(block, linear_name)
            check_split(linear, unit)
            quantized = _quantized_linear(linear, quant, spec)
            quantized.split_like(linear)
            setattr(block, linear_name, quantized)


def check_quant_device(quant: QuantConfig | None, device) -> None:
    """A typed error (UnsupportedDeviceError) when `device` cannot run the mode, before anything is built."""
    check_fp8_device(quant, device)


def calibrate(engine_config: dict, weights: Mapping[str, torch.Tensor], tokenizer_dir, quant: QuantConfig,
              hessians: bool = False) -> ActivationStats:
    """Run the float engine model over the QuantConfig's calibration texts (on CUDA when there is one)."""
    from llmapi.tokenizer import load_tokenizer

    texts = calibration_texts(quant.calibration_dataset, quant.calibration_samples)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return collect_activation_stats(engine_config, weights, load_tokenizer(tokenizer_dir), texts,
                                    max_seq_len=quant.calibration_max_seq_len, hessians=hessians,
                                    device=device)


def quantize_engine_weights(engine_config: dict, weights: Mapping[str, torch.Tensor], quant: QuantConfig | None,
                            stats: ActivationStats | None = None) -> dict[str, torch.Tensor]:
    """Engine weights with every linear quantized and its scales added, named as the swapped modules' parameters.

    stats: calibration of the float model (needed by FP8, SmoothQuant, AWQ and the INT8 KV cache). None (dummy weights for benchmarks)
    means no smoothing and unit activation ranges: right shapes and dtypes, meaningless activation scales.
    """
    if quant is None:
        return dict(weights)
    if quant.kv_cache_quant_algo is not None:
        kv_amax = (None, None) if stats is None else (stats.kv_amax, stats.cross_kv_amax)
        weights = {**weights, **kv_cache_scales(quant, weights, *kv_amax)}
    if quant.quant_algo is None:
        return dict(weights)
    algo = quant.quant_algo
    linears = quantized_linears(engine_config)
    if algo in WEIGHT_ONLY_BITS:
        return quantize_weights(weights, quant, stats, linears)
    amax: Mapping[str, torch.Tensor] = {} if stats is None else stats.input_amax
    if algo in SMOOTHQUANT_ALGOS and amax:
        weights, amax = smooth_weights(weights, amax, quant.smoothquant_alpha, linears)
    out = {}
    for name in list(weights):
        tensor = weights[name]
        linear = name.removesuffix(".weight")  # transformer.layers.{i}.attention.qkv
        if not name.endswith(".weight") or linear not in linears:
            out[name] = tensor
            continue
        assert stats is None or linear in amax, f"calibration saw no input of {linear}"
        if algo in FP8_ALGOS:
            hessian = None if stats is None else stats.input_hessian.get(linear)
            parts = quantize_fp8_linear(tensor, amax.get(linear), quant, hessian)
        else:
            parts = quantize_smoothquant_linear(tensor, amax.get(linear), quant)
            if linears[linear].norm is None and f"{linear}.prequant_scaling_factor" not in weights:
                parts["prequant_scaling_factor"] = torch.ones(tensor.shape[1], device=tensor.device)
        out.update({f"{linear}.{key}": value for key, value in parts.items()})
    return out
