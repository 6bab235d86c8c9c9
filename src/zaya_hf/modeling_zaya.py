# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""ZAYA1: Compressed Convolutional Attention + top-1 MoE with an MLP router, learned residual scaling.

The math and the rounding points follow ZAYA_ARCHITECTURE.md; the tensor names are those of the published
`Zyphra/ZAYA1-8B` checkpoint, so state dicts move unchanged between this file, transformers, vLLM and SGLang.
This file is the one torch implementation of every op, and travels with checkpoints as remote code. The zaya_hf
package adds faster forwards for some modules (`zaya_hf.ops`: CPU products, Triton kernels), chosen once for the
model as it is built, loaded or moved (`ZayaPreTrainedModel.fast_paths`); remote code runs the forwards below.
"""

import copy
from collections import defaultdict
from collections.abc import Callable, Iterator
from itertools import chain
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionCacheLayerMixin
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import (
    create_causal_mask,
    create_recurrent_attention_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, load_state_dict, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .cache_zaya import ZayaCache
from .configuration_zaya import CheckpointError, InvalidConfigError, ZayaConfig
from .generation_zaya import ZayaGenerationMixin


class ZayaRMSNorm(nn.Module):
    """RMSNorm computed in fp32; the weight multiplies the result cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class ZayaRotaryEmbedding(nn.Module):
    """Partial NeoX RoPE with one inverse-frequency table per layer type (`hybrid`, `hybrid_sliding`), for every
    RoPE type transformers implements (`rope_parameters[layer_type]["rope_type"]`: linear, dynamic, yarn, ...)."""

    def __init__(self, config: ZayaConfig, device: torch.device | None = None):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        self.layer_types = sorted(set(config.layer_types))
        self.rope_type = {t: config.rope_parameters[t].get("rope_type", "default") for t in self.layer_types}
        for layer_type in self.layer_types:
            inv_freq, attention_scaling = self.compute_inv_freq(layer_type, device)
            self.register_buffer(f"{layer_type}_inv_freq", inv_freq, persistent=False)
            self.register_buffer(f"{layer_type}_original_inv_freq", inv_freq.clone(), persistent=False)
            setattr(self, f"{layer_type}_attention_scaling", attention_scaling)

    def compute_inv_freq(self, layer_type: str, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
        """`(inverse frequencies [R/2], attention scaling)` of `layer_type`, R = head_dim * partial_rotary_factor."""
        rope_type = self.rope_type[layer_type]
        if rope_type != "default":
            return ROPE_INIT_FUNCTIONS[rope_type](self.config, device, layer_type=layer_type)
        params = self.config.rope_parameters[layer_type]
        rotary_dim = int(self.config.head_dim * params.get("partial_rotary_factor", 1.0))
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float, device=device) / rotary_dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0

    @torch.no_grad()
    @dynamic_rope_update  # dynamic and longrope types recompute their frequencies from the positions
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = getattr(self, f"{layer_type}_inv_freq")
        attention_scaling = getattr(self, f"{layer_type}_attention_scaling")
        freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)  # [B, S, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, R]
        return (emb.cos() * attention_scaling).to(x.dtype), (emb.sin() * attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first `cos.shape[-1]` dims of `query` / `key` [B, heads, S, D] (partial RoPE); the rest pass."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)

    return rotate(query), rotate(key)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, K, T, D] -> [B, K * n_rep, T, D], query head h reading kv head h // n_rep."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, length, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, length, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, length, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # [B, S, H, D]
    return attn_output, attn_weights


class ZayaCCAProjection(nn.Module):
    """Compressed Convolutional Attention projection: hidden states -> (Q, K, V) before QK norm and RoPE.

    q/k are mixed over time by a causal depthwise conv followed by a grouped conv (one group per head), plus
    residual terms from the pre-conv projections; half of each value comes from the previous token ("delayed").
    The conv and the delayed value make the layer stateful: the cache carries the last `W` pre-conv columns
    (`conv_states`) and the last delayed value (`recurrent_states`) between calls.
    """

    def __init__(self, config: ZayaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.conv_width = config.cca_conv_width
        query_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        conv_channels = query_size + kv_size

        self.q_proj = nn.Linear(config.hidden_size, query_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj_current = nn.Linear(config.hidden_size, kv_size // 2, bias=config.attention_bias)
        self.v_proj_delayed = nn.Linear(config.hidden_size, kv_size // 2, bias=config.attention_bias)
        self.conv_qk_depthwise = nn.Conv1d(conv_channels, conv_channels, config.cca_time0, groups=conv_channels)
        self.conv_qk_grouped = nn.Conv1d(
            conv_channels, conv_channels, config.cca_time1, groups=self.num_heads + self.num_kv_heads
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        padding_mask: torch.Tensor | None = None,
        sequence_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`hidden_states` [B, S, d] -> query [B, S, H, D], key and value [B, S, K, D].

        `padding_mask` [B, S] zeroes padded tokens, which makes left padding exactly equivalent to none.
        `sequence_positions` [B, S] (packed rows only) gives each token's position in its own sequence: the conv
        and the delayed value restart at every position 0, as if each sequence ran alone.
        """
        batch, seq_len, _ = hidden_states.shape
        B, S, K, D, W = batch, seq_len, self.num_kv_heads, self.head_dim, self.conv_width
        G = self.num_heads // K
        if padding_mask is not None:
            hidden_states = hidden_states * padding_mask[:, :, None].to(hidden_states.dtype)

        query = self.q_proj(hidden_states)  # [B, S, H*D]
        key = self.k_proj(hidden_states)  # [B, S, K*D]
        # Residual terms: q_res[h] = (q[h] + k[h // G]) / 2, k_res[j] = mean of q_res over the G heads of group j.
        query_residual = (query.view(B, S, K, G, D) + key.view(B, S, K, 1, D)) * 0.5  # [B, S, K, G, D]
        key_residual = query_residual.mean(dim=-2)  # [B, S, K, D]

        # The causal convs read the W pre-conv columns before this step (the cache's conv state, else zeros).
        qk_columns = torch.cat([query, key], dim=-1).transpose(1, 2)  # [B, C, S], channels: q heads then k heads
        conv_state = cache.get_conv_state(self.layer_idx) if cache is not None else None
        if conv_state is None:
            history = qk_columns.new_zeros(B, qk_columns.shape[1], W)
        else:  # a cache recording its past for `crop` holds more columns than W
            history = conv_state.narrow(-1, conv_state.shape[-1] - W, W)
        mixed = self.causal_conv(torch.cat([history, qk_columns], dim=-1), sequence_positions)  # [B, S, C]
        query = mixed[..., : K * G * D].view(B, S, K * G, D) + query_residual.view(B, S, K * G, D)
        key = mixed[..., K * G * D :].view(B, S, K, D) + key_residual

        value = self.values(hidden_states, cache, sequence_positions)
        if cache is not None:
            cache.update_conv_state(qk_columns, self.layer_idx, conv_kernel_size=W)
        return query, key, value

    def values(
        self, hidden_states: torch.Tensor, cache: Cache | None, sequence_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`[B, S, K, D]`: half of each value from the current token, half delayed by one (the previous token's
        `v_proj_delayed`; at a sequence's first token, that of a zero token). Updates the cache's delayed value."""
        batch, seq_len, hidden_size = hidden_states.shape
        value_current = self.v_proj_current(hidden_states)  # [B, S, K*D/2]
        value_delayed = self.v_proj_delayed(hidden_states)  # [B, S, K*D/2]
        value_state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        if value_state is None or sequence_positions is not None:
            value_start = self.v_proj_delayed(hidden_states.new_zeros(1, 1, hidden_size))
        previous = value_start.expand(batch, 1, -1) if value_state is None else value_state[:, None]
        value_previous = torch.cat([previous, value_delayed[:, :-1]], dim=1)  # [B, S, K*D/2]
        if sequence_positions is not None:
            value_previous = torch.where((sequence_positions == 0)[..., None], value_start, value_previous)
        if cache is not None:
            cache.update_recurrent_state(value_delayed[:, -1], self.layer_idx, delayed_values=value_delayed)
        value = torch.cat([value_current, value_previous], dim=-1)
        return value.view(batch, seq_len, self.num_kv_heads, self.head_dim)

    def causal_conv(self, window: torch.Tensor, sequence_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Depthwise then grouped causal conv over time: `window` [B, C, W + S] (W columns of history, then the S
        new ones) -> [B, S, C]. Prefill, decode steps and packed rows all come here.

        In packed rows each output reads its own W + 1 columns with those before its sequence's start zeroed,
        which is what running its sequence alone gives (the depthwise outputs there are then its bias, not 0).
        """
        if sequence_positions is None:
            return self.conv_qk_grouped(self.conv_qk_depthwise(window)).transpose(1, 2)
        batch, channels, _ = window.shape
        seq_len, width = sequence_positions.shape[1], self.conv_width + 1
        # Column j of output t's window is token t - W + j: inside t's sequence iff position_t - W + j >= 0.
        inside = sequence_positions[:, :, None] + torch.arange(width, device=window.device) >= self.conv_width
        windows = window.unfold(-1, width, 1) * inside[:, None].to(window.dtype)  # [B, C, S, W + 1]
        windows = windows.permute(0, 2, 1, 3).reshape(batch * seq_len, channels, width)
        return self.causal_conv(windows).reshape(batch, seq_len, channels)


class ZayaQKNorm(nn.Module):
    """L2-normalises each q/k head to norm sqrt(head_dim); keys are then scaled by a learned per-kv-head `temp`."""

    def __init__(self, config: ZayaConfig):
        super().__init__()
        self.head_dim_scale = config.head_dim**0.5
        self.temp = nn.Parameter(torch.ones(config.num_key_value_heads))

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.finfo(query.dtype).eps
        query = query * (self.head_dim_scale / query.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        key = key * (self.head_dim_scale / key.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        return query, key * self.temp[None, None, :, None]


class ZayaAttention(nn.Module):
    """CCA projection -> QK norm -> partial RoPE -> GQA attention (full or sliding window) -> o_proj."""

    def __init__(self, config: ZayaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "hybrid_sliding" else None
        self.qkv_proj = ZayaCCAProjection(config, layer_idx)
        self.qk_norm = ZayaQKNorm(config)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        sequence_positions: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query, key, value = self.qkv_proj(hidden_states, cache, padding_mask, sequence_positions)
        query, key = self.qk_norm(query, key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, heads, S, D]
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        return self.attend(query, key, value, attention_mask, cache, **kwargs)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of `query` [B, H, S, D] over the cached and new `key` / `value` [B, K, S, D], then o_proj."""
        batch, _, seq_len, _ = query.shape
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attn_output, attn_weights = self.attention_function()(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        return self.o_proj(attn_output.reshape(batch, seq_len, -1)), attn_weights

    def attention_function(self) -> Callable:
        """The configured attention implementation (`config._attn_implementation`) from transformers' registry."""
        return ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)


class ZayaResidualScaling(nn.Module):
    """Learned residual merge: `(h + hs_bias) * hs_scale` in model dtype plus `(r + res_bias) * res_scale` in fp32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(hidden_size))
        self.hidden_states_bias = nn.Parameter(torch.zeros(hidden_size))
        self.residual_scale = nn.Parameter(torch.ones(hidden_size))
        self.residual_bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden_states = (hidden_states + self.hidden_states_bias) * self.hidden_states_scale
        return hidden_states + (residual + self.residual_bias) * self.residual_scale


class ZayaRouterMLP(nn.Module):
    """RMSNorm -> GELU(fc1) -> GELU(fc2) -> logits over the E experts and the skip class."""

    def __init__(self, router_hidden_size: int, num_classes: int, eps: float):
        super().__init__()
        self.norm = ZayaRMSNorm(router_hidden_size, eps=eps)
        self.fc1 = nn.Linear(router_hidden_size, router_hidden_size)
        self.fc2 = nn.Linear(router_hidden_size, router_hidden_size)
        self.out_proj = nn.Linear(router_hidden_size, num_classes, bias=False)
        self.act_fn = nn.GELU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.act_fn(self.fc1(self.norm(hidden_states)))
        return self.out_proj(self.act_fn(self.fc2(hidden_states)))


class ZayaRouter(nn.Module):
    """Top-1 router over E experts + 1 skip class, with a router state carried across layers.

    `balancing_biases` (fp32) shift the *choice* only; the expert output is weighted by the unbiased,
    unrenormalised probability of the chosen class. A token that chooses the skip class (index E) gets no expert
    output: it is handed to the experts as expert 0 with weight 0, so that every experts implementation runs it.
    """

    def __init__(self, config: ZayaConfig, layer_idx: int):
        super().__init__()
        self.num_experts = config.num_experts
        self.down_proj = nn.Linear(config.hidden_size, config.router_hidden_size)
        self.carries_state = layer_idx > 0
        if self.carries_state:
            self.router_states_scale = nn.Parameter(torch.ones(config.router_hidden_size))
        self.router_mlp = ZayaRouterMLP(config.router_hidden_size, config.num_experts + 1, config.rms_norm_eps)
        self.register_buffer("balancing_biases", self.default_balancing_biases(config.num_experts))
        # Training only, for the bias balancer: tokens per router class and the sum of their decision margins since
        # it last read them (plain attributes, not buffers: DDP's buffer broadcast must not overwrite one rank's).
        self.load_counts: torch.Tensor | None = None
        self.margin_sum: torch.Tensor | None = None

    @staticmethod
    def default_balancing_biases(num_experts: int) -> torch.Tensor:
        biases = torch.zeros(num_experts + 1, dtype=torch.float32)
        biases[-1] = -1.0  # the skip class starts disfavoured, as in ZAYA1-8B
        return biases

    def _apply(self, fn, recurse=True):
        # `balancing_biases` are a controller state, not a weight: keep them fp32 through `.to(dtype)` / `.half()`.
        biases = self.balancing_biases
        super()._apply(fn, recurse)
        if self.balancing_biases.dtype != torch.float32:
            if biases.is_meta or self.balancing_biases.is_meta:
                self.balancing_biases = self.balancing_biases.float()
            else:
                self.balancing_biases = biases.to(device=self.balancing_biases.device, dtype=torch.float32)
        return self

    def record_load(self, choice: torch.Tensor, biased_probs: torch.Tensor, padding_mask: torch.Tensor | None) -> None:
        """Add this forward's tokens per class to `load_counts` and their margins (best minus second-best biased
        probability: how far a bias must move to re-route them) to `margin_sum`, on device: no host sync."""
        tokens = torch.ones_like(choice) if padding_mask is None else padding_mask.reshape(-1).to(choice.dtype)
        best_two = torch.topk(biased_probs, 2, dim=-1).values  # [N, 2]
        margins = (best_two[:, 0] - best_two[:, 1]) * tokens
        if self.load_counts is None or self.load_counts.device != choice.device:
            self.load_counts = torch.zeros(self.num_experts + 1, dtype=torch.long, device=choice.device)
            self.margin_sum = torch.zeros((), dtype=torch.float32, device=choice.device)
        self.load_counts.index_add_(0, choice, tokens)
        self.margin_sum += margins.sum()

    def forward(
        self,
        hidden_states: torch.Tensor,
        router_state: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`hidden_states` [B, S, d] -> `(router_logits [N, E+1], top_k_weights [N, 1], top_k_index [N, 1],
        router_state [B, S, r] for the next layer)`, N = B*S. In training mode the choices of the tokens that
        `padding_mask` [B, S] keeps are counted for the balancer."""
        router_hidden = self.down_proj(hidden_states)  # [B, S, r]
        if self.carries_state and router_state is not None:
            router_hidden = router_hidden + router_state * self.router_states_scale
        logits = self.router_mlp(router_hidden).flatten(0, 1)  # [N, E+1]
        probs = torch.softmax(logits, dim=-1)
        biased_probs = probs.detach().float() + self.balancing_biases
        choice = torch.topk(biased_probs, 1, dim=-1).indices  # topk, not argmax: ties break as the reference's do
        if self.training:
            self.record_load(choice[:, 0], biased_probs, padding_mask)
        return (logits, *self.experts_arguments(probs.gather(-1, choice), choice), router_hidden)

    def experts_arguments(self, weight: torch.Tensor, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(top_k_weights, top_k_index)` [N, 1] for the experts: a skip-class token as expert 0 with weight 0."""
        skipped = choice == self.num_experts
        return weight.masked_fill(skipped, 0.0), choice.masked_fill(skipped, 0)


@use_experts_implementation
class ZayaExperts(nn.Module):
    """E SwiGLU experts stored as two 3-D parameters (checkpoint layout: rows `0:I` of gate_up are the gate).

    This forward is the "eager" experts implementation; transformers' experts interface (`grouped_mm`, the default,
    `batched_mm`, ...) and the zaya_hf package's register faster ones for the same arguments.
    """

    def __init__(self, config: ZayaConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.intermediate_size = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(config.num_experts, 2 * config.moe_intermediate_size, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, config.moe_intermediate_size))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """`hidden_states` [N, d], `top_k_index` / `top_k_weights` [N, 1] -> [N, d]: each token through its expert,
        scaled by its router weight. Only the experts some token chose run."""
        output = torch.zeros_like(hidden_states)
        expert_of_token = top_k_index[:, 0]
        for expert in expert_of_token.unique().tolist():
            tokens = (expert_of_token == expert).nonzero().squeeze(-1)
            gate, up = F.linear(hidden_states[tokens], self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_output = F.linear(self.act_fn(gate) * up, self.down_proj[expert]) * top_k_weights[tokens]
            output.index_add_(0, tokens, expert_output.to(output.dtype))
        return output


class ZayaSparseMoeBlock(nn.Module):
    def __init__(self, config: ZayaConfig, layer_idx: int):
        super().__init__()
        self.gate = ZayaRouter(config, layer_idx)
        self.experts = ZayaExperts(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        router_state: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`hidden_states` [B, S, d] -> `(output [B, S, d], router_state)`."""
        batch, seq_len, hidden_size = hidden_states.shape
        _, top_k_weights, top_k_index, router_state = self.gate(hidden_states, router_state, padding_mask)
        output = self.experts(hidden_states.reshape(-1, hidden_size), top_k_index, top_k_weights)
        return output.view(batch, seq_len, hidden_size), router_state


class ZayaDecoderLayer(GradientCheckpointingLayer):
    """Attention and MoE halves, each merged into the fp32 residual stream by learned residual scaling."""

    def __init__(self, config: ZayaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = ZayaAttention(config, layer_idx)
        self.mlp = ZayaSparseMoeBlock(config, layer_idx)
        self.input_layernorm = ZayaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ZayaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_residual_scale = ZayaResidualScaling(config.hidden_size)
        self.post_mlp_residual_scale = ZayaResidualScaling(config.hidden_size)

    def forward(
        self,
        residual: torch.Tensor,
        router_state: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        sequence_positions: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`residual` is the fp32 stream; returns `(residual, router_state)`."""
        model_dtype = self.input_layernorm.weight.dtype
        hidden_states = self.input_layernorm(residual.to(model_dtype))
        hidden_states, _ = self.self_attn(
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            padding_mask=padding_mask,
            sequence_positions=sequence_positions,
            cache=cache,
            **kwargs,
        )
        residual = self.post_attention_residual_scale(hidden_states, residual)
        hidden_states = self.post_attention_layernorm(residual.to(model_dtype))
        hidden_states, router_state = self.mlp(hidden_states, router_state, padding_mask)
        return self.post_mlp_residual_scale(hidden_states, residual), router_state


# What can be wrong with a checkpoint's weights. The root, `CheckpointError`, and `InvalidConfigError` live with the
# config (config.json is read first); `zaya_hf.checkpoints` raises these same classes.


class CorruptCheckpointError(CheckpointError):
    """A weights file is truncated or unreadable, or an index and its shards disagree about where a tensor is."""


class MissingWeightsError(CheckpointError):
    """Tensors the model needs are not in the checkpoint."""


class UnexpectedWeightsError(CheckpointError):
    """The checkpoint holds tensors the model has no place for: loading or converting it would drop them."""


class MismatchedWeightsError(CheckpointError):
    """A tensor's shape differs from the one the configuration implies (usually a config.json that does not fit)."""


class InvalidWeightsError(CheckpointError):
    """A tensor holds what no weight can be: a non-floating dtype (which loading would silently cast), or NaN/inf."""


def position_limit(config: ZayaConfig) -> int | None:
    """How many positions the model may run on: `max_position_embeddings` when every layer type uses the default
    RoPE; None (no limit) when one uses another `rope_type`, a scaled RoPE being the config's claim to run longer."""
    rope_types = {config.rope_parameters[t].get("rope_type", "default") for t in set(config.layer_types)}
    return config.max_position_embeddings if rope_types == {"default"} else None


def check_model_inputs(
    config: ZayaConfig,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache: Cache | None = None,
) -> None:
    """Refuse, with the problem named, inputs the model would otherwise fail on cryptically: not exactly one of
    `input_ids` / `inputs_embeds`, other than [batch, sequence(, hidden)], empty, token ids outside
    [0, vocab_size), positions past `position_limit`. Runs once per forward (one host sync for the data-dependent
    checks) and once per `generate()` call, never inside a compiled graph."""
    if torch.compiler.is_compiling():
        return
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    if input_ids is not None and input_ids.ndim != 2:
        hint = "; add the batch dimension: input_ids[None]" if input_ids.ndim == 1 else ""
        raise ValueError(f"input_ids must be 2-D [batch, sequence], got shape {tuple(input_ids.shape)}{hint}.")
    if inputs_embeds is not None and (inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size):
        raise ValueError(
            f"inputs_embeds must be [batch, sequence, {config.hidden_size}], got shape {tuple(inputs_embeds.shape)}."
        )
    inputs = input_ids if input_ids is not None else inputs_embeds
    if inputs.shape[0] == 0 or inputs.shape[1] == 0:
        raise ValueError(f"Empty input of shape {tuple(inputs.shape)}: every sequence needs at least one token.")
    if inputs.device.type == "meta":
        return
    limit = position_limit(config)
    stats = list(input_ids.aminmax()) if input_ids is not None else []
    if limit is not None and position_ids is not None:
        stats.append(position_ids.max())
    values = torch.stack([stat.long() for stat in stats]).tolist() if stats else []  # the one host sync
    if input_ids is not None:
        bad = values[0] if values[0] < 0 else values[1]
        if not 0 <= bad < config.vocab_size:
            raise ValueError(f"Token id {bad} is out of range: ids must be in [0, {config.vocab_size}) (vocab_size).")
    if limit is not None:
        past = cache.get_seq_length() if cache is not None else 0
        last = values[-1] if position_ids is not None else past + inputs.shape[1] - 1
        if last >= limit:
            raise ValueError(
                f"Position {last} is past max_position_embeddings ({limit}): the default RoPE was not trained that "
                "far. Shorten the input, or configure a scaled rope_type in rope_parameters to run longer."
            )


# The Auto classes a saved folder answers to when this code travels with it (trust_remote_code).
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_zaya.ZayaConfig",
    "AutoModel": "modeling_zaya.ZayaModel",
    "AutoModelForCausalLM": "modeling_zaya.ZayaForCausalLM",
}


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# safetensors header dtype names -> torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BOOL": torch.bool, "U8": torch.uint8,
    "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32,
    "I64": torch.int64, "U64": torch.uint64,
}  # fmt: skip


def _stored_dtypes(state_dict: dict | None, checkpoint_files: list[str] | None) -> Iterator[tuple[str, torch.dtype, str]]:
    """(name, dtype, where) of every stored tensor, from the safetensors headers (no data read) or the state dict."""
    if state_dict is not None:
        yield from ((name, tensor.dtype, "the state dict") for name, tensor in state_dict.items())
        return
    for file in checkpoint_files or []:
        if not file.endswith(".safetensors"):
            yield from ((name, tensor.dtype, file) for name, tensor in load_state_dict(file, map_location="meta").items())
            continue
        try:
            with safe_open(file, framework="pt") as handle:
                headers = [(name, handle.get_slice(name).get_dtype()) for name in handle.keys()]
        except SafetensorError as error:
            raise CorruptCheckpointError(f"{file} is truncated or corrupt: {error}.") from None
        yield from ((name, SAFETENSORS_DTYPES.get(dtype, torch.uint8), file) for name, dtype in headers)


def check_floating(name: str, dtype: torch.dtype, where: str) -> None:
    if not dtype.is_floating_point:
        raise InvalidWeightsError(
            f"{name} is stored as {str(dtype).removeprefix('torch.')} in {where}: ZAYA weights are floating point, "
            "and an integer tensor would be cast silently."
        )


def count_non_finite(tensors: list[torch.Tensor]) -> list[int]:
    """NaN/inf values per tensor (all on one device), cheaply: one sum per tensor and one host sync, as a NaN or an
    inf makes a sum non-finite. Only a non-finite sum is re-checked element-wise (the sum may merely overflow)."""
    finite = torch.isfinite(torch.stack([tensor.sum().float() for tensor in tensors])).tolist()
    return [0 if ok else int((~torch.isfinite(tensor)).sum()) for tensor, ok in zip(tensors, finite)]


def non_finite_error(bad: list[tuple[str, int]], where: str) -> InvalidWeightsError:
    """The error for tensors holding NaN/inf: (name, count) pairs, found in `where` (a file, a checkpoint)."""
    return InvalidWeightsError(f"{_preview([f'{name} holds {count} NaN/inf value(s)' for name, count in bad])} in {where}.")


def _check_finite_weights(model: nn.Module, where: str) -> None:
    """Refuse NaN/inf weights, checked on the device each tensor was loaded to."""
    by_device = defaultdict(dict)
    tensors = chain(model.named_parameters(), model.named_buffers())  # as held: no state-dict hooks run
    for name, tensor in tensors:  # a tied tensor is listed once
        if tensor.is_floating_point() and tensor.device.type != "meta":
            by_device[tensor.device].setdefault(tensor.data_ptr(), (name, tensor))
    for named in by_device.values():
        names, tensors = zip(*named.values())
        bad = [(name, count) for name, count in zip(names, count_non_finite(list(tensors))) if count]
        if bad:
            raise non_finite_error(bad, where)


class ZayaPreTrainedModel(PreTrainedModel):
    config_class = ZayaConfig
    config: ZayaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ZayaDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # with a StaticCache
    _keep_in_fp32_modules_strict = ["balancing_biases"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(ZayaRouter, index=0),
        "hidden_states": ZayaDecoderLayer,
        "attentions": ZayaAttention,
    }
    # Faster module forwards of the zaya_hf package (`zaya_hf.ops`), by name: each installer is called with the model
    # whenever it is built, loaded or moved, and decides for the model as it then is (device, dtype, kernel_backend).
    # Remote code has none and runs the forwards of this file.
    fast_paths: ClassVar[dict[str, Callable[[nn.Module], None]]] = {}

    def install_fast_paths(self) -> None:
        if self.config.kernel_backend == "triton" and "triton" not in self.fast_paths:
            raise ImportError(
                "kernel_backend='triton' needs the zaya_hf package with triton (pip install 'zaya-hf[triton]'): the "
                "kernels are not part of the code that travels with a checkpoint. Use 'auto' or 'torch' without them."
            )
        for install in self.fast_paths.values():
            install(self)

    def post_init(self) -> None:
        super().post_init()
        self.install_fast_paths()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.install_fast_paths()  # for the new device / dtype
        return self

    @classmethod
    def from_pretrained(cls, *args, allow_missing_weights: bool = False, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict: a checkpoint that does not fit the model raises a
        `CheckpointError` naming the tensor or file, instead of loading random, cast or garbage weights:

        * `MissingWeightsError`: tensors the model needs are absent (`allow_missing_weights=True` initialises them
          randomly, on purpose, as does `from_pretrained(None, config=..., state_dict=...)` for the tensors the
          given state dict leaves out);
        * `UnexpectedWeightsError`: tensors the model has no place for;
        * `MismatchedWeightsError`: wrong shapes (unless `ignore_mismatched_sizes=True`, as in transformers);
        * `InvalidWeightsError`: a non-floating dtype (read from the file headers) or NaN/inf values (one sum per
          tensor where it was loaded; see `count_non_finite`);
        * `CorruptCheckpointError`: a truncated or unreadable safetensors file.

        With `output_loading_info=True` missing and unexpected tensors are reported in the returned info, as
        transformers reports them, instead of raised."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        # Load with mismatches reported rather than raised, so that the error below can name them.
        model, loading_info = super().from_pretrained(
            *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        where = f"checkpoint {source}" if source is not None else "state dict"
        mismatched = sorted(loading_info["mismatched_keys"])
        if mismatched and not ignore_mismatched_sizes:
            details = [f"{key} (checkpoint {tuple(ckpt)}, model {tuple(expected)})" for key, ckpt, expected in mismatched]
            raise MismatchedWeightsError(
                f"The {where} has {len(mismatched)} tensor(s) of the wrong shape for {cls.__name__}: "
                f"{_preview(details)}. Check that config.json matches the weights."
            )
        missing, unexpected = sorted(loading_info["missing_keys"]), sorted(loading_info["unexpected_keys"])
        # `from_pretrained(None, config=..., state_dict=...)` builds from a config with the weights given by hand:
        # what the state dict leaves out is initialised, as transformers does (the caller chose the tensors).
        allow_missing_weights = allow_missing_weights or source is None
        if missing and not (allow_missing_weights or output_loading_info):
            raise MissingWeightsError(
                f"The {where} lacks {len(missing)} tensor(s) of {cls.__name__}: {_preview(missing)}"
                + (f"; it has {len(unexpected)} unexpected one(s): {_preview(unexpected)}" if unexpected else "")
                + ". Refusing to initialise them randomly (allow_missing_weights=True to do so on purpose)."
            )
        if unexpected and not output_loading_info:
            raise UnexpectedWeightsError(
                f"The {where} holds {len(unexpected)} tensor(s) {cls.__name__} has no place for: {_preview(unexpected)}. "
                "Check that config.json matches the weights (output_loading_info=True reports them instead)."
            )
        _check_finite_weights(model, f"the {where}")
        model.install_fast_paths()  # for the loaded weights' device and dtype
        return (model, loading_info) if output_loading_info else model

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        """transformers' loader (`from_pretrained` calls it with the resolved files), after refusing stored weights of
        a non-floating dtype, which it would cast to the model's dtype without a word. Reads only the headers."""
        if not load_config.is_quantized:  # quantized checkpoints store integer weights by design
            expected = set(model.state_dict())
            for name, dtype, where in _stored_dtypes(state_dict, checkpoint_files):
                if name in expected:
                    check_floating(name, dtype, where)
        return PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained` (and so `push_to_hub`). When the code travels with the checkpoint
        (`register_for_auto_class`), `auto_map` names all of AutoConfig, AutoModel and AutoModelForCausalLM, not
        only the class being saved."""
        if self.is_remote_code():
            self.config.auto_map = {**REMOTE_CODE_AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ZayaResidualScaling):
            init.ones_(module.hidden_states_scale)
            init.zeros_(module.hidden_states_bias)
            init.ones_(module.residual_scale)
            init.zeros_(module.residual_bias)
        elif isinstance(module, ZayaModel):
            init.ones_(module.input_hidden_states_scale)
            init.zeros_(module.input_hidden_states_bias)
        elif isinstance(module, ZayaQKNorm):
            # 1, not 0: a zero key temperature would make every key vanish and attention start out uniform.
            init.ones_(module.temp)
        elif isinstance(module, ZayaRouter):
            if module.carries_state:
                init.ones_(module.router_states_scale)
            init.copy_(module.balancing_biases, module.default_balancing_biases(module.num_experts))
        elif isinstance(module, ZayaExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, ZayaRotaryEmbedding):
            for layer_type in module.layer_types:
                inv_freq, _ = module.compute_inv_freq(layer_type)
                init.copy_(getattr(module, f"{layer_type}_inv_freq"), inv_freq)
                init.copy_(getattr(module, f"{layer_type}_original_inv_freq"), inv_freq)


class ZayaModel(ZayaPreTrainedModel):
    """The ZAYA decoder stack; returns the final-norm hidden states."""

    def __init__(self, config: ZayaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.input_hidden_states_scale = nn.Parameter(torch.ones(config.hidden_size))
        self.input_hidden_states_bias = nn.Parameter(torch.zeros(config.hidden_size))
        self.layers = nn.ModuleList(ZayaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = ZayaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ZayaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        check_model_inputs(self.config, input_ids, inputs_embeds, position_ids, cache)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq_len = inputs_embeds.shape[:2]

        if position_ids is None and "cu_seq_lens_q" in kwargs:  # a padding-free batch described by its boundaries
            position_ids = positions_from_cu_seq_lens(kwargs["cu_seq_lens_q"], seq_len)[None]
        sequence_positions = packed_sequence_positions(position_ids, attention_mask, batch, seq_len)
        if sequence_positions is not None:
            attention_mask, use_cache = check_packed_inputs(attention_mask, cache, use_cache)
        if use_cache is None:
            use_cache = self.config.use_cache and not (self.training and torch.is_grad_enabled())
        if use_cache and cache is None:  # as transformers' models do; generate() brings a ZayaCache
            cache = DynamicCache(config=self.config)
        if cache is not None:
            check_cache(cache, self.config.num_hidden_layers)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(seq_len, device=inputs_embeds.device)[None] + past_seen

        masks = attention_mask  # already prepared per layer type, e.g. by `create_masks_for_generate`
        if not isinstance(masks, dict):
            # Packed rows get block-diagonal masks, which transformers derives from the positions without a cache.
            mask_cache = cache if sequence_positions is None else None
            masks = create_zaya_masks(self.config, inputs_embeds, attention_mask, mask_cache, position_ids)
        position_embeddings = {t: self.rotary_emb(inputs_embeds, position_ids, t) for t in set(self.config.layer_types)}

        # The residual stream is fp32 ("residual in fp32"); the input scaling itself runs in the model dtype.
        residual = ((inputs_embeds + self.input_hidden_states_bias) * self.input_hidden_states_scale).to(torch.float32)
        router_state = None
        for layer_idx, decoder_layer in enumerate(self.layers):
            layer_type = self.config.layer_types[layer_idx]
            residual, router_state = decoder_layer(
                residual,
                router_state,
                position_embeddings=position_embeddings[layer_type],
                attention_mask=masks[layer_type],
                padding_mask=masks["conv"],
                sequence_positions=sequence_positions,
                cache=cache,
                **kwargs,
            )
        hidden_states = self.norm(residual.to(self.norm.weight.dtype))
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


def positions_from_cu_seq_lens(cu_seq_lens: torch.Tensor, total: int) -> torch.Tensor:
    """In-sequence positions [total] of a padding-free row whose sequences end at `cu_seq_lens` (0, l1, l1+l2, ...)."""
    lengths = cu_seq_lens[1:] - cu_seq_lens[:-1]
    starts = torch.repeat_interleave(cu_seq_lens[:-1], lengths, output_size=total)
    return torch.arange(total, device=cu_seq_lens.device) - starts


def packed_sequence_positions(
    position_ids: torch.Tensor | None, attention_mask: torch.Tensor | dict | None, batch: int, seq_len: int
) -> torch.Tensor | None:
    """The positions [B, S] of rows holding several sequences (positions restarting mid-row, as padding-free
    collators and TRL's `padding_free=True` make), else None. A restart right after padding is just left padding."""
    if position_ids is None or seq_len == 1 or isinstance(attention_mask, dict):
        return None
    position_ids = position_ids.expand(batch, seq_len)
    restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if attention_mask is not None and attention_mask.ndim == 2:
        real = attention_mask[:, -seq_len:].bool()  # the mask may cover cached tokens too
        restarts = restarts & real[:, 1:] & real[:, :-1]
    if not torch.compiler.is_compiling() and not bool(restarts.any()):
        return None
    return position_ids


def check_packed_inputs(
    attention_mask: torch.Tensor | None, cache: Cache | None, use_cache: bool | None
) -> tuple[None, bool]:
    """Packed rows run exactly on their own: not into a cache, not mixed with padding. Refuse what is not so;
    returns the attention mask and `use_cache` to run them with."""
    if cache is not None or use_cache:
        raise ValueError(
            "Packed sequences (position_ids restarting mid-row) run without a cache: pass cache=None and use_cache "
            "unset or False."
        )
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "Packed sequences (position_ids restarting mid-row) take no attention_mask (or an all-ones one): their "
            "masks are derived from the positions, and padding-free rows hold no padding."
        )
    return None, False


def check_cache(cache: Cache, num_layers: int) -> None:
    """A cache the model can run on: one layer per decoder layer, each holding conv and recurrent state."""
    layers = getattr(cache, "layers", [])
    if len(layers) != num_layers or not all(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in layers):
        raise TypeError(
            f"ZAYA needs a cache with conv and recurrent state in each of its {num_layers} layers: pass "
            f"ZayaCache(config) (or transformers' DynamicCache(config=config) / StaticCache(config, ...)), got "
            f"{type(cache).__name__} with {len(layers)} layer(s) of {sorted({type(layer).__name__ for layer in layers})}."
        )


def create_zaya_masks(
    config: ZayaConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """Attention mask per layer type (for the configured attention implementation), plus under `"conv"` the
    2-D padding mask the CCA projection zeroes padded tokens with."""
    config = config.get_text_config()
    mask_kwargs = {
        "config": config,
        "inputs_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        "cache": cache,
        "position_ids": position_ids,
    }
    builders = {"hybrid": create_causal_mask, "hybrid_sliding": create_sliding_window_causal_mask}
    masks = {layer_type: builders[layer_type](**mask_kwargs) for layer_type in set(config.layer_types)}
    masks["conv"] = create_recurrent_attention_mask(**mask_kwargs)
    return masks


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-style auxiliary loss over the E real experts: E * sum_e(fraction routed to e * mean prob of e).
    Tokens that the 2-D `padding_mask` [B, S] marks as padding are left out of both averages."""
    logits = torch.cat([layer_logits.float() for layer_logits in router_logits], dim=0)  # [L*N, E+1]
    probs = torch.softmax(logits, dim=-1)
    routed = F.one_hot(probs.argmax(dim=-1), num_experts + 1).float()
    if padding_mask is None:
        token_weights = torch.full((logits.shape[0], 1), 1.0 / logits.shape[0], device=logits.device)
    else:
        tokens = padding_mask.reshape(-1).float().repeat(len(router_logits))  # [L*N], layer-major like `logits`
        token_weights = (tokens / tokens.sum())[:, None]
    fraction_routed = (routed * token_weights).sum(0)[:num_experts]
    mean_probs = (probs * token_weights).sum(0)[:num_experts]
    return num_experts * (fraction_routed * mean_probs).sum()


class ZayaForCausalLM(ZayaPreTrainedModel, GenerationMixin, ZayaGenerationMixin):
    """ZAYA1 language model (tied embedding head). `generate()` runs on a `ZayaCache` (or a `StaticCache`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ZayaConfig):
        super().__init__(config)
        self.model = ZayaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        """Standard causal-LM forward. The loss is transformers' (`labels` shifted inside, or `shift_labels` given
        as they are, as sequence parallelism does; `num_items_in_batch` from Trainer for exact accumulation)."""
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        loss = aux_loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        if output_router_logits:
            padding_mask = attention_mask.get("conv") if isinstance(attention_mask, dict) else attention_mask
            if padding_mask is not None and padding_mask.ndim != 2:
                padding_mask = None
            aux_loss = load_balancing_loss(outputs.router_logits, self.config.num_experts, padding_mask)
            if loss is not None and self.config.router_aux_loss_coef:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, which leaves the routers' balancer counts as they were. Rollouts generated in
        training mode (an RL trainer's) would otherwise be counted, the padding of rows that already finished
        included (generation has no mask for it), and the trainer's loss forward counts the same tokens again with
        their mask."""
        routers = [module for module in self.modules() if isinstance(module, ZayaRouter)]
        counts = [(router.load_counts, router.margin_sum) for router in routers]
        for router in routers:
            router.load_counts = router.margin_sum = None
        try:
            return super().generate(*args, **kwargs)
        finally:
            for router, (load_counts, margin_sum) in zip(routers, counts):
                router.load_counts, router.margin_sum = load_counts, margin_sum

    def _prepare_model_inputs(self, inputs, bos_token_id, model_kwargs):
        """generate() hook, once per call: the prompt is checked before transformers indexes into it."""
        inputs_tensor, input_name, model_kwargs = super()._prepare_model_inputs(inputs, bos_token_id, model_kwargs)
        check_model_inputs(self.config, **{input_name: inputs_tensor})
        return inputs_tensor, input_name, model_kwargs

    def _validate_generated_length(self, generation_config, input_ids_length, has_default_max_length):
        """generate() hook, once per call: a generation that would run past `position_limit` fails before it starts."""
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        limit = position_limit(self.config)
        if limit is not None and generation_config.max_length > limit:
            raise ValueError(
                f"The prompt ({input_ids_length} tokens) plus max_new_tokens would reach {generation_config.max_length} "
                f"tokens, past max_position_embeddings ({limit}): lower max_new_tokens to at most "
                f"{limit - input_ids_length}."
            )

    @staticmethod
    def create_masks_for_generate(config, inputs_embeds, attention_mask, cache, position_ids=None, **kwargs):
        return create_zaya_masks(config, inputs_embeds, attention_mask, cache, position_ids)

    def _valid_auto_compile_criteria(self, model_kwargs: dict, generation_config) -> bool:
        """generate() hook: a `compile_config` passed explicitly compiles the decode step on CPU too (with a static
        cache), where transformers compiles on accelerators only unless the private
        `CompileConfig._compile_all_devices` is set."""
        compile_config = generation_config.compile_config
        if compile_config is not None and not compile_config._compile_all_devices:
            compile_config = copy.copy(compile_config)  # the caller's object stays as it was
            compile_config._compile_all_devices = True
            generation_config.compile_config = compile_config
        return super()._valid_auto_compile_criteria(model_kwargs, generation_config)

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """generate() hook: where transformers would build its `DynamicCache`, build a `ZayaCache` (its batch
        operations and `crop` move every CCA state), with room reserved up to the call's length."""
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )
        cache = model_kwargs.get("cache")
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            cache = ZayaCache(self.config, offloading=cache.offloading)
            if generation_config.is_assistant:
                cache.activate_past_recording()
            model_kwargs["cache"] = cache
        if isinstance(cache, ZayaCache):
            cache.set_max_length(max_cache_length)


__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "InvalidConfigError",
    "InvalidWeightsError",
    "MismatchedWeightsError",
    "MissingWeightsError",
    "UnexpectedWeightsError",
    "ZayaPreTrainedModel",
    "ZayaModel",
    "ZayaForCausalLM",
]
