"""One product at batch 1 (the decode case): bf16 `F.linear` against torch's int8 / int4 CPU kernels on the same
weights at ZAYA1-8B's shapes, with bf16 and with fp32 activations (what `dtype=torch.float32` gives a quantized
model). Median milliseconds per product and the bytes of weights streamed per second; one JSON line per shape.

    OMP_NUM_THREADS=1 python benchmarks/bench_quant_kernels.py [--repeats 50]
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from bench_cpu_ops import median_ms  # benchmarks/ is on the path of a script run from it

from zaya_hf.bench.record import machine
from zaya_hf.quantization import formats
from zaya_hf.quantization.formats import QuantSpec

# (out, in): the tied LM head, an expert's gate/up and down, the attention's output projection, the router's input.
SHAPES = {"lm_head": (262144, 2048), "expert_gate_up": (4096, 2048), "expert_down": (2048, 2048),
          "o_proj": (2048, 2048), "router_down_proj": (256, 2048)}
SPECS = {"int8": QuantSpec(8, None), "int4-g64": QuantSpec(4, 64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    command = " ".join(["python", *sys.argv])
    for name, (rows, cols) in SHAPES.items():
        weight = torch.randn(rows, cols).mul_(0.02).to(torch.bfloat16)
        record = {"command": command, "machine": machine(), "shape": name, "out_features": rows, "in_features": cols,
                  "torch_threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0]}
        for act_dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(1, cols, dtype=act_dtype)
            act = str(act_dtype).removeprefix("torch.")
            dense = weight.to(act_dtype)
            record[f"dense_{act}_ms"] = median_ms(lambda: F.linear(x, dense), args.repeats)
            for spec_name, spec in SPECS.items():
                q, scale = formats.quantize(weight, spec, act_dtype)
                packed, kernel_scale = formats.to_kernel_layout(q, scale, spec)
                ms = median_ms(lambda: formats.quantized_matmul(x, packed, kernel_scale, spec.bits,
                                                                spec.group_size or 0), args.repeats)
                record[f"{spec_name}_{act}_ms"] = ms
                record[f"{spec_name}_{act}_speedup_vs_dense_bf16"] = round(record["dense_bfloat16_ms"] / ms, 2)
                record[f"{spec_name}_{act}_weight_GB_per_s"] = round(
                    (packed.nbytes + kernel_scale.nbytes) / ms / 1e6, 2)
        record["dense_bfloat16_weight_GB_per_s"] = round(weight.nbytes / record["dense_bfloat16_ms"] / 1e6, 2)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
