"""The CPU per-op figures behind zaya_hf.ops.cpu and its thresholds (zaya_hf.ops.thresholds), quoted in README.

At bench-small sizes (hidden 512, 8 query / 2 kv heads of 64, 16 experts of 512): the 32000 x 512 LM head
multiplying 1, 2 and 4 rows through MKL (`F.linear`), oneDNN (eager `cpu_linear`) and the compiled multiply-and-sum
(`cpu_linear` under `torch.compile`); a decode step's CCA conv by `conv1d` (the model's forward) and as a state update
(`CPUCCAProjection`), at batch 1 and 16; one token through its expert with transformers' `grouped_mm` and directly
(`CPUExperts`); and one batch-16 decode step of attention (160 cached tokens) with `enable_gqa` (transformers'
unmasked call) against packed query heads (`packed_gqa_sdpa`). fp32 and bf16; median milliseconds; one JSON line.

`--prepack-rows` measures instead what `zaya_hf.ops.thresholds.PREPACK_ROWS` was chosen from (CPUs with native bf16
kernels only): ZAYA1-8B's expert gate/up matrix (4096 x 2048, bf16) multiplying 1 to 4096 rows as a plain weight
(`F.linear`) and prepacked for oneDNN with each candidate row count as the layout's hint.

    python benchmarks/bench_cpu_ops.py [--repeats 50]
    python benchmarks/bench_cpu_ops.py --prepack-rows --output benchmarks/results/bench_prepack_rows.json
"""

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from zaya_hf import ZayaConfig
from zaya_hf.modeling_zaya import ZayaCCAProjection, ZayaExperts
from zaya_hf.bench.record import emit
from zaya_hf.ops.cpu import NATIVE_BF16_MATMUL, CPUCCAProjection, CPUExperts, cpu_linear, packed_gqa_sdpa
from zaya_hf.ops.prepacked import prepack, prepacked_linear

BENCH_SMALL = ZayaConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=16,
                         moe_intermediate_size=512, router_hidden_size=64, num_hidden_layers=1,
                         experts_implementation="grouped_mm")  # what a model resolves by default


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of `fn()` after three warm-up calls (which also compile)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 3)


def head_products(dtype: torch.dtype, repeats: int) -> dict:
    weight = torch.randn(32000, 512, dtype=dtype)
    compiled = torch.compile(cpu_linear, fullgraph=True, dynamic=False)
    result = {}
    for rows in (1, 2, 4):
        x = torch.randn(rows, 512, dtype=dtype)
        result[f"head_rows{rows}_f_linear_ms"] = median_ms(lambda: F.linear(x, weight), repeats)
        result[f"head_rows{rows}_linear_eager_ms"] = median_ms(lambda: cpu_linear(x, weight), repeats)
        result[f"head_rows{rows}_linear_compiled_ms"] = median_ms(lambda: compiled(x, weight), repeats)
    return result


def one_token_attention(dtype: torch.dtype, repeats: int) -> dict:
    batch, heads, kv_heads, head_dim, cached = 16, 8, 2, 64, 160
    query = torch.randn(batch, heads, 1, head_dim, dtype=dtype)
    key, value = (torch.randn(batch, kv_heads, cached, head_dim, dtype=dtype) for _ in range(2))
    module = torch.nn.Module()  # the attention interface takes the layer; packed_gqa_sdpa reads nothing from it
    return {
        "attention_bs16_enable_gqa_ms": median_ms(
            lambda: F.scaled_dot_product_attention(query, key, value, scale=head_dim**-0.5, enable_gqa=True), repeats
        ),
        "attention_bs16_packed_ms": median_ms(
            lambda: packed_gqa_sdpa(module, query, key, value, None, scaling=head_dim**-0.5), repeats
        ),
    }


def decode_conv_and_expert(dtype: torch.dtype, repeats: int) -> dict:
    projection = CPUCCAProjection(BENCH_SMALL, layer_idx=0).to(dtype)
    experts = CPUExperts(BENCH_SMALL).to(dtype)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.02), torch.nn.init.normal_(experts.down_proj, std=0.02)
    result = {}
    for batch in (1, 16):
        window = torch.randn(batch, projection.conv_qk_depthwise.in_channels, projection.conv_width + 1, dtype=dtype)
        result[f"decode_conv_bs{batch}_conv1d_ms"] = median_ms(
            lambda: ZayaCCAProjection.causal_conv(projection, window), repeats
        )
        result[f"decode_conv_bs{batch}_state_update_ms"] = median_ms(lambda: projection.causal_conv(window), repeats)
    hidden, index, weights = torch.randn(1, 512, dtype=dtype), torch.tensor([[5]]), torch.rand(1, 1, dtype=dtype)
    result["expert_one_token_grouped_mm_ms"] = median_ms(
        lambda: ZayaExperts.forward(experts, hidden, index, weights), repeats
    )
    result["expert_one_token_direct_ms"] = median_ms(lambda: experts(hidden, index, weights), repeats)
    return result


def prepack_rows(repeats: int) -> dict:
    """Milliseconds of one product with the plain weight and with the weight prepacked for each hint, per row count
    (fewer repeats for the larger products)."""
    weight = torch.randn(4096, 2048, dtype=torch.bfloat16)
    hints = (1, 16, 64, 256, 1024, 4096)
    prepacked = {hint: prepack(weight, hint) for hint in hints}
    result = {}
    for rows in (1, 4, 16, 64, 256, 1024, 4096):
        x = torch.randn(rows, 2048, dtype=torch.bfloat16)
        times = max(5, repeats * 16 // max(rows, 16))
        result[f"rows{rows}_f_linear_ms"] = median_ms(lambda: F.linear(x, weight), times)
        for hint, packed in prepacked.items():
            result[f"rows{rows}_prepacked_for{hint}_ms"] = median_ms(lambda: prepacked_linear(x, packed), times)
    return result


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--prepack-rows", action="store_true", help="only the prepack layout hint sweep (above)")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON line here")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.prepack_rows:
        if not NATIVE_BF16_MATMUL:
            parser.error("--prepack-rows needs a CPU with native bf16 kernels (AVX512-BF16 or AMX)")
        result = {"torch_threads": torch.get_num_threads(), "load_average_1min_at_start": os.getloadavg()[0],
                  **prepack_rows(args.repeats), "load_average_1min_at_end": os.getloadavg()[0]}
        emit(result, "benchmarks/bench_cpu_ops.py", args, args.output)
        return
    result = {"torch_threads": torch.get_num_threads(), "load_average_1min_at_start": os.getloadavg()[0]}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        figures = {
            **head_products(dtype, args.repeats),
            **decode_conv_and_expert(dtype, args.repeats),
            **one_token_attention(dtype, args.repeats),
        }
        result.update({f"{name}_{key}": value for key, value in figures.items()})
    result["load_average_1min_at_end"] = os.getloadavg()[0]
    emit(result, "benchmarks/bench_cpu_ops.py", args, args.output)


if __name__ == "__main__":
    main()
