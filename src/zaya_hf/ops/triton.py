# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""Module forwards that run the fused Triton kernels of `triton_kernels` (ROCm and CUDA). Package-only.

`install_triton_forwards` gives the attention, router, experts and decoder-layer modules the subclasses below when
`config.kernel_backend` is `"triton"` (or `"auto"` on a machine with a GPU), once per model as it is built, loaded
or moved. Each subclass runs its kernel where the kernel can: all tensors on a Triton device (CUDA/ROCm, or the CPU
under `TRITON_INTERPRET=1`) and, for the forward-only kernels (all but the residual norms), autograd not recording,
so that gradients are always the torch ones. Elsewhere it runs the model's own forward, which is also what the
kernels are tested against. Inside `torch.compile` the torch forwards are traced: Inductor fuses them itself.
"""

import torch
from torch import nn

from ..modeling_zaya import ZayaAttention, ZayaDecoderLayer, ZayaExperts, ZayaRouter
from . import triton_kernels as kernels


def kernels_can_run(*tensors: torch.Tensor | None, differentiable: bool = False) -> bool:
    present = [t for t in tensors if t is not None]
    if torch.compiler.is_compiling() or not all(kernels.on_triton_device(t) for t in present):
        return False
    return differentiable or not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


class TritonAttention(ZayaAttention):
    """The CCA conv, q/k residual terms, QK norm and partial RoPE in one kernel (`cca_qk_mix`)."""

    def forward(self, hidden_states, position_embeddings, attention_mask=None, padding_mask=None,
                sequence_positions=None, cache=None, **kwargs):
        projection = self.qkv_proj
        depthwise, grouped = projection.conv_qk_depthwise, projection.conv_qk_grouped
        cos, sin = position_embeddings
        weights = (depthwise.weight, grouped.weight, self.qk_norm.temp, cos)
        if sequence_positions is not None or not kernels_can_run(hidden_states, *weights):
            return super().forward(hidden_states, position_embeddings, attention_mask, padding_mask,
                                   sequence_positions, cache, **kwargs)
        if padding_mask is not None:
            hidden_states = hidden_states * padding_mask[:, :, None].to(hidden_states.dtype)
        query, key = projection.q_proj(hidden_states), projection.k_proj(hidden_states)
        conv_state = cache.get_conv_state(self.layer_idx) if cache is not None else None
        if conv_state is not None:
            conv_state = conv_state.narrow(-1, conv_state.shape[-1] - projection.conv_width, projection.conv_width)
        qk_columns = torch.cat([query, key], dim=-1).transpose(1, 2)  # [B, C, S]
        query, key, _ = kernels.cca_qk_mix(
            query, key, conv_state, depthwise.weight, depthwise.bias, grouped.weight, grouped.bias,
            self.qk_norm.temp, cos, sin, return_window=False,
        )  # [B, S, heads, D] views of [B, heads, S, D]
        value = projection.values(hidden_states, cache)  # before the conv state update, as the model's forward
        if cache is not None:  # after the kernel read the state: the update overwrites it in place
            cache.update_conv_state(qk_columns, self.layer_idx, conv_kernel_size=projection.conv_width)
        return self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask, cache,
                           **kwargs)


class TritonRouter(ZayaRouter):
    """Router state, RMSNorm, the two GELU layers, logits, softmax and the biased top-1 in one kernel."""

    def forward(self, hidden_states, router_state=None, padding_mask=None):
        mlp = self.router_mlp
        layers = (mlp.fc1, mlp.fc2, mlp.out_proj)
        scale = self.router_states_scale if self.carries_state else None
        tensors = (hidden_states, router_state, scale, mlp.norm.weight, *(layer.weight for layer in layers))
        # Adapted (LoRA-wrapped) or quantized layers hold weights the kernel cannot read: the torch forward calls them.
        plain = all(isinstance(layer, nn.Linear) and type(layer.weight) is nn.Parameter for layer in layers)
        if not plain or not kernels_can_run(*tensors):
            return super().forward(hidden_states, router_state, padding_mask)
        router_hidden = self.down_proj(hidden_states)
        carried = router_state if self.carries_state else None
        logits, weight, choice, router_hidden = kernels.router_top1(
            router_hidden, carried, scale, mlp.norm.weight, mlp.norm.variance_epsilon, mlp.fc1.weight, mlp.fc1.bias,
            mlp.fc2.weight, mlp.fc2.bias, mlp.out_proj.weight, self.balancing_biases,
        )
        logits, weight, choice = logits.flatten(0, 1), weight.reshape(-1, 1), choice.reshape(-1, 1)
        if self.training:
            self.record_load(choice[:, 0], torch.softmax(logits, dim=-1).float() + self.balancing_biases, padding_mask)
        return (logits, *self.experts_arguments(weight, choice), router_hidden)


class TritonExperts(ZayaExperts):
    """Tokens sorted by expert, then two grouped GEMMs (SwiGLU fused, router weight and scatter fused)."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if self.config.hidden_act != "silu" or not kernels_can_run(hidden_states, self.gate_up_proj, top_k_weights):
            return super().forward(hidden_states, top_k_index, top_k_weights)
        return kernels.moe_top1(hidden_states, top_k_index[:, 0], top_k_weights[:, 0], self.gate_up_proj, self.down_proj)


class TritonDecoderLayer(ZayaDecoderLayer):
    """Each learned residual merge fused with the RMSNorm after it (differentiable: Triton backward)."""

    def forward(self, residual, router_state, position_embeddings, attention_mask=None, padding_mask=None,
                sequence_positions=None, cache=None, **kwargs):
        scalings = (self.post_attention_residual_scale, self.post_mlp_residual_scale)
        norms = (self.input_layernorm, self.post_attention_layernorm)
        tensors = [residual, *(norm.weight for norm in norms), *(s.hidden_states_scale for s in scalings)]
        if not kernels_can_run(*tensors, differentiable=True):
            return super().forward(residual, router_state, position_embeddings, attention_mask, padding_mask,
                                   sequence_positions, cache, **kwargs)
        hidden_states = kernels.residual_rmsnorm(residual, self.input_layernorm.weight, self.input_layernorm.variance_epsilon)
        hidden_states, _ = self.self_attn(
            hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
            padding_mask=padding_mask, sequence_positions=sequence_positions, cache=cache, **kwargs,
        )
        residual, hidden_states = merge(hidden_states, residual, self.post_attention_residual_scale,
                                        self.post_attention_layernorm)
        hidden_states, router_state = self.mlp(hidden_states, router_state, padding_mask)
        residual, _ = merge(hidden_states, residual, self.post_mlp_residual_scale)
        return residual, router_state


def merge(hidden_states, residual, scaling, norm=None):
    """`residual_merge_rmsnorm` with the parameters of a `ZayaResidualScaling` (and of the RMSNorm after it)."""
    return kernels.residual_merge_rmsnorm(
        hidden_states, residual, scaling.hidden_states_scale, scaling.hidden_states_bias, scaling.residual_scale,
        scaling.residual_bias, norm.weight if norm is not None else None, norm.variance_epsilon if norm is not None else 0.0,
    )


TRITON_FORWARDS: dict[type, type] = {
    ZayaAttention: TritonAttention,
    ZayaRouter: TritonRouter,
    ZayaExperts: TritonExperts,
    ZayaDecoderLayer: TritonDecoderLayer,
}


def uses_triton(kernel_backend: str) -> bool:
    """`"triton"` always; `"auto"` where a GPU is (under the CPU interpreter, "auto" stays on torch)."""
    return kernel_backend == "triton" or (kernel_backend == "auto" and torch.cuda.is_available())


def install_triton_forwards(model: nn.Module) -> None:
    """The Triton subclass for each module the kernels cover, when the model's kernel_backend selects them; the
    model's own classes otherwise (a class the CPU fast paths gave a module counts as its model class)."""
    enabled = uses_triton(model.config.kernel_backend)
    if model.config.kernel_backend == "triton" and not (torch.cuda.is_available() or kernels.INTERPRET):
        raise RuntimeError(
            "kernel_backend='triton' needs a CUDA or ROCm GPU. Use kernel_backend='auto' to run the kernels only where "
            "one is (or set TRITON_INTERPRET=1 before importing zaya_hf to run them in Triton's CPU interpreter, for "
            "tests)."
        )
    for module in model.modules():
        base = next((base for base in TRITON_FORWARDS if isinstance(module, base)), None)
        if base is None:
            continue
        if enabled:
            module.__class__ = TRITON_FORWARDS[base]
        elif type(module) is TRITON_FORWARDS[base]:
            module.__class__ = base
