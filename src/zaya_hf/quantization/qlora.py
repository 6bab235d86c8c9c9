# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""QLoRA on a quantized ZAYA: PEFT adapters over the frozen int8 / int4 weights, the fused experts included.

    model = ZayaForCausalLM.from_pretrained(path, quantization_config=ZayaQuantizationConfig(bits=4))
    peft_model = get_qlora_model(model, lora_config(("attention", "experts")))   # zaya_hf.training's presets
    ...train...
    merged = peft_model.merge_and_unload()   # dequantize, add the adapter, re-quantize (see `merge`)

PEFT adapts `nn.Linear`s and, through `target_parameters`, floating 3-D parameters; neither is what a quantized
model holds. `get_qlora_model` registers two PEFT custom layers with the config: `QuantizedLoraLinear` (PEFT's own
LoRA `Linear` over a `QuantizedLinear`) and `QuantizedLoraExperts` (one low-rank pair per expert inside each SwiGLU
expert: the gate/up product and the down product each get `B_e A_e`), and moves the presets' expert
`target_parameters` to the experts module. Under autograd the base products dequantize the one weight they multiply
(each chosen expert's, not the stack), so gradients reach the adapters; the base integers are buffers and never train.

Merging into the quantized base dequantizes each weight, adds the adapter's delta and re-quantizes it in the same
format (round to nearest again): the merged model is quantized like the base, and deltas smaller than half a
quantization step are lost (`merge` returns; `unmerge` refuses, since re-quantizing cannot be undone). To keep the
adapter exactly, merge it into the bf16 checkpoint instead and quantize that.
"""

import math

import torch
from torch import nn
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from . import formats
from .modules import QuantizedExperts, QuantizedLinear

EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


class QuantizedLoraLinear(LoraLinear):
    """PEFT's LoRA `Linear` over a `QuantizedLinear` base; merging re-quantizes the base weight."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in self.lora_variant or self.lora_bias[adapter]:
                raise NotImplementedError(f"Merging a {adapter!r} LoRA variant or LoRA bias into a quantized base.")
            weight = base.dequantized("weight", torch.float32) + self.get_delta_weight(adapter).float()
            requantize(base, "weight", weight, safe_merge, adapter)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        raise_unmerge()


class QuantizedLoraExperts(nn.Module, BaseTunerLayer):
    """LoRA on `QuantizedExperts`: expert e's gate/up product gains `s * B_gu[e] A_gu[e]`, its down product
    `s * B_d[e] A_d[e]` (A: [E, r, in], B: [E, out, r], B zero-initialised so training starts from the base)."""

    adapter_layer_names = ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B")
    other_param_names = ("r", "lora_alpha", "scaling")

    def __init__(self, base_layer: QuantizedExperts, adapter_name: str, config: LoraConfig, r: int = 8,
                 lora_alpha: int = 8, use_rslora: bool = False, **kwargs):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, use_rslora)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, use_rslora: bool = False) -> None:
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}.")
        base = self.base_layer
        experts = base.num_experts
        shapes = {name: tuple(getattr(base, f"{name}_shape").tolist()) for name in base.quantized_names}
        for name, (_, out_features, in_features) in shapes.items():
            prefix = "lora_gate_up" if name == "gate_up_proj" else "lora_down"
            a = torch.empty(experts, r, in_features)
            nn.init.kaiming_uniform_(a.view(-1, in_features), a=math.sqrt(5))
            getattr(self, f"{prefix}_A")[adapter_name] = nn.Parameter(a)
            getattr(self, f"{prefix}_B")[adapter_name] = nn.Parameter(torch.zeros(experts, out_features, r))
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.set_adapter(self.active_adapters)

    def delta(self, name: str, adapter: str, expert: int) -> torch.Tensor:
        """Expert `expert`'s `name` delta [out, in] of `adapter` (scaling included)."""
        prefix = "lora_gate_up" if name == "gate_up_proj" else "lora_down"
        a, b = getattr(self, f"{prefix}_A")[adapter][expert], getattr(self, f"{prefix}_B")[adapter][expert]
        return (b @ a) * self.scaling[adapter]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        adapters = [a for a in self.active_adapters if a in self.lora_gate_up_A]
        if self.disable_adapters or self.merged or not adapters:
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        base = self.base_layer
        expert_index = top_k_index[:, 0]
        output = torch.zeros_like(hidden_states)
        for expert in expert_index.unique().tolist():
            tokens = (expert_index == expert).nonzero().squeeze(-1)
            rows = hidden_states[tokens]
            gate_up = self.adapted_product(rows, "gate_up_proj", expert, adapters)
            gate, up = gate_up.chunk(2, dim=-1)
            out = self.adapted_product(base.act_fn(gate) * up, "down_proj", expert, adapters)
            output = output.index_add(0, tokens, (out * top_k_weights[tokens]).to(output.dtype))
        return output

    def adapted_product(self, rows: torch.Tensor, name: str, expert: int, adapters: list[str]) -> torch.Tensor:
        """rows [n, in] through expert `expert`'s dequantized `name` plus each adapter's low-rank term."""
        prefix = "lora_gate_up" if name == "gate_up_proj" else "lora_down"
        out = nn.functional.linear(rows, self.base_layer.expert_weight(name, expert).to(rows.dtype))
        for adapter in adapters:
            a, b = getattr(self, f"{prefix}_A")[adapter][expert], getattr(self, f"{prefix}_B")[adapter][expert]
            low_rank = (rows.to(a.dtype) @ a.T) @ b.T  # [n, r] -> [n, out]
            out = out + (low_rank * self.scaling[adapter]).to(out.dtype)
        return out

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.base_layer
        for adapter in check_adapters_to_merge(self, adapter_names):
            for name in base.quantized_names:
                weights = base.dequantized(name, torch.float32)  # [E, out, in]
                for expert in range(base.num_experts):
                    weights[expert] += self.delta(name, adapter, expert).detach().float()
                requantize(base, name, weights, safe_merge, adapter)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        raise_unmerge()


def requantize(base, name: str, weight: torch.Tensor, safe_merge: bool, adapter: str) -> None:
    if safe_merge and not torch.isfinite(weight).all():
        raise ValueError(f"NaNs or infinities in the merged weights: the adapter {adapter!r} seems to be broken.")
    scale_dtype = getattr(base, f"{name}_scale").dtype
    base.set_quantized(name, *formats.quantize(weight, base.spec, scale_dtype))


def raise_unmerge() -> None:
    raise NotImplementedError(
        "An adapter merged into a quantized base cannot be unmerged: the merge re-quantized the weights. Reload the "
        "base model (or merge into the bf16 checkpoint and quantize that, to keep the adapter exactly)."
    )


def qlora_config(config: LoraConfig) -> LoraConfig:
    """`config` (e.g. from `zaya_hf.training.lora_config`) for a quantized ZAYA: the experts' `target_parameters`
    become the experts module, and the quantized modules get their PEFT layers."""
    parameters = list(config.target_parameters or [])
    experts = [p for p in parameters if p in EXPERT_PARAMETERS or p.endswith(EXPERT_PARAMETERS)]
    if experts:
        config.target_parameters = [p for p in parameters if p not in experts] or None
        modules = set(config.target_modules or ()) if not isinstance(config.target_modules, str) else {config.target_modules}
        config.target_modules = sorted(modules | {"mlp.experts"})
    config._register_custom_module({QuantizedLinear: QuantizedLoraLinear, QuantizedExperts: QuantizedLoraExperts})
    return config


def get_qlora_model(model: nn.Module, config: LoraConfig, **kwargs):
    """`peft.get_peft_model` for a quantized ZAYA (see the module doc)."""
    return get_peft_model(model, qlora_config(config), **kwargs)


__all__ = ["QuantizedLoraExperts", "QuantizedLoraLinear", "get_qlora_model", "qlora_config"]
