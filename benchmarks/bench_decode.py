"""Decode / prefill speed and cache size of zaya_hf against transformers' own ZAYA, measured in one process.

Both models get the same random weights ("bench-small" by default) and run alternately: a warm-up, then
`--repeats` timed repetitions of each measurement; the median is reported. Prints one JSON line with the
command that reproduces it (and writes it to `--output`).
The measurement lives in `zaya_hf.bench`; `zaya-hf bench` runs the same on any model.

    python benchmarks/bench_decode.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 3]
"""

import argparse
from pathlib import Path

import torch

from zaya_hf.bench import build_bench_small, reference_twin, run_decode_benchmark
from zaya_hf.bench.record import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile", action="store_true", help="also time zaya_hf with a static cache and a compiled decode step"
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON line here")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA/ROCm device.")
    ours = build_bench_small(args.seed)
    reference = reference_twin(ours)
    ours, reference = ours.to(device, dtype).eval(), reference.to(device, dtype).eval()
    result = {"config": "bench-small", "device": str(device), "dtype": args.dtype, "repeats": args.repeats}
    result.update(
        run_decode_benchmark(
            ours, reference, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
            prefill_tokens=args.prefill_tokens, repeats=args.repeats, compile_decode=args.compile,
        )
    )
    emit(result, "benchmarks/bench_decode.py", args, args.output)


if __name__ == "__main__":
    main()
