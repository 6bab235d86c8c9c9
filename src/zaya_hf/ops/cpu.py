# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""CPU fast paths of ZAYA1 inference. Package-only: never shipped as remote code.

`install_cpu_forwards` gives each module that sits on the CPU the subclass below in place of its class (and takes it
back when the module moves to another device); the model's own forwards stay the reference these are tested against.

* `CPULinear`: products through `cpu_linear`: large fp32 weights through oneDNN (MKL's fp32 GEMV streams a weight
  from memory at about half oneDNN's rate), and inside a compiled inference graph products of one or two rows as
  multiply-and-sum, which Inductor fuses. Both differ from `F.linear` in summation order only (~1e-6 in fp32).
* `CPUCCAProjection`: a decode step's causal conv as a state update (one output column: the depthwise taps over the
  W + 1 window, then one product per head group) instead of two `conv1d` calls over the window, about 3x faster.
* `CPUExperts`: under transformers' default experts implementation (`grouped_mm`), a one-token step multiplies its
  expert directly, and a compiled step of one or two tokens reads each token's expert weights in place (fused);
  every other case is `grouped_mm` itself.
* `packed_gqa_sdpa`, the attention implementation `"zaya_sdpa"` (opt in: `attn_implementation="zaya_sdpa"`): one-token
  steps pass the G query heads of each KV head as G query rows of it, where torch's CPU SDPA with `enable_gqa` runs
  one query row per (batch, head) block, its slowest case. The kernel then splits the keys differently, so results
  can differ from `"sdpa"` by an ulp.
"""

import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..modeling_zaya import ZayaCCAProjection, ZayaExperts
from .thresholds import COMPILED_MATVEC_MAX_ROWS, ONEDNN_MIN_WEIGHT_ELEMENTS

# oneDNN was measured on x86 (AMD EPYC) only; elsewhere (ARM: Accelerate / OpenBLAS) F.linear is left alone.
ONEDNN_LINEAR_AVAILABLE = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


def opaque_op(name: str, fn: Callable, fake: Callable) -> Callable:
    """`fn` as the custom op `zaya_hf::name`, which compiled graphs call without tracing into it."""
    op = torch.library.custom_op(f"zaya_hf::{name}", mutates_args=())(fn)
    op.register_fake(fake)
    return op


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# Inductor cannot lower the dense-weight oneDNN call, so compiled graphs call it through an opaque custom op.
_onednn_linear_op = opaque_op(
    "onednn_linear", _onednn_linear, lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0])
)


def _plain(*tensors: torch.Tensor | None) -> bool:
    """Dense tensors autograd does not record: quantized or distributed weights (tensor subclasses) and training
    keep `F.linear`, which handles them and has a backward."""
    present = [t for t in tensors if t is not None]
    return all(type(t) in (torch.Tensor, nn.Parameter) for t in present) and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in present)
    )


def uses_compiled_matvec(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Inside a compiled inference graph, at most `COMPILED_MATVEC_MAX_ROWS[dtype]` rows of `x` per weight matrix."""
    rows = x.shape[:-1].numel() // weight.shape[:-2].numel()
    return (
        torch.compiler.is_compiling()
        and x.dtype == weight.dtype
        and rows <= COMPILED_MATVEC_MAX_ROWS.get(x.dtype, 0)
        and _plain(x, weight)
    )


def uses_onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """fp32 products with a weight of at least `ONEDNN_MIN_WEIGHT_ELEMENTS` that autograd does not record."""
    return (
        ONEDNN_LINEAR_AVAILABLE
        and weight.ndim == 2
        and weight.numel() >= ONEDNN_MIN_WEIGHT_ELEMENTS
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.numel() > 0
        and _plain(x, weight, bias)
    )


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` (`x` [..., k], `weight` [n, k] -> [..., n]), also for a stack of weights [..., n, k] multiplying
    `x` [..., M, k] matrix by matrix (-> [..., M, n]), through the fastest CPU route for its shape (module doc)."""
    if uses_compiled_matvec(x, weight):
        # [..., M, 1, k] * [..., 1, n, k] -> [..., M, n], accumulated in fp32 and rounded once, as F.linear does
        product = (x.unsqueeze(-2).float() * weight.unsqueeze(-3).float()).sum(-1)
        return (product if bias is None else product + bias.float()).to(x.dtype)
    if weight.ndim > 2:
        if bias is not None and x.ndim == 3:
            return torch.baddbmm(bias, x, weight.transpose(-1, -2))
        product = torch.matmul(x, weight.transpose(-1, -2))
        return product if bias is None else product + bias
    if not uses_onednn_linear(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return _onednn_linear_op(x, weight, bias)
    return _onednn_linear(x, weight, bias)


class CPULinear(nn.Linear):
    """`nn.Linear` multiplying through `cpu_linear`; same parameters, so PEFT and quantizers see an `nn.Linear`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return cpu_linear(input, self.weight, self.bias)


class CPUCCAProjection(ZayaCCAProjection):
    """The CCA projection with a decode step's conv computed as a state update."""

    def causal_conv(self, window: torch.Tensor, sequence_positions: torch.Tensor | None = None) -> torch.Tensor:
        if sequence_positions is not None or window.shape[-1] != self.conv_width + 1:
            return super().causal_conv(window, sequence_positions)
        depthwise, grouped = self.conv_qk_depthwise, self.conv_qk_grouped
        groups, batch, channels = grouped.groups, window.shape[0], window.shape[1]
        t0, t1 = depthwise.kernel_size[0], grouped.kernel_size[0]
        # Depthwise outputs at the last t1 positions, [B, C, t1]: the taps accumulate in fp32 and round once, as
        # `conv1d` does, so that a bf16 step matches the full convolution bit for bit.
        taps = window.float()
        mixed = depthwise.bias.float()[:, None].expand(channels, t1)
        for tap in range(t0):
            mixed = torch.addcmul(mixed, taps[..., tap : tap + t1], depthwise.weight[:, :, tap].float())
        mixed = mixed.to(window.dtype).reshape(batch, groups, -1).transpose(0, 1)  # [G, B, (C/G)*t1]
        # The grouped conv at the last position, one product per group: [G, B, (C/G)*t1] @ [G, (C/G)*t1, C/G].
        weight = grouped.weight.view(groups, channels // groups, -1)
        out = cpu_linear(mixed, weight, grouped.bias.view(groups, 1, -1))  # [G, B, C/G]
        return out.transpose(0, 1).reshape(batch, 1, channels)


class CPUExperts(ZayaExperts):
    """The experts with transformers' default implementation (`grouped_mm`) sped up for one- and two-token steps;
    an implementation asked for by name (`experts_implementation=...`) runs as it is."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.config._experts_implementation == "grouped_mm":
            if torch.compiler.is_compiling() and uses_compiled_matvec(hidden_states, self.gate_up_proj[0]):
                return self.gathered(hidden_states, top_k_index[:, 0], top_k_weights)
            if not torch.compiler.is_compiling() and hidden_states.shape[0] == 1:
                return self.gathered(hidden_states, top_k_index[0, 0].item(), top_k_weights)
        return super().forward(hidden_states, top_k_index, top_k_weights)

    def gathered(self, hidden_states: torch.Tensor, expert: torch.Tensor | int, weights: torch.Tensor) -> torch.Tensor:
        """Each token through its own expert's weights, indexed where they lie: `expert` [N] (or one int for all)."""
        rows = hidden_states[:, None]  # [N, 1, d]: one row per (gathered) matrix
        gate, up = cpu_linear(rows, self.gate_up_proj[expert]).squeeze(1).chunk(2, dim=-1)  # [N, I] each
        output = cpu_linear((self.act_fn(gate) * up)[:, None], self.down_proj[expert]).squeeze(1)  # [N, d]
        return (output * weights).to(hidden_states.dtype)


def packed_gqa_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that a one-token step goes in as `[B, H, 1, D] -> [B, K, G, D]`: the
    G query heads of each KV head as its G query rows (a `[B, 1, 1, L]` mask broadcasts over them)."""
    batch, heads, length, head_dim = query.shape
    if length != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    packed = query.reshape(batch, key.shape[1], -1, head_dim)  # [B, K, G, D]: query head h = k * G + g
    output = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return output.reshape(batch, 1, heads, head_dim), None  # [B, K, G, D] is [B, 1, H, D] in memory


CPU_FORWARDS: dict[type, type] = {nn.Linear: CPULinear, ZayaCCAProjection: CPUCCAProjection, ZayaExperts: CPUExperts}
_MODEL_CLASSES = {fast: base for base, fast in CPU_FORWARDS.items()}


def install_cpu_forwards(model: nn.Module) -> None:
    """The CPU subclass for each module of `model` on the CPU, the model's own class for each elsewhere."""
    for module in model.modules():
        kind = type(module)
        if kind not in CPU_FORWARDS and kind not in _MODEL_CLASSES:
            continue
        parameter = next(module.parameters(), None)
        on_cpu = parameter is not None and parameter.device.type == "cpu"
        if kind in CPU_FORWARDS and on_cpu:
            module.__class__ = CPU_FORWARDS[kind]
        elif kind in _MODEL_CLASSES and not on_cpu:
            module.__class__ = _MODEL_CLASSES[kind]


AttentionInterface.register("zaya_sdpa", packed_gqa_sdpa)
