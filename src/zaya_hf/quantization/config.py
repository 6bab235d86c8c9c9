# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""`ZayaQuantizationConfig`: which ZAYA weights are quantized, and how."""

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, QuantSpec

QUANT_METHOD = "zaya_hf"
# Left in the model dtype unless asked otherwise: the routers (their choice decides which expert runs, and they are
# ~0.3% of ZAYA1-8B's weights).
DEFAULT_MODULES_TO_NOT_CONVERT = ("mlp.gate",)


class ZayaQuantizationConfig(QuantizationConfigMixin):
    """Weight-only, symmetric, round-to-nearest quantization of every Linear of the decoder layers, the LM head and
    the fused experts (and, with `quantize_embedding=True`, the embedding table).

    Args:
        bits: 8 (per output channel) or 4 (groups of `group_size` input features).
        group_size: 32, 64 or 128 with `bits=4`; None with `bits=8`.
        quantize_embedding: also quantize `model.embed_tokens` (off by default: the embedding is read one row per
            token, so quantizing it saves memory but no time).
        modules_to_not_convert: module paths (dotted suffixes or inner parts, e.g. `"mlp.gate"`, `"lm_head"`) left
            unquantized; default: the routers.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int | None = 64,
        quantize_embedding: bool = False,
        modules_to_not_convert: list[str] | tuple[str, ...] | None = None,
        quant_method: str = QUANT_METHOD,
        format: str = "pack-quantized",
        **kwargs: Any,
    ):
        if kwargs:
            raise TypeError(f"ZayaQuantizationConfig got unknown argument(s) {sorted(kwargs)}.")
        if quant_method != QUANT_METHOD:
            raise ValueError(f"ZayaQuantizationConfig is quant_method {QUANT_METHOD!r}, got {quant_method!r}.")
        if format != "pack-quantized":
            raise ValueError(f"ZayaQuantizationConfig stores the 'pack-quantized' format only, got {format!r}.")
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={bits!r} is not supported: choose one of {list(SUPPORTED_BITS)}.")
        if bits == 8 and group_size is not None:
            raise ValueError(f"bits=8 quantizes per output channel: pass group_size=None, got {group_size!r}.")
        if bits == 4 and group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size={group_size!r} with bits=4: choose one of {list(SUPPORTED_GROUP_SIZES)}.")
        self.quant_method = QUANT_METHOD
        self.format = format
        self.bits = bits
        self.group_size = group_size
        self.quantize_embedding = bool(quantize_embedding)
        self.modules_to_not_convert = list(
            DEFAULT_MODULES_TO_NOT_CONVERT if modules_to_not_convert is None else modules_to_not_convert
        )

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size)

    def converts(self, module_name: str) -> bool:
        """Whether the module at `module_name` is quantized (not excluded by `modules_to_not_convert`)."""
        dotted = f".{module_name}."
        return not any(f".{excluded}." in dotted for excluded in self.modules_to_not_convert)

    def describe(self) -> str:
        kind = "per-channel" if self.group_size is None else f"group {self.group_size}"
        return f"int{self.bits} {kind}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "format": self.format,
            "bits": self.bits,
            "group_size": self.group_size,
            "quantize_embedding": self.quantize_embedding,
            "modules_to_not_convert": list(self.modules_to_not_convert),
        }


# The CLI's `--quantize` values: name -> (bits, group_size).
QUANTIZE_PRESETS = {"int8": (8, None), "int4": (4, 64), **{f"int4-g{g}": (4, g) for g in SUPPORTED_GROUP_SIZES}}


def parse_quantize(text: str) -> ZayaQuantizationConfig:
    """`"int8"`, `"int4"` (group 64) or `"int4-g32"` / `"int4-g128"` as a config (the CLI's `--quantize`)."""
    if text not in QUANTIZE_PRESETS:
        raise ValueError(f"unknown quantization {text!r}: choose one of {list(QUANTIZE_PRESETS)}.")
    bits, group_size = QUANTIZE_PRESETS[text]
    return ZayaQuantizationConfig(bits=bits, group_size=group_size)


__all__ = ["DEFAULT_MODULES_TO_NOT_CONVERT", "QUANTIZE_PRESETS", "QUANT_METHOD", "ZayaQuantizationConfig", "parse_quantize"]
