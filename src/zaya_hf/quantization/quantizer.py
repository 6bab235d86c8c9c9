# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""The transformers quantizer behind `from_pretrained(path, quantization_config=ZayaQuantizationConfig(...))`.

transformers builds the model on the meta device, lets the quantizer swap modules (`replace_with_quantized`), then
reads the checkpoint one tensor at a time: a bf16 weight of a quantized module goes through `ZayaQuantize` as it is
read (on-the-fly loading is sequential in transformers) and is stored straight in the kernel layout, so the bf16
model is never whole in memory and nothing is re-packed afterwards. A checkpoint saved quantized
(`quantization_config` in its config.json) loads its integer tensors as they are (no re-quantizing) and moves them
to the kernel layout one module at a time. A tied LM head multiplies the quantized embedding's own integers
(`TiedQuantizedHead`), or, with the embedding left in bf16, is quantized from it after loading.
"""

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizers_utils import get_module_from_name

from ..modeling_zaya import ZayaExperts
from . import formats
from .config import QUANT_METHOD, ZayaQuantizationConfig
from .modules import QuantizedEmbedding, QuantizedExperts, QuantizedLinear, QuantizedWeights, TiedQuantizedHead


def quantization_targets(model: nn.Module, config: ZayaQuantizationConfig) -> dict[str, nn.Module]:
    """The modules of `model` that `config` quantizes, by name: every Linear, the experts and, if asked, the
    embedding, less those `modules_to_not_convert` names."""
    embedding = model.get_input_embeddings()
    targets = {}
    for name, module in model.named_modules():
        quantizable = isinstance(module, (nn.Linear, ZayaExperts)) or (module is embedding and config.quantize_embedding)
        if quantizable and config.converts(name):
            targets[name] = module
    return targets


def check_targets(targets: dict[str, nn.Module], config: ZayaQuantizationConfig) -> None:
    """Raise naming the first weight that the format cannot hold (before anything is read or written)."""
    for name, module in targets.items():
        if isinstance(module, ZayaExperts):
            for weight in ("gate_up_proj", "down_proj"):
                config.spec.check(f"{name}.{weight}", tuple(getattr(module, weight).shape))
        else:
            config.spec.check(f"{name}.weight", tuple(module.weight.shape))


def quantized_twin(module: nn.Module, config: ZayaQuantizationConfig, dtype: torch.dtype,
                   kernel_layout: bool) -> QuantizedWeights:
    """An empty quantized module standing in for `module` (on `module`'s device), in the kernel layout (quantizing
    on load) or the checkpoint layout (loading a quantized checkpoint)."""
    spec = config.spec
    with torch.device(next(module.parameters()).device):
        if isinstance(module, ZayaExperts):
            activation = module.config.hidden_act
            return QuantizedExperts(module.num_experts, module.gate_up_proj.shape[-1], module.intermediate_size,
                                    activation, spec, dtype, kernel_layout)
        if isinstance(module, nn.Embedding):
            return QuantizedEmbedding(module.num_embeddings, module.embedding_dim, module.padding_idx, spec, dtype,
                                      kernel_layout)
        return QuantizedLinear(module.in_features, module.out_features, module.bias is not None, spec, dtype,
                               kernel_layout)


class PendingHead(nn.Module):
    """The tied LM head of a model whose embedding stays in bf16, while the checkpoint loads: no tensors of its own
    (the checkpoint has none), quantized from the embedding once that is loaded."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("The LM head is quantized after the checkpoint is loaded; this model did not finish loading.")


def replace_with_quantized(model: nn.Module, config: ZayaQuantizationConfig, pre_quantized: bool,
                           dtype: torch.dtype) -> None:
    """Swap the modules `config` quantizes for empty quantized ones, after checking every shape. A tied LM head
    stays tied to a quantized embedding (`TiedQuantizedHead`: one table, no tensors of its own); with the embedding
    left in bf16 it is untied and quantized from the embedding after loading (`PendingHead`)."""
    targets = quantization_targets(model, config)
    check_targets(targets, config)
    head_name = next((name for name, module in model.named_modules() if module is model.get_output_embeddings()), None)
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    if tied and config.quantize_embedding and head_name not in targets:
        raise ValueError(
            "quantize_embedding=True with a tied LM head left unquantized: the head would have no weight to "
            "multiply. Quantize the head too (drop 'lm_head' from modules_to_not_convert)."
        )
    tied_head = tied and head_name in targets
    if tied_head:
        model.all_tied_weights_keys = {}  # transformers has no parameter to tie: the quantized head handles it
        if not config.quantize_embedding:  # the head gets a quantized tensor of its own
            model.config.get_text_config().tie_word_embeddings = False
            model.config.tie_word_embeddings = False
    for name, module in targets.items():
        if not (tied_head and name == head_name):
            parent, child = get_module_from_name(model, name)
            setattr(parent, child, quantized_twin(module, config, dtype, kernel_layout=not pre_quantized))
    if tied_head:
        parent, child = get_module_from_name(model, head_name)
        embedding = model.get_input_embeddings()
        setattr(parent, child, TiedQuantizedHead(embedding) if config.quantize_embedding else PendingHead())


def finish_quantized_model(model: nn.Module, config: ZayaQuantizationConfig) -> None:
    """After loading: check every quantized module against its config, move a quantized checkpoint's weights to
    the kernel layout (one module at a time), and quantize a pending head from the bf16 embedding."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedWeights):
            module.check_loaded(f"{name}.")
            module.to_kernel_layout()
    if isinstance(model.get_output_embeddings(), PendingHead):
        embedding = model.get_input_embeddings()
        head = QuantizedLinear(embedding.embedding_dim, embedding.num_embeddings, False, config.spec, embedding.weight.dtype)
        head.set_quantized("weight", *formats.quantize(embedding.weight.detach(), config.spec, embedding.weight.dtype))
        model.set_output_embeddings(head)
    copy_out_of_checkpoint(model)
    model.install_fast_paths()


@torch.no_grad()
def copy_out_of_checkpoint(model: nn.Module) -> None:
    """Give every tensor but the quantized integers (just written by quantizing or re-laying-out) memory of its own.
    Loaded, the others are views of the memory-mapped shards, and one small view keeps a whole shard mapped: every
    page of it was read while loading, so all of it would stay in the resident set."""
    for module in model.modules():
        integers = module.quantized_names if isinstance(module, QuantizedWeights) else ()
        for parameter in module.parameters(recurse=False):
            parameter.data = parameter.data.clone()
        for name, buffer in module.named_buffers(recurse=False):
            if name not in integers:
                module._buffers[name] = buffer.clone()


class ZayaQuantize(ConversionOps):
    """Quantize one bf16 checkpoint tensor as it is read: `{name: [weight]}` -> the module's three tensors."""

    def __init__(self, hf_quantizer: "ZayaHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, full_layer_name: str | None = None, model=None, **kwargs) -> dict:
        config = self.hf_quantizer.quantization_config
        result = {}
        for key, value in input_dict.items():
            weight = value[0] if isinstance(value, list) else value
            module, _ = get_module_from_name(model, key)
            config.spec.check(key, tuple(weight.shape))
            result[key], result[f"{key}_scale"] = module.held(
                *formats.quantize(weight, config.spec, module_scale_dtype(module, key))
            )
            result[f"{key}_shape"] = torch.tensor(weight.shape, dtype=torch.int64)
        return result


def module_scale_dtype(module: QuantizedWeights, key: str) -> torch.dtype:
    return getattr(module, f"{key.rpartition('.')[2]}_scale").dtype


class ZayaHfQuantizer(HfQuantizer):
    """transformers' side of `ZayaQuantizationConfig` (registered as quant_method `"zaya_hf"`)."""

    requires_calibration = False
    quantization_config: ZayaQuantizationConfig

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        if devices - {None, "cpu", torch.device("cpu")}:
            raise ValueError(
                f"Quantized ZAYA runs on the CPU (torch's int8 / int4 CPU kernels); device_map={device_map!r} "
                "places weights elsewhere. Load without a device_map (or device_map='cpu')."
            )

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return torch.bfloat16 if dtype is None else dtype

    def get_new_dtype(self, converter, param, dtype: torch.dtype | None) -> torch.dtype | None:
        if dtype is not None and not dtype.is_floating_point:
            return None  # integers load as stored: `check_loaded` names a tensor of the wrong dtype, never cast it
        return super().get_new_dtype(converter, param, dtype)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, QuantizedWeights) and tensor_name in module.quantized_names

    def _process_model_before_weight_loading(self, model, dtype=None, **kwargs):
        replace_with_quantized(model, self.quantization_config, self.pre_quantized, dtype or model.dtype)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        finish_quantized_model(model, self.quantization_config)
        return model

    def get_quantize_ops(self) -> ConversionOps:
        return ZayaQuantize(self)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters (QLoRA); the quantized weights themselves are frozen buffers

    @property
    def is_compileable(self) -> bool:
        return True


def register_quantizer() -> None:
    """Register `"zaya_hf"` with transformers' quantizer tables (idempotent)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, ZayaQuantizationConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, ZayaHfQuantizer)


__all__ = [
    "ZayaHfQuantizer",
    "check_targets",
    "finish_quantized_model",
    "quantization_targets",
    "register_quantizer",
    "replace_with_quantized",
]
