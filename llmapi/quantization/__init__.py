"""Quantization: the QuantConfig, conversion of weights, and the quantized linear swapped into a model."""

from llmapi.quantization.config import UNQUANTIZED, QuantConfig, resolve_quant

__all__ = ["QuantConfig", "resolve_quant", "UNQUANTIZED"]
