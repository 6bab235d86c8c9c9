# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""bf16 weights prepacked for oneDNN: CPU inference that streams weights at the memory's speed. Package-only, opt in.

Given a plain row-major bf16 weight, torch's `F.linear` on a CPU with native bf16 kernels (AVX512-BF16 or AMX) runs
a decode step's matrix-vector products at well under the memory's read rate. Reordered once into oneDNN's own blocked
layout (`torch.ops.mkldnn._reorder_linear_weight`, what Inductor's freezing pass does for compiled graphs), the same
products read the weight faster and give bit-identical results (`modeling_tests/test_prepacked.py`; the speed:
`python benchmarks/bench_real_size.py --prepack`, recorded in benchmarks/results/). `prepack_for_cpu_inference(model)`
does that for every bf16 `nn.Linear` and every expert matrix, in place, one weight at a time: the model then holds
one copy of its weights in its own memory (plus, for a tied LM head, its prepacked copy beside the embedding table,
which lookups still read). The checkpoint's memory-mapped shards stay mapped (the tensors left plain still reference
them), but the prepacked weights' pages in them are not read again: clean page cache the kernel can take back.

A prepacked weight is an opaque oneDNN tensor: no autograd, no `torch.compile`, no device moves, not a tensor a
checkpoint can hold. So a prepacked model is for eager CPU inference only (`generate()`, the RSA engine, the
server), and it refuses the rest with an error that says to load the checkpoint again: saving or any `state_dict()`,
a forward that autograd would record, a compiled forward, and inputs that are not bf16 on the CPU (which is what a
model moved to another device or dtype sends: the prepacked weights do not move).
"""

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from ..modeling_zaya import ZayaExperts
from .cpu import NATIVE_BF16_MATMUL, CPUDecoderLayer, CPULinear, experts_one_by_one, intra_op_threads
from .thresholds import PREPACK_ROWS

EXPERTS_IMPLEMENTATION = "zaya_prepacked"


class PrepackedWeightsError(RuntimeError):
    """A prepacked model asked to do what only plain weights can (train, compile, save, move)."""


def _refuse(module: nn.Module, what: str) -> PrepackedWeightsError:
    return PrepackedWeightsError(
        f"{type(module).__name__} holds bf16 weights prepacked for oneDNN (`prepack_for_cpu_inference`), which "
        f"cannot {what}: they serve eager CPU inference only. Load the checkpoint again for anything else."
    )


def _check_inference(module: nn.Module, x: torch.Tensor) -> None:
    if torch.compiler.is_compiling():
        raise _refuse(module, "be compiled (compile a model that was not prepacked)")
    if torch.is_grad_enabled() and x.requires_grad:
        raise _refuse(module, "be trained or differentiated")
    if x.device.type != "cpu" or x.dtype != torch.bfloat16:
        raise _refuse(module, f"multiply {x.dtype} inputs on {x.device} (bf16 on the CPU only)")


def prepacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, W, bias)` for the prepacked `weight` of W [n, k]: `x` [..., k] -> [..., n]."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def prepack(weight: torch.Tensor, rows: int = PREPACK_ROWS) -> torch.Tensor:
    """`weight` [n, k] in the layout oneDNN picks for products of `rows` rows (the default: `PREPACK_ROWS`, which
    serves a decode step's few rows and a prefill's thousands alike)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


class PrepackedLinear(CPULinear):
    """A bf16 `nn.Linear` whose weight lives only as `prepacked_weight` (its `weight` parameter is gone)."""

    prepacked_weight: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _check_inference(self, input)
        with intra_op_threads(input.shape[:-1].numel() * self.in_features * self.out_features):
            return prepacked_linear(input, self.prepacked_weight, self.bias)


def prepacked_experts_forward(
    module: ZayaExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts implementation `"zaya_prepacked"`: each used expert's tokens through its prepacked matrices."""
    _check_inference(module, hidden_states)
    return experts_one_by_one(
        module, hidden_states, top_k_index, top_k_weights,
        lambda x, expert: prepacked_linear(x, module.prepacked_gate_up[expert]),
        lambda x, expert: prepacked_linear(x, module.prepacked_down[expert]),
    )


def _refuse_state_dict(module: nn.Module, *args, **kwargs) -> None:
    raise _refuse(module, "be saved or give a state_dict")


def _prepack_linear(module: nn.Linear) -> None:
    module.prepacked_weight = prepack(module.weight)
    module.register_parameter("weight", None)  # the plain copy goes: memory stays at one copy
    module.__class__ = PrepackedLinear
    module.register_state_dict_pre_hook(_refuse_state_dict)


def _prepack_experts(module: ZayaExperts) -> None:
    module.prepacked_gate_up = [prepack(matrix) for matrix in module.gate_up_proj]
    module.register_parameter("gate_up_proj", None)
    module.prepacked_down = [prepack(matrix) for matrix in module.down_proj]
    module.register_parameter("down_proj", None)
    module.register_state_dict_pre_hook(_refuse_state_dict)


@torch.no_grad()
def prepack_for_cpu_inference(model: nn.Module) -> nn.Module:
    """Prepack, in place, the weights of every bf16 `nn.Linear` and of the experts of `model` (a zaya_hf model on
    the CPU) for oneDNN, and switch its experts to the `"zaya_prepacked"` implementation; returns `model`.
    Inference only (module doc). Raises `ValueError` where it cannot help: a CPU without native bf16 kernels, or a
    model not in bf16 on the CPU."""
    if not NATIVE_BF16_MATMUL:
        raise ValueError(
            "prepack_for_cpu_inference needs a CPU with native bf16 kernels (AVX512-BF16 or AMX); this one has none, "
            "and oneDNN's prepacked bf16 products would be no faster than torch's."
        )
    linears = [m for m in model.modules() if type(m) in (nn.Linear, CPULinear)]
    experts = [m for m in model.modules() if isinstance(m, ZayaExperts) and m.gate_up_proj is not None]
    targets = {id(module) for module in linears + experts}
    for name, module in model.named_modules():  # everything checked before anything changes
        if id(module) in targets:
            for tensor_name, tensor in module.named_parameters(recurse=False):
                if tensor.device.type != "cpu" or tensor.dtype != torch.bfloat16:
                    raise ValueError(
                        f"prepack_for_cpu_inference takes bf16 weights on the CPU; {name}.{tensor_name} is "
                        f"{tensor.dtype} on {tensor.device}."
                    )
    for layer in model.modules():  # the threads rule counts a layer's weights: count them while they are plain
        if isinstance(layer, CPUDecoderLayer):
            layer.multiply_adds_per_token
    for module in linears:
        _prepack_linear(module)
    for module in experts:
        _prepack_experts(module)
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    return model.requires_grad_(False)  # so that forwards outside `no_grad` run too


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, prepacked_experts_forward)
