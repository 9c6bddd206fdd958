"""Weight-only quantization (int8 per-channel, int4 group-wise; round-to-nearest or GPTQ) and FP8 weights."""

from mixr.quant.quantize import MODULES_TO_NOT_CONVERT, auto_group_size, is_quantized, quant_targets, quantize_model
from mixr.quant.rtn import QuantSpec, quantize_rtn

__all__ = ["MODULES_TO_NOT_CONVERT", "QuantSpec", "auto_group_size", "is_quantized", "quant_targets", "quantize_model",
           "quantize_rtn"]
