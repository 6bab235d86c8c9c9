# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""ZAYA1 configuration.

`ZayaConfig` reads the published `Zyphra/ZAYA1-8B` config.json unchanged (quirks included) and writes one that
plain transformers, vLLM and SGLang read: `model_type` stays `"zaya"` and every published field keeps its name.
"""

from typing import Any

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

ZAYA_LAYER_TYPES = ("hybrid", "hybrid_sliding")
ZAYA_KERNEL_BACKENDS = ("auto", "torch", "triton")

# Sizes every config.json must state: they fix the tensor shapes, so a missing one must not become ZAYA1-8B's.
CHECKPOINT_SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "moe_intermediate_size",
    "router_hidden_size",
)
_POSITIVE_FIELDS = (*CHECKPOINT_SIZE_FIELDS, "max_position_embeddings", "cca_time0", "cca_time1")


class CheckpointError(ValueError):
    """A checkpoint (its config.json, its weights, its files) that cannot be loaded, converted or verified as it is.
    Every subclass names the field, tensor or file at fault; `zaya_hf.checkpoints` raises the same classes."""


class InvalidConfigError(CheckpointError):
    """A config.json that lacks a size the weights depend on, or holds a value the model cannot run."""


_DEFAULT_ROPE_PARAMETERS = {
    "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
    "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
}


@strict
class ZayaConfig(PreTrainedConfig):
    r"""Configuration of a ZAYA1 model (CCA attention, top-1 MoE with an MLP router and a skip class).

    The defaults are those of ZAYA1-8B. Fields beyond the published ones:

    router_aux_loss_coef (`float`, defaults to 0.0):
        Weight of the optional Switch-style load-balancing loss added when `output_router_logits=True`.
        ZAYA balances experts with the bias controller instead, so it is off by default.
    kernel_backend (`str`, defaults to `"torch"`):
        `"triton"` replaces the forwards of the CCA projection, router, experts and residual norms by the fused
        Triton kernels of the zaya_hf package (`zaya_hf.ops`, CUDA/ROCm), chosen once when the model is built;
        `"auto"` does so where the package, triton and a GPU are present; `"torch"` never does. The default stays
        `"torch"` until the kernels have been validated on GPU hardware (they have only run in Triton's CPU
        interpreter so far). Other loaders of the checkpoint ignore this field.

    ```python
    >>> from zaya_hf import ZayaConfig, ZayaForCausalLM
    >>> config = ZayaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    ...                     num_key_value_heads=2, head_dim=16, num_experts=4, moe_intermediate_size=32,
    ...                     router_hidden_size=16)
    >>> model = ZayaForCausalLM(config)
    ```
    """

    model_type = "zaya"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 262272
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    lm_head_bias: bool = False
    cca_time0: int = 2
    cca_time1: int = 2
    num_experts: int = 16
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 2048
    router_hidden_size: int = 256
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.0
    kernel_backend: str = "torch"
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 106

    def __post_init__(self, **kwargs: Any):
        if self.layer_types is None:
            self.layer_types = ["hybrid"] * self.num_hidden_layers
        else:
            self.layer_types = list(self.layer_types)
        if self.rope_parameters is None:
            self.rope_parameters = {k: dict(v) for k, v in _DEFAULT_ROPE_PARAMETERS.items()}
        # The published config nests one dict per layer type *and* carries a stray top-level "rope_type".
        self.rope_parameters = {k: v for k, v in self.rope_parameters.items() if k != "rope_type"}
        super().__post_init__(**kwargs)

    @property
    def cca_conv_width(self) -> int:
        """Columns of pre-convolution q/k history a CCA layer needs: `(cca_time0 - 1) + (cca_time1 - 1)`."""
        return (self.cca_time0 - 1) + (self.cca_time1 - 1)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "ZayaConfig":
        """The configuration of a config.json dict (what `from_pretrained` and the Auto classes read). Unlike the
        constructor, whose defaults are ZAYA1-8B's, it requires every size in `CHECKPOINT_SIZE_FIELDS`; any problem is
        an `InvalidConfigError` naming the field."""
        missing = [name for name in CHECKPOINT_SIZE_FIELDS if name not in config_dict and name not in kwargs]
        if missing:
            raise InvalidConfigError(
                f"The ZAYA config lacks {', '.join(missing)}: a checkpoint's config.json must state the sizes of its "
                "weights (they are never taken from ZAYA1-8B's defaults)."
            )
        try:
            return super().from_dict(config_dict, **kwargs)
        except StrictDataclassError as error:  # the validator's own message names the field
            raise InvalidConfigError(str(error.__cause__ or error)) from None

    def validate_architecture(self):
        """Fail early, with the field named, on configs the model cannot run."""
        for name in _POSITIVE_FIELDS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.num_experts_per_tok != 1:
            raise ValueError(
                f"ZAYA routes each token to exactly one expert: num_experts_per_tok must be 1, got {self.num_experts_per_tok}."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a positive multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if (self.num_key_value_heads * self.head_dim) % 2 != 0:
            raise ValueError(
                "The CCA value projection splits num_key_value_heads * head_dim "
                f"({self.num_key_value_heads} * {self.head_dim}) into a current and a delayed half: it must be even."
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}."
            )
        unknown = sorted({t for t in self.layer_types if t not in ZAYA_LAYER_TYPES})
        if unknown:
            raise ValueError(f"Unknown ZAYA layer type(s) {unknown}; expected one of {list(ZAYA_LAYER_TYPES)}.")
        if "hybrid_sliding" in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
            raise ValueError("sliding_window must be a positive integer when layer_types contains 'hybrid_sliding'.")
        for layer_type in set(self.layer_types):
            params = self.rope_parameters.get(layer_type)
            if params is None:
                raise ValueError(f"rope_parameters has no entry for layer type '{layer_type}'.")
            rope_type = params.get("rope_type", "default")
            if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
                raise ValueError(
                    f"rope_type {rope_type!r} of '{layer_type}' is not a RoPE type transformers implements; expected "
                    f"one of {['default', *ROPE_INIT_FUNCTIONS]}."
                )
            rotary_dim = int(self.head_dim * params.get("partial_rotary_factor", 1.0))
            if rotary_dim % 2 != 0 or not 0 < rotary_dim <= self.head_dim:
                raise ValueError(
                    f"partial_rotary_factor of '{layer_type}' gives {rotary_dim} rotary dims out of head_dim "
                    f"{self.head_dim}; it must be a positive even number."
                )
        if self.kernel_backend not in ZAYA_KERNEL_BACKENDS:
            raise ValueError(
                f"kernel_backend must be one of {list(ZAYA_KERNEL_BACKENDS)}, got {self.kernel_backend!r}."
            )


__all__ = ["CheckpointError", "InvalidConfigError", "ZayaConfig"]
