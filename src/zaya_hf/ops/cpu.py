# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""CPU fast paths of ZAYA1 inference. Package-only: never shipped as remote code.

`install_cpu_forwards` gives each module that sits on the CPU the subclass below in place of its class (and takes it
back when the module moves to another device); the model's own forwards stay the reference these are tested against.

* `CPULinear`: products through `cpu_linear`: large fp32 weights through oneDNN (MKL's fp32 GEMV streams a weight
  from memory at about half oneDNN's rate), bf16 products of one or two rows through zaya_hf's own kernel
  (`ops.native.bf16_matvec`: torch's bf16 kernels read a weight at under half the rate one thread can; in compiled
  graphs as an opaque op), and inside a compiled inference graph the other products of one or two rows as
  multiply-and-sum, which Inductor fuses. All differ from `F.linear` in summation order only (~1e-6 in fp32; in bf16
  an output can round one ulp apart). Other bf16 products, and those of weights under
  `BF16_NATIVE_MIN_WEIGHT_ELEMENTS`, keep torch's own kernels and bit-identical results.
* `CPUCCAProjection`: a decode step's causal conv as a state update (one output column: the depthwise taps over the
  W + 1 window, then one product per head group) instead of two `conv1d` calls over the window, about 3x faster;
  without native bf16 kernels, a bf16 prefill's two convs in fp32, rounded as the bf16 ones round.
* `CPUExperts`: under transformers' default experts implementation (`grouped_mm`), a one-token step multiplies its
  expert directly and a compiled step of one or two tokens reads each token's expert weights in place (fused); every
  other case is `grouped_mm` itself.
* `by_expert_experts_forward`, the experts implementation `"zaya_by_expert"` (opt in:
  `experts_implementation="zaya_by_expert"`): each used expert's tokens as one product pair through `cpu_linear`,
  so that bf16 prefill on CPUs without native bf16 kernels gets fp32 GEMMs. Opt in because a model asked for
  `grouped_mm` must run `grouped_mm` (transformers' own tests check it is called).
* `CPUAttention`: under `"sdpa"`, an eager one-token step passes the G query heads of each KV head as G query rows of
  it (`packed_gqa_sdpa`), as transformers' SDPA does when the step has a mask; without one transformers asks torch
  for `enable_gqa`, whose CPU kernel runs one query row per (batch, head) block, its slowest case (measured:
  benchmarks/bench_long_context.py). Against `enable_gqa` the keys are summed in another order: an ulp apart.
"""

import platform
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..modeling_zaya import ZayaAttention, ZayaCCAProjection, ZayaDecoderLayer, ZayaExperts
from .native import BF16_MATVEC, bf16_matvec
from .thresholds import (
    BF16_NATIVE_MAX_ROWS,
    BF16_NATIVE_MIN_WEIGHT_ELEMENTS,
    COMPILED_MATVEC_MAX_ROWS,
    FP32_GEMM_BLOCK_ELEMENTS,
    FP32_GEMM_MIN_ROWS,
    ONEDNN_MIN_WEIGHT_ELEMENTS,
    PARALLEL_MIN_MULTIPLY_ADDS,
)


def cpu_info() -> dict[str, str]:
    """The fields of the first processor in /proc/cpuinfo ("vendor_id", "model name", "flags", ...); empty where
    there is no such file."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():  # the first processor ends here
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


# Large fp32 products go through oneDNN on x86 CPUs other than Intel's: there MKL, which F.linear's fp32 products use,
# streamed large weights at about half oneDNN's rate (AMD EPYC, bench_cpu_ops.json), while on an Intel Xeon it was
# the faster of the two (benchmarks/results/bench_cpu_ops_xeon.json). Elsewhere (ARM: Accelerate / OpenBLAS) F.linear
# is left alone.
ONEDNN_LINEAR_AVAILABLE = (
    platform.machine().lower() in ("x86_64", "amd64")
    and cpu_info().get("vendor_id") != "GenuineIntel"
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)

# oneDNN multiplies bf16 natively only with AVX512-BF16 or AMX; elsewhere torch's bf16 GEMM is a generic fp32-accumulating
# loop, and an fp32 GEMM over converted weights is several times faster from a few rows on.
NATIVE_BF16_MATMUL = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def opaque_op(name: str, fn: Callable, fake: Callable) -> Callable:
    """`fn` as the custom op `zaya_hf::name`, which compiled graphs call without tracing into it."""
    op = torch.library.custom_op(f"zaya_hf::{name}", mutates_args=())(fn)
    op.register_fake(fake)
    return op


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# Inductor cannot lower the dense-weight oneDNN call or a ctypes kernel, so compiled graphs call them through opaque
# custom ops.
_onednn_linear_op = opaque_op(
    "onednn_linear", _onednn_linear, lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0])
)
_bf16_matvec_op = opaque_op("bf16_matvec", bf16_matvec, lambda x, weight: x.new_empty(*x.shape[:-1], weight.shape[0]))


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


@contextmanager
def intra_op_threads(multiply_adds: int) -> Iterator[None]:
    """Run the block on one intra-op thread when its work is under `PARALLEL_MIN_MULTIPLY_ADDS`: splitting less
    costs more than it saves, and on a busy machine every parallel region waits for its slowest, descheduled thread.
    Larger work keeps torch's thread count. Not for compiled graphs, which keep the threads they were compiled for."""
    threads = torch.get_num_threads()
    if threads == 1 or multiply_adds >= PARALLEL_MIN_MULTIPLY_ADDS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def uses_bf16_matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """bf16 products without bias of at most `BF16_NATIVE_MAX_ROWS` rows by a contiguous 2-D weight of at least
    `BF16_NATIVE_MIN_WEIGHT_ELEMENTS`, that autograd does not record, where zaya_hf's kernel was built."""
    return (
        BF16_MATVEC is not None
        and bias is None
        and weight.ndim == 2
        and weight.numel() >= BF16_NATIVE_MIN_WEIGHT_ELEMENTS
        and x.dtype == weight.dtype == torch.bfloat16
        and 0 < x.shape[:-1].numel() <= BF16_NATIVE_MAX_ROWS
        and weight.is_contiguous()
        and _plain(x, weight)
    )


def uses_fp32_gemm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Eager bf16 products of at least `FP32_GEMM_MIN_ROWS` rows per weight matrix, on CPUs without native bf16
    GEMMs, that autograd does not record."""
    rows = x.shape[:-1].numel() // weight.shape[:-2].numel()
    return (
        not NATIVE_BF16_MATMUL
        and x.dtype == weight.dtype == torch.bfloat16
        and rows >= FP32_GEMM_MIN_ROWS
        and not torch.compiler.is_compiling()
        and _plain(x, weight)
    )


_workspace = threading.local()


def _block_buffer() -> torch.Tensor:
    """This thread's fp32 buffer for one block of converted weight rows, allocated once: a fresh allocation per block
    would page-fault on every product."""
    if getattr(_workspace, "buffer", None) is None:
        _workspace.buffer = torch.empty(FP32_GEMM_BLOCK_ELEMENTS)
    return _workspace.buffer


def fp32_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` of bf16 `x` [..., k] and `weight` [n, k] (or a small stack [..., n, k]) computed in fp32 and rounded to
    bf16 once, as torch's bf16 GEMM does; only the summation order differs (an output can round one bf16 ulp apart).
    A 2-D weight is converted `FP32_GEMM_BLOCK_ELEMENTS` at a time into a cache-resident buffer, so it is read once."""
    if weight.ndim > 2:  # the CCA grouped conv's [G, C/G, (C/G)*t1]: small, converted whole
        out = torch.matmul(x.float(), weight.float().transpose(-1, -2))
        return (out if bias is None else out + bias.float()).to(x.dtype)
    out_features, in_features = weight.shape
    rows = x.reshape(-1, in_features).float()  # [M, k]
    out = torch.empty(out_features, rows.shape[0])  # [n, M]: each block's product lands in contiguous rows
    buffer = _block_buffer()
    block = max(1, buffer.numel() // in_features)
    for start in range(0, out_features, block):
        weights = weight[start : start + block]
        converted = buffer[: weights.numel()].view(weights.shape)
        converted.copy_(weights)
        torch.mm(converted, rows.t(), out=out[start : start + block])
    out = out.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], out_features)


def cpu_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, bf16_through_fp32: bool = False
) -> torch.Tensor:
    """`F.linear` (`x` [..., k], `weight` [n, k] -> [..., n]), also for a stack of weights [..., n, k] multiplying
    `x` [..., M, k] matrix by matrix (-> [..., M, n]), through the fastest CPU route for its shape (module doc).
    `bf16_through_fp32`: bf16 products of several rows as fp32 GEMMs where the CPU has no native bf16 kernels
    (faster, but not bit-identical to torch's bf16 product, so only the opt-in `"zaya_by_expert"` asks for it)."""
    if uses_bf16_matvec(x, weight, bias):
        return _bf16_matvec_op(x, weight) if torch.compiler.is_compiling() else bf16_matvec(x, weight)
    if uses_compiled_matvec(x, weight):
        # [..., M, 1, k] * [..., 1, n, k] -> [..., M, n], accumulated in fp32 and rounded once, as F.linear does
        product = (x.unsqueeze(-2).float() * weight.unsqueeze(-3).float()).sum(-1)
        return (product if bias is None else product + bias.float()).to(x.dtype)
    if bf16_through_fp32 and uses_fp32_gemm(x, weight):
        return fp32_gemm(x, weight, bias)
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
        if torch.compiler.is_compiling():
            return cpu_linear(input, self.weight, self.bias)
        with intra_op_threads(input.shape[:-1].numel() * self.weight.numel()):
            return cpu_linear(input, self.weight, self.bias)


class CPUDecoderLayer(ZayaDecoderLayer):
    """The decoder layer on one intra-op thread when its tokens' work is small (`intra_op_threads`): small models and
    short steps, where every op of the layer is too small to split."""

    @cached_property
    def multiply_adds_per_token(self) -> int:
        """Weights a token multiplies: the layer's, with one expert of each stacked [E, ...] expert tensor instead of
        all (a rough, size-only estimate; read from the parameters, so adapters wrapping the experts count too)."""
        return sum(p.numel() // p.shape[0] if p.ndim == 3 else p.numel() for p in self.parameters())

    def forward(self, residual: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            return super().forward(residual, *args, **kwargs)
        with intra_op_threads(residual.shape[:-1].numel() * self.multiply_adds_per_token):
            return super().forward(residual, *args, **kwargs)


class CPUCCAProjection(ZayaCCAProjection):
    """The CCA projection with a decode step's conv computed as a state update, and bf16 prefill convs in fp32."""

    def causal_conv(self, window: torch.Tensor, sequence_positions: torch.Tensor | None = None) -> torch.Tensor:
        if sequence_positions is not None:  # packed rows: the model cuts one window per token, which come back here
            return super().causal_conv(window, sequence_positions)
        if window.shape[-1] == self.conv_width + 1:
            return self.state_update(window)
        if window.dtype == torch.bfloat16 and not NATIVE_BF16_MATMUL and _plain(window, self.conv_qk_grouped.weight):
            return self.fp32_conv(window)
        return super().causal_conv(window)

    def state_update(self, window: torch.Tensor) -> torch.Tensor:
        """The conv's one output column of a decode step: `window` [B, C, W + 1] -> [B, 1, C]."""
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

    def fp32_conv(self, window: torch.Tensor) -> torch.Tensor:
        """Both convs as fp32 `conv1d` (oneDNN), each rounded to bf16 as the bf16 convolution rounds, where a bf16
        `conv1d` without native bf16 kernels runs a slow convolution per channel (ZAYA1-8B, 4096 tokens: ~38x)."""
        dtype = window.dtype
        for conv in (self.conv_qk_depthwise, self.conv_qk_grouped):
            window = F.conv1d(window.float(), conv.weight.float(), conv.bias.float(), groups=conv.groups).to(dtype)
        return window.transpose(1, 2)


class CPUExperts(ZayaExperts):
    """The experts with transformers' default implementation (`grouped_mm`) sped up for one- and two-token steps;
    every other implementation, and `grouped_mm` on more tokens, runs as it is."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.config._experts_implementation == "grouped_mm":
            if torch.compiler.is_compiling():
                if uses_compiled_matvec(hidden_states, self.gate_up_proj[0]):
                    return self.gathered(hidden_states, top_k_index[:, 0], top_k_weights)
            elif hidden_states.shape[0] == 1:
                return self.gathered(hidden_states, top_k_index[0, 0].item(), top_k_weights)
        return super().forward(hidden_states, top_k_index, top_k_weights)

    def gathered(self, hidden_states: torch.Tensor, expert: torch.Tensor | int, weights: torch.Tensor) -> torch.Tensor:
        """Each token through its own expert's weights, indexed where they lie: `expert` [N] (or one int for all)."""
        rows = hidden_states[:, None]  # [N, 1, d]: one row per (gathered) matrix
        gate, up = cpu_linear(rows, self.gate_up_proj[expert]).squeeze(1).chunk(2, dim=-1)  # [N, I] each
        output = cpu_linear((self.act_fn(gate) * up)[:, None], self.down_proj[expert]).squeeze(1)  # [N, d]
        return (output * weights).to(hidden_states.dtype)


def experts_one_by_one(
    module: ZayaExperts,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: Callable[[torch.Tensor, int], torch.Tensor],
    down: Callable[[torch.Tensor, int], torch.Tensor],
) -> torch.Tensor:
    """The tokens of each used expert as one product pair, `gate_up(x, expert)` and `down(x, expert)`, in expert
    order, scattered back: `hidden_states` [N, d], `top_k_index` and `top_k_weights` [N, 1] (top-1; skip-class
    tokens come as expert 0 with weight 0). One token (a decode step at batch 1) goes straight to its expert."""
    if hidden_states.shape[0] == 1:
        expert = top_k_index[0, 0].item()
        gate, up = gate_up(hidden_states, expert).chunk(2, dim=-1)
        return (down(module.act_fn(gate) * up, expert) * top_k_weights).to(hidden_states.dtype)
    expert_of_token = top_k_index[:, 0]
    counts = torch.bincount(expert_of_token, minlength=module.num_experts).tolist()
    order = torch.argsort(expert_of_token, stable=True)
    sorted_output = torch.empty_like(hidden_states)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            tokens = order[start : start + count]
            gate, up = gate_up(hidden_states[tokens], expert).chunk(2, dim=-1)
            sorted_output[start : start + count] = down(module.act_fn(gate) * up, expert) * top_k_weights[tokens]
            start += count
    output = torch.empty_like(hidden_states)
    output[order] = sorted_output  # back to token order
    return output


def by_expert_experts_forward(
    module: ZayaExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`experts_one_by_one` through `cpu_linear`: fp32 GEMMs from `FP32_GEMM_MIN_ROWS` rows without native bf16
    kernels."""
    return experts_one_by_one(
        module, hidden_states, top_k_index, top_k_weights,
        lambda x, expert: cpu_linear(x, module.gate_up_proj[expert], bf16_through_fp32=True),
        lambda x, expert: cpu_linear(x, module.down_proj[expert], bf16_through_fp32=True),
    )


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


class CPUAttention(ZayaAttention):
    """Attention with eager one-token `"sdpa"` steps packed per KV head (`packed_gqa_sdpa`), mask or not. Compiled
    graphs keep transformers' SDPA, which they were measured with."""

    def attention_function(self) -> Callable:
        if self.config._attn_implementation == "sdpa" and not torch.compiler.is_compiling():
            return packed_gqa_sdpa
        return super().attention_function()


CPU_FORWARDS: dict[type, type] = {
    nn.Linear: CPULinear,
    ZayaAttention: CPUAttention,
    ZayaCCAProjection: CPUCCAProjection,
    ZayaExperts: CPUExperts,
    ZayaDecoderLayer: CPUDecoderLayer,
}
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


ALL_EXPERTS_FUNCTIONS.register("zaya_by_expert", by_expert_experts_forward)
