# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""Modules holding quantized weights: `QuantizedLinear`, `QuantizedEmbedding` and `QuantizedExperts`.

Each quantized weight `NAME` is three buffers: `NAME` (the integers), `NAME_scale` and `NAME_shape` (the
unquantized shape, int64). In use they hold what torch's CPU kernels read (the kernel layout, `formats`); a
checkpoint stores compressed-tensors' pack-quantized layout. Quantizing on load writes the kernel layout directly;
a quantized checkpoint loads into checkpoint-layout buffers, which `to_kernel_layout()` rewrites once, in place.
`state_dict()` writes the checkpoint layout back (and `load_state_dict` reads it), so every saved file has one
layout whatever the machine.

Decode reads the kernel-layout weights directly: a product is one call of `torch._weight_int8pack_mm` /
`torch._weight_int4pack_mm_for_cpu`, and the top-1 experts run each chosen expert's matrices as a view of the
stacked ones (no expert is dequantized). Under autograd (QLoRA) the products dequantize their weight instead, so
gradients reach the inputs; the weights themselves are frozen integers.
"""

from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from . import formats
from .formats import QuantSpec, quantized_matmul


class QuantizedWeights(nn.Module):
    """Buffers and layout conversions shared by the quantized modules (names in `quantized_names`)."""

    quantized_names: tuple[str, ...] = ("weight",)

    def __init__(self, spec: QuantSpec, shapes: dict[str, tuple[int, ...]], scale_dtype: torch.dtype,
                 kernel_layout: bool):
        super().__init__()
        self.spec = spec
        self.in_kernel_layout = kernel_layout
        self.rows = {name: shape[-2] for name, shape in shapes.items()}  # output rows (the kernel layout may pad)
        for name, shape in shapes.items():
            integers_shape, integers_dtype, scale_shape = spec.stored(shape, kernel_layout)
            self.register_buffer(name, torch.empty(integers_shape, dtype=integers_dtype))
            self.register_buffer(f"{name}_scale", torch.empty(scale_shape, dtype=scale_dtype))
            self.register_buffer(f"{name}_shape", torch.tensor(shape, dtype=torch.int64))
        self._register_state_dict_hook(_checkpoint_layout_state_dict)
        self._register_load_state_dict_pre_hook(_checkpoint_layout_load, with_module=True)

    def held(self, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integers `q` [..., N, K] and scales [..., N, G] (from `formats.quantize`) in the layout this module holds."""
        if self.in_kernel_layout:
            return formats.to_kernel_layout(q, scale, self.spec)
        return formats.pack_int32(q, self.spec.bits), scale

    def set_quantized(self, name: str, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Hold integers `q` [..., N, K] and scales [..., N, G] (from `formats.quantize`) as weight `name`."""
        integers, scale = self.held(q, scale)
        setattr(self, name, integers)
        setattr(self, f"{name}_scale", scale)
        setattr(self, f"{name}_shape", torch.tensor(q.shape, dtype=torch.int64))

    def quantized(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [..., N, K], scale [..., N, G]) of weight `name`, whatever layout it is held in."""
        if self.in_kernel_layout:
            return formats.from_kernel_layout(getattr(self, name), getattr(self, f"{name}_scale"), self.spec,
                                              self.rows[name])
        return formats.unpack_int32(getattr(self, name), self.spec.bits), getattr(self, f"{name}_scale")

    def dequantized(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        q, scale = self.quantized(name)
        return formats.dequantize(q, scale, dtype or scale.dtype)

    def check_loaded(self, prefix: str) -> None:
        """Raise naming the tensor if the checkpoint's integers, scales or shapes disagree with this format."""
        for name in self.quantized_names:
            shape = tuple(getattr(self, f"{name}_shape").tolist())
            integers_shape, integers_dtype, scale_shape = self.spec.stored(shape, self.in_kernel_layout)
            expected = {name: (integers_shape, integers_dtype), f"{name}_scale": (scale_shape, None)}
            for tensor_name, (tensor_shape, dtype) in expected.items():
                tensor = getattr(self, tensor_name)
                if tuple(tensor.shape) != tensor_shape or (dtype is not None and tensor.dtype != dtype):
                    raise formats.QuantizationFormatError(
                        f"{prefix}{tensor_name}: the checkpoint holds {tensor.dtype} {tuple(tensor.shape)}, but "
                        f"{self.spec.bits}-bit {self.spec_name()} weights of shape {shape} are stored as "
                        f"{dtype or 'floating'} {tensor_shape}: the quantization_config does not match the tensors."
                    )
            if not getattr(self, f"{name}_scale").is_floating_point():
                raise formats.QuantizationFormatError(
                    f"{prefix}{name}_scale: scales must be floating point, the checkpoint holds "
                    f"{getattr(self, f'{name}_scale').dtype}."
                )

    def spec_name(self) -> str:
        return "per-channel" if self.spec.group_size is None else f"group-{self.spec.group_size}"

    def to_kernel_layout(self) -> None:
        """Rewrite the weights, in place, into the layout torch's CPU kernels read (once)."""
        if self.in_kernel_layout:
            return
        for name in self.quantized_names:
            q = formats.unpack_int32(getattr(self, name), self.spec.bits)
            packed, scale = formats.to_kernel_layout(q, getattr(self, f"{name}_scale"), self.spec)
            setattr(self, name, packed)
            setattr(self, f"{name}_scale", scale)
        self.in_kernel_layout = True

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        devices = {buffer.device.type for buffer in self.buffers() if not buffer.is_meta}
        if devices - {"cpu"}:
            raise NotImplementedError(
                f"{type(self).__name__}: quantized ZAYA weights run on the CPU only (torch's int8 / int4 CPU "
                f"kernels), not on {sorted(devices - {'cpu'})}."
            )
        return self

    def extra_repr(self) -> str:
        return f"int{self.spec.bits} {self.spec_name()}"


def _checkpoint_layout_state_dict(module: QuantizedWeights, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: the kernel-layout weights written in the checkpoint layout."""
    if not module.in_kernel_layout:
        return
    for name in module.quantized_names:
        q, scale = module.quantized(name)
        state_dict[prefix + name] = formats.pack_int32(q, module.spec.bits)
        state_dict[prefix + f"{name}_scale"] = scale


def _checkpoint_layout_load(module: QuantizedWeights, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: a checkpoint-layout state dict goes into a kernel-layout module."""
    if not module.in_kernel_layout:
        return
    for name in module.quantized_names:
        if prefix + name in state_dict and prefix + f"{name}_scale" in state_dict:
            q = formats.unpack_int32(state_dict[prefix + name], module.spec.bits)
            packed, scale = formats.to_kernel_layout(q, state_dict[prefix + f"{name}_scale"], module.spec)
            state_dict[prefix + name], state_dict[prefix + f"{name}_scale"] = packed, scale


def quantized_linear(x: torch.Tensor, module: QuantizedWeights, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x` [..., K] times `module`'s quantized `weight` [N, K]: torch's integer kernel, or, under autograd (or
    before the kernel layout), the dequantized weight."""
    if not module.in_kernel_layout or not kernels_apply(x):
        return F.linear(x, module.dequantized("weight", x.dtype), bias)
    out = formats.kernel_linear(x, module.weight, module.weight_scale, module.spec, module.rows["weight"])
    return out if bias is None else out + bias


def kernels_apply(*tensors: torch.Tensor) -> bool:
    """The integer kernels run the product: autograd records none of the inputs (else the dequantized weight is
    multiplied, so that gradients reach the inputs)."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class QuantizedLinear(QuantizedWeights):
    """An `nn.Linear` whose weight [out, in] is quantized; the bias stays a floating parameter."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantSpec, dtype: torch.dtype,
                 kernel_layout: bool = True):
        super().__init__(spec, {"weight": (out_features, in_features)}, dtype, kernel_layout)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {super().extra_repr()}"


class QuantizedEmbedding(QuantizedWeights):
    """An `nn.Embedding` whose table [vocab, d] is quantized; lookups unpack only the rows they read. The table is
    held in the kernel layout like a Linear's weight, so a tied LM head multiplies it as it is
    (`TiedQuantizedHead`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, spec: QuantSpec,
                 dtype: torch.dtype, kernel_layout: bool = True):
        super().__init__(spec, {"weight": (num_embeddings, embedding_dim)}, dtype, kernel_layout)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.in_kernel_layout:
            return F.embedding(input_ids, self.dequantized("weight"))
        rows, scale = formats.kernel_rows(self.weight, self.weight_scale, self.spec, input_ids)  # [..., d] int8
        return formats.dequantize(rows, scale, self.weight_scale.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {super().extra_repr()}"


class TiedQuantizedHead(nn.Module):
    """The LM head of a tied model whose embedding is quantized: it multiplies the embedding's own integers, so
    the table is held once (as in the bf16 model) and the checkpoint stays tied (the head has no tensors)."""

    def __init__(self, embedding: QuantizedEmbedding):
        super().__init__()
        self._embedding = [embedding]  # a reference, not a submodule: the table has one state-dict entry

    @property
    def embedding(self) -> QuantizedEmbedding:
        return self._embedding[0]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return quantized_linear(hidden_states, self.embedding)

    def extra_repr(self) -> str:
        return f"tied to the embedding ({self.embedding.extra_repr()})"


def top1_experts(
    hidden_states: torch.Tensor,
    expert_index: torch.Tensor,
    routing_weights: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_scale: torch.Tensor,
    down: torch.Tensor,
    down_scale: torch.Tensor,
    bits: int,
    group_size: int,
    activation: str,
) -> torch.Tensor:
    """Top-1 SwiGLU experts on kernel-layout weights: `hidden_states` [N, d], `expert_index` [N], `routing_weights`
    [N, 1] -> [N, d]. Tokens are grouped by expert and each group multiplies its expert's matrices in place (a view
    of the stacked [E, ...] buffers); `group_size` 0 is per channel. Products are cut to their true widths (the
    int4 kernel layout may pad the rows: `formats.int4_padded_rows`)."""
    act_fn = _activation(activation)
    hidden = hidden_states.shape[-1]
    gate_up_rows = 2 * (down.shape[-1] * 2 if bits == 4 else down.shape[-1])  # 2I: down's input features, twice
    if hidden_states.shape[0] == 1:
        expert = int(expert_index[0])
        gate_up_out = quantized_matmul(hidden_states, gate_up[expert], gate_up_scale[expert], bits, group_size)
        gate, up = gate_up_out[:, :gate_up_rows].chunk(2, -1)
        out = quantized_matmul(act_fn(gate) * up, down[expert], down_scale[expert], bits, group_size)[:, :hidden]
        return (out * routing_weights).to(hidden_states.dtype)
    output = torch.zeros_like(hidden_states)
    order = torch.argsort(expert_index, stable=True)
    experts, counts = torch.unique_consecutive(expert_index[order], return_counts=True)
    for expert, tokens in zip(experts.tolist(), order.split(counts.tolist())):
        gate_up_out = quantized_matmul(hidden_states[tokens], gate_up[expert], gate_up_scale[expert], bits, group_size)
        gate, up = gate_up_out[:, :gate_up_rows].chunk(2, dim=-1)
        out = quantized_matmul(act_fn(gate) * up, down[expert], down_scale[expert], bits, group_size)[:, :hidden]
        output.index_copy_(0, tokens, (out * routing_weights[tokens]).to(output.dtype))
    return output


@cache
def _activation(name: str) -> nn.Module:
    return ACT2FN[name]


# Compiled graphs call the experts as one opaque op (its token grouping is data-dependent).
top1_experts_op = torch.library.custom_op("zaya_hf::quantized_top1_experts", mutates_args=())(top1_experts)


@top1_experts_op.register_fake
def _(hidden_states, expert_index, routing_weights, gate_up, gate_up_scale, down, down_scale, bits, group_size,
      activation):
    return torch.empty_like(hidden_states)


class QuantizedExperts(QuantizedWeights):
    """`ZayaExperts` with quantized `gate_up_proj` [E, 2I, d] and `down_proj` [E, d, I]; same forward arguments
    (`hidden_states` [N, d], `top_k_index` / `top_k_weights` [N, 1], skip-class tokens as expert 0 with weight 0)."""

    quantized_names = ("gate_up_proj", "down_proj")

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str, spec: QuantSpec,
                 dtype: torch.dtype, kernel_layout: bool = True):
        shapes = {
            "gate_up_proj": (num_experts, 2 * intermediate_size, hidden_size),
            "down_proj": (num_experts, hidden_size, intermediate_size),
        }
        super().__init__(spec, shapes, dtype, kernel_layout)
        self.num_experts, self.intermediate_size, self.activation = num_experts, intermediate_size, activation
        self.act_fn = ACT2FN[activation]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.in_kernel_layout and kernels_apply(hidden_states, top_k_weights):
            experts = top1_experts_op if torch.compiler.is_compiling() else top1_experts
            return experts(
                hidden_states.contiguous(), top_k_index[:, 0], top_k_weights, self.gate_up_proj,
                self.gate_up_proj_scale, self.down_proj, self.down_proj_scale, self.spec.bits,
                self.spec.group_size or 0, self.activation,
            )
        return self.dequantized_forward(hidden_states, top_k_index[:, 0], top_k_weights)

    def dequantized_forward(self, hidden_states: torch.Tensor, expert_index: torch.Tensor,
                            routing_weights: torch.Tensor) -> torch.Tensor:
        """Autograd's path: each chosen expert's weights dequantized (only those), gradients to the inputs."""
        output = torch.zeros_like(hidden_states)
        for expert in expert_index.unique().tolist():
            tokens = (expert_index == expert).nonzero().squeeze(-1)
            gate, up = F.linear(hidden_states[tokens], self.expert_weight("gate_up_proj", expert)).chunk(2, dim=-1)
            out = F.linear(self.act_fn(gate) * up, self.expert_weight("down_proj", expert))
            output = output.index_add(0, tokens, (out * routing_weights[tokens]).to(output.dtype))
        return output

    @property
    def qweight(self) -> torch.Tensor:
        """The gate/up integers, under the name PEFT reads the device of a quantized layer from (GPTQ's)."""
        return self.gate_up_proj

    def expert_weight(self, name: str, expert: int) -> torch.Tensor:
        """Expert `expert`'s dequantized `name` matrix."""
        packed, scale = getattr(self, name)[expert], getattr(self, f"{name}_scale")[expert]
        if self.in_kernel_layout:
            q, scale = formats.from_kernel_layout(packed, scale, self.spec, self.rows[name])
        else:
            q = formats.unpack_int32(packed, self.spec.bits)
        return formats.dequantize(q, scale, scale.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, {super().extra_repr()}"


__all__ = [
    "QuantizedEmbedding",
    "QuantizedExperts",
    "QuantizedLinear",
    "QuantizedWeights",
    "TiedQuantizedHead",
    "top1_experts",
    "top1_experts_op",
]
