"""Compile every Triton kernel of zaya_hf.ops.triton_kernels for real GPU targets, without a GPU.

The kernels are tested for numerics in Triton's CPU interpreter, which does not run the compiler. This script runs the
package's own launch code at ZAYA1-8B layer sizes with the launches intercepted, then compiles each captured
specialisation ahead of time with the compilers that ship in the triton wheel (ptxas for NVIDIA, LLVM for AMD):
`ttir -> ttgir -> llir -> ptx/amdgcn -> cubin/hsaco`. It fails on any compile error and on kernels whose shared
memory exceeds the target's limit (which would only fail at launch on the device). Prints one JSON line.

    python scripts/compile_kernels.py --targets sm90 gfx942
"""

import argparse
import json
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("Unset TRITON_INTERPRET: the interpreter replaces the compiler this script checks.")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from zaya_hf import ZayaConfig  # noqa: E402
from zaya_hf.ops import triton_kernels as kernels  # noqa: E402
from zaya_hf.modeling_zaya import ZayaDecoderLayer  # noqa: E402

# name: (target, shared memory per block in bytes)
TARGETS = {
    "sm80": (GPUTarget("cuda", 80, 32), 163 * 1024),  # A100
    "sm90": (GPUTarget("cuda", 90, 32), 227 * 1024),  # H100 / H200
    "gfx942": (GPUTarget("hip", "gfx942", 64), 64 * 1024),  # MI300X
}
TYPE_NAMES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32", torch.int64: "i64"
}


def capture_launches(dtype: torch.dtype) -> list[dict]:
    """Run the launch code of every fused operation on CPU tensors at ZAYA1-8B layer sizes, recording each kernel
    launch (kernel, arguments, launch options) instead of running it; autotuned kernels record every config."""
    launches = []

    def record_jit(self, *args, grid, warmup, **kwargs):
        launches.append({"fn": self, "args": args, "kwargs": kwargs})

    def record_autotuner(self, *args, grid, warmup, **kwargs):
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        for config in self.prune_configs(kwargs):
            launches.append({"fn": self.fn, "args": args, "kwargs": {**kwargs, **config.all_kwargs()}})

    JITFunction.run, Autotuner.run = record_jit, record_autotuner
    config = ZayaConfig(num_hidden_layers=2)  # ZAYA1-8B layer sizes
    torch.set_default_device("meta")  # shapes only: nothing is allocated or computed
    layer = ZayaDecoderLayer(config, layer_idx=1).to(dtype)
    attention, router = layer.self_attn, layer.mlp.gate
    projection = attention.qkv_proj
    hidden, router_dim = config.hidden_size, config.router_hidden_size
    rotary_dim = int(config.head_dim * config.rope_parameters["hybrid"]["partial_rotary_factor"])
    with torch.no_grad():
        for batch, seq_len in ((1, 256), (4, 1)):  # prefill / decode block sizes
            tokens = batch * seq_len
            query = torch.zeros(batch, seq_len, projection.q_proj.out_features, dtype=dtype)
            key = torch.zeros(batch, seq_len, projection.k_proj.out_features, dtype=dtype)
            angles = torch.zeros(batch, seq_len, rotary_dim, dtype=dtype)
            channels = projection.conv_qk_depthwise.in_channels
            conv_state = torch.zeros(batch, channels, projection.conv_width, dtype=dtype)
            depthwise, grouped = projection.conv_qk_depthwise, projection.conv_qk_grouped
            convs = (depthwise.weight, depthwise.bias, grouped.weight, grouped.bias, attention.qk_norm.temp, angles, angles)
            for state, with_cache in ((None, True), (None, False), (conv_state, True)):  # prefill, scoring, chunk
                kernels.cca_qk_mix(query, key, state, *convs, return_window=with_cache)
            choice = torch.zeros(tokens, dtype=torch.long, device="cpu")  # sorting needs values
            experts = layer.mlp.experts
            kernels.moe_top1(torch.zeros(tokens, hidden, dtype=dtype), choice, torch.zeros(tokens, dtype=dtype),
                             experts.gate_up_proj, experts.down_proj)
            mlp = router.router_mlp
            for carried in (None, torch.zeros(batch, seq_len, router_dim, dtype=dtype)):
                kernels.router_top1(
                    torch.zeros(batch, seq_len, router_dim, dtype=dtype), carried,
                    router.router_states_scale if carried is not None else None, mlp.norm.weight,
                    mlp.norm.variance_epsilon, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                    mlp.out_proj.weight, router.balancing_biases,
                )
    # The residual/norm kernels forward and backward, in their three modes.
    scaling, norm = layer.post_attention_residual_scale, layer.post_attention_layernorm
    hidden_states = torch.zeros(2, 64, hidden, dtype=dtype, requires_grad=True)
    residual = torch.zeros(2, 64, hidden, requires_grad=True)
    merged, normed = kernels.residual_merge_rmsnorm(hidden_states, residual, *scaling.parameters(), norm.weight, 1e-5)
    merged_only, _ = kernels.residual_merge_rmsnorm(hidden_states, residual, *scaling.parameters())
    outputs = (merged, normed, merged_only, kernels.residual_rmsnorm(residual, norm.weight, 1e-5))
    torch.autograd.backward(outputs, [torch.zeros_like(t) for t in outputs])
    torch.set_default_device(None)
    return launches


def signature(launch: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) of a captured launch, as `triton.compile` takes them."""
    fn = launch["fn"]
    kwargs = dict(launch["kwargs"])
    options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages") if name in kwargs}
    values = dict(zip(fn.arg_names, launch["args"], strict=False))  # the rest come as keywords
    values.update(kwargs)
    types, constexprs = {}, {}
    for param in fn.params:
        value = values[param.name]
        if param.is_constexpr:
            types[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            types[param.name] = "*" + TYPE_NAMES[value.dtype]
        elif isinstance(value, bool):
            types[param.name] = "i1"
        elif isinstance(value, int):
            types[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            types[param.name] = "fp32"
    return types, constexprs, options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=sorted(TARGETS))
    parser.add_argument("--dtypes", nargs="+", choices=["bf16", "fp16", "fp32"], default=["bf16", "fp16", "fp32"])
    parser.add_argument("--kernels", nargs="+", help="only kernels whose name contains one of these")
    args = parser.parse_args()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    variants = {}
    for dtype_name in args.dtypes:
        for launch in capture_launches(dtypes[dtype_name]):
            if args.kernels and not any(part in launch["fn"].__name__ for part in args.kernels):
                continue
            types, constexprs, options = signature(launch)
            key = (launch["fn"].__name__, *(repr(sorted(d.items())) for d in (types, constexprs, options)))
            variants.setdefault(key, (launch["fn"], types, constexprs, options))
    shared_bytes, failures, compiled_count = {}, [], 0
    started = time.time()
    for target_name in args.targets:
        target, shared_limit = TARGETS[target_name]
        for fn, types, constexprs, options in variants.values():
            label = f"{fn.__name__}[{', '.join(f'{k}={v}' for k, v in constexprs.items())}, {options}]"
            try:
                compiled = triton.compile(ASTSource(fn, types, constexprs), target=target, options=options)
            except Exception as error:  # a compile error is the finding: report it with the variant
                failures.append(f"{target_name} {label}: {type(error).__name__}: {str(error)[:400]}")
                continue
            shared = compiled.metadata.shared
            if shared > shared_limit:
                failures.append(f"{target_name} {label}: needs {shared} B shared memory > {shared_limit} B")
            per_kernel = shared_bytes.setdefault(target_name, {}).setdefault(str(constexprs["DTYPE"]), {})
            per_kernel[fn.__name__] = max(per_kernel.get(fn.__name__, 0), shared)
            compiled_count += 1
    summary = {
        "triton": triton.__version__,
        "targets": args.targets,
        "dtypes": args.dtypes,
        "variants_per_target": len(variants),
        "compiled": compiled_count,
        "max_shared_bytes": shared_bytes,  # per target, dtype and kernel, over block-size variants
        "failures": failures,
        "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(summary))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
