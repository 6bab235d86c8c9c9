"""One product of a decode step (1 row, or `--rows`): bf16 `F.linear` against zaya_hf's own bf16 kernel
("dense-native"), torch's int8 / int4 CPU kernels and zaya_hf's own int8 kernel ("int8-native", both in
`zaya_hf.ops.native`) on the same weights at ZAYA1-8B's shapes (and two small ones: the embedded model's head and a
64 x 64 weight), with bf16 and with fp32 activations (what `dtype=torch.float32` gives a quantized model). Median
milliseconds per product and the bytes of weights streamed per second; one JSON line per shape and row count.

    OMP_NUM_THREADS=1 python benchmarks/bench_quant_kernels.py [--repeats 50] [--rows 1 4 16]
"""

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
from bench_cpu_ops import median_ms  # benchmarks/ is on the path of a script run from it

from zaya_hf.bench.record import machine
from zaya_hf.ops import native
from zaya_hf.quantization import formats
from zaya_hf.quantization.formats import QuantSpec

# (out, in): the tied LM head, an expert's gate/up and down, the attention's output projection, the router's input.
SHAPES = {"lm_head": (262144, 2048), "expert_gate_up": (4096, 2048), "expert_down": (2048, 2048),
          "o_proj": (2048, 2048), "router_down_proj": (256, 2048), "embedded_lm_head": (512, 128), "small": (64, 64)}
SPECS = {"int8": QuantSpec(8, None), "int4-g64": QuantSpec(4, 64)}


def torch_kernel(spec: QuantSpec):
    """torch's own kernel for `spec`, whatever `formats.quantized_matmul` would dispatch to."""
    if spec.bits == 8:
        return torch.ops.aten._weight_int8pack_mm
    return lambda x, packed, scale: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, spec.group_size, scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rows", type=int, nargs="+", default=[1], help="rows of input per product")
    args = parser.parse_args()
    if native.INT8_MATVEC is None:
        raise SystemExit(f"zaya_hf's kernels are unavailable: {native.NATIVE_UNAVAILABLE}")
    torch.manual_seed(0)
    command = " ".join(["python", *sys.argv])
    for (name, (out_features, in_features)), rows in itertools.product(SHAPES.items(), args.rows):
        weight = torch.randn(out_features, in_features).mul_(0.02).to(torch.bfloat16)
        record = {"command": command, "machine": machine(), "shape": name, "out_features": out_features,
                  "in_features": in_features, "rows": rows, "torch_threads": torch.get_num_threads(),
                  "load_average_1min": os.getloadavg()[0]}
        for act_dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(rows, in_features, dtype=act_dtype)
            act = str(act_dtype).removeprefix("torch.")
            dense = weight.to(act_dtype)
            record[f"dense_{act}_ms"] = median_ms(lambda: F.linear(x, dense), args.repeats)
            for spec_name, spec in SPECS.items():
                q, scale = formats.quantize(weight, spec, act_dtype)
                packed, kernel_scale = formats.to_kernel_layout(q, scale, spec)
                kernels = {spec_name: torch_kernel(spec)}
                if spec.bits == 8:
                    kernels["int8-native"] = native.int8_matvec
                for kernel_name, kernel in kernels.items():
                    ms = median_ms(lambda: kernel(x, packed, kernel_scale), args.repeats)
                    record[f"{kernel_name}_{act}_ms"] = ms
                    record[f"{kernel_name}_{act}_speedup_vs_dense_bf16"] = round(record["dense_bfloat16_ms"] / ms, 2)
                    record[f"{kernel_name}_{act}_weight_GB_per_s"] = round(
                        (packed.nbytes + kernel_scale.nbytes) / ms / 1e6, 2)
        x = torch.randn(rows, in_features, dtype=torch.bfloat16)
        record["dense-native_bfloat16_ms"] = median_ms(lambda: native.bf16_matvec(x, weight), args.repeats)
        for kernel_name in ("dense", "dense-native"):
            record[f"{kernel_name}_bfloat16_weight_GB_per_s"] = round(
                weight.nbytes / record[f"{kernel_name}_bfloat16_ms"] / 1e6, 2)
        record["dense-native_bfloat16_speedup_vs_dense_bf16"] = round(
            record["dense_bfloat16_ms"] / record["dense-native_bfloat16_ms"], 2)
        print(json.dumps(record), flush=True)

if __name__ == "__main__":
    main()
