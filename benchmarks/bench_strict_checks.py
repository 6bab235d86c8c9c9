"""What strict loading and input validation cost: the figures quoted in README "Strict by default".

On the embedded model: `from_pretrained` (median of --repeats) and its NaN/inf check alone; one `check_model_inputs`
call against one eager decode step at batch 16. For ZAYA1-8B, an estimate from the measured throughput of a bf16 sum
(the NaN/inf check is one sum per tensor) over 8.84e9 values; one thread, median milliseconds; one JSON line.

    python benchmarks/bench_strict_checks.py [--repeats 20]
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

import zaya_hf
from zaya_hf import ZayaCache, ZayaForCausalLM
from zaya_hf.modeling_zaya import _check_finite_weights, check_model_inputs

ZAYA1_8B_VALUES = 8.84e9  # `zaya-hf info --model <ZAYA1-8B config>`: total parameters


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = zaya_hf.default_model_path()
    result = {"torch_threads": 1}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        model = ZayaForCausalLM.from_pretrained(path, dtype=dtype)
        result[f"{name}_embedded_from_pretrained_ms"] = median_ms(
            lambda: ZayaForCausalLM.from_pretrained(path, dtype=dtype), args.repeats  # noqa: B023
        )
        result[f"{name}_embedded_finite_check_ms"] = median_ms(
            lambda: _check_finite_weights(model, "bench"), args.repeats  # noqa: B023
        )

    values = torch.randn(256_000_000, dtype=torch.bfloat16)
    sum_ms = median_ms(values.sum, 3)
    result["bfloat16_sum_gvalues_per_s"] = values.numel() / sum_ms / 1e6
    result["zaya1_8b_finite_check_estimate_s"] = ZAYA1_8B_VALUES / values.numel() * sum_ms / 1e3
    del values

    model = ZayaForCausalLM.from_pretrained(path).eval()
    ids, positions = torch.randint(0, model.config.vocab_size, (16, 1)), torch.full((16, 1), 100)
    result["input_check_us"] = 1e3 * median_ms(
        lambda: check_model_inputs(model.config, ids, None, positions, None), args.repeats * 10
    )
    cache = ZayaCache(model.config)
    model(torch.randint(0, model.config.vocab_size, (16, 100)), cache=cache, use_cache=True)
    step = 0

    def decode_step():
        nonlocal step
        model(ids, cache=cache, use_cache=True, position_ids=positions + step)
        step += 1

    result["embedded_decode_step_bs16_ms"] = median_ms(decode_step, args.repeats)
    result["input_check_share_of_decode_step"] = result["input_check_us"] / 1e3 / result["embedded_decode_step_bs16_ms"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
