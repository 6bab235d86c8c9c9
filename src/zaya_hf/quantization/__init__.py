# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""Weight-only int8 / int4 quantization of ZAYA1, the fused top-1 experts included. Package-only.

    model = ZayaForCausalLM.from_pretrained(path, quantization_config=ZayaQuantizationConfig(bits=4, group_size=64))
    model.save_pretrained(out)          # a quantized checkpoint; from_pretrained(out) loads it without re-quantizing

`formats`: the quantization and both layouts (checkpoint: compressed-tensors' pack-quantized; kernel: torch's CPU
int8 / int4 kernels). `modules`: the quantized Linear, embedding and experts. `quantizer`: transformers'
quantizer for `from_pretrained`. `convert`: streaming checkpoint conversion (`zaya-hf quantize`) and footprints.
"""

from .config import ZayaQuantizationConfig, parse_quantize
from .formats import QuantizationFormatError
from .modules import QuantizedEmbedding, QuantizedExperts, QuantizedLinear, TiedQuantizedHead
from .quantizer import ZayaHfQuantizer, register_quantizer

register_quantizer()

__all__ = [
    "QuantizationFormatError",
    "QuantizedEmbedding",
    "QuantizedExperts",
    "QuantizedLinear",
    "TiedQuantizedHead",
    "ZayaHfQuantizer",
    "ZayaQuantizationConfig",
    "parse_quantize",
    "register_quantizer",
]
