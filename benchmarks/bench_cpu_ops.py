"""The CPU per-op figures quoted in README "Performance" and in `kernels_zaya.linear` / `cpu_sdpa_forward`.

At bench-small sizes: the 32000 x 512 LM head multiplying 1, 2 and 4 rows through MKL (`F.linear`), oneDNN (eager
`kernels_zaya.linear`) and the compiled multiply-and-sum (`kernels_zaya.linear` under `torch.compile`); and one
batch-16 decode step of attention (8 query / 2 kv heads of 64, 160 cached tokens) with `enable_gqa` (transformers'
unmasked call) against packed query heads (`cpu_sdpa_forward`). fp32 and bf16; median milliseconds; one JSON line.

    python benchmarks/bench_cpu_ops.py [--repeats 50]
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from zaya_hf.kernels_zaya import linear
from zaya_hf.modeling_zaya import cpu_sdpa_forward


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
    compiled = torch.compile(linear, fullgraph=True, dynamic=False)
    result = {}
    for rows in (1, 2, 4):
        x = torch.randn(rows, 512, dtype=dtype)
        result[f"head_rows{rows}_f_linear_ms"] = median_ms(lambda: F.linear(x, weight), repeats)
        result[f"head_rows{rows}_linear_eager_ms"] = median_ms(lambda: linear(x, weight), repeats)
        result[f"head_rows{rows}_linear_compiled_ms"] = median_ms(lambda: compiled(x, weight), repeats)
    return result


def one_token_attention(dtype: torch.dtype, repeats: int) -> dict:
    batch, heads, kv_heads, head_dim, cached = 16, 8, 2, 64, 160
    query = torch.randn(batch, heads, 1, head_dim, dtype=dtype)
    key, value = (torch.randn(batch, kv_heads, cached, head_dim, dtype=dtype) for _ in range(2))
    module = torch.nn.Module()  # the attention interface takes the layer; cpu_sdpa_forward reads nothing from it
    return {
        "attention_bs16_enable_gqa_ms": median_ms(
            lambda: F.scaled_dot_product_attention(query, key, value, scale=head_dim**-0.5, enable_gqa=True), repeats
        ),
        "attention_bs16_packed_ms": median_ms(
            lambda: cpu_sdpa_forward(module, query, key, value, None, scaling=head_dim**-0.5), repeats
        ),
    }


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"torch_threads": torch.get_num_threads()}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        figures = {**head_products(dtype, args.repeats), **one_token_attention(dtype, args.repeats)}
        result.update({f"{name}_{key}": value for key, value in figures.items()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
