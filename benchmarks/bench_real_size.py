"""Speed at ZAYA1-8B's real size, bf16 on the CPU: zaya_hf against transformers' own ZAYA, and both against the bound
the machine's read bandwidth sets.

Streams a ZAYA1-8B-shaped checkpoint with random weights to `--checkpoint` (kept for the next run), then loads it in
one process per implementation (`from_pretrained(..., dtype=torch.bfloat16)`), which take turns on every measurement:
load time and peak RSS, decode tokens/s at batch 1 and 16 (median step, greedy), prefill tokens/s at 512 and 4,096
tokens, the read bandwidth (measured between the measurements), the bytes a decode step must read, and each
implementation's fraction of that bound. `--layers N` keeps the first N of the 40 layers (with the full vocabulary
and head), for machines that cannot hold the 17 GB of the whole model. Prints one JSON line (and writes it to
`--output`). `--prepack` runs zaya_hf with its weights prepacked for oneDNN (`zaya_hf.ops.prepack_for_cpu_inference`,
inference only); that process then holds its own copy of the weights beside the page cache the other one maps, so
it needs twice the checkpoint's size in memory. `--compile` runs zaya_hf's decode steps compiled (a static cache and a
`compile_config`; the first call at each batch size compiles, untimed, its seconds recorded); transformers' ZAYA
has no compiled decode and runs as it is. Prefill stays eager in both.

    python benchmarks/bench_real_size.py --layers 8 [--threads 2] [--prepack | --compile] [--output benchmarks/results/bench_real_size.json]
"""

import argparse
import tempfile
from pathlib import Path

import torch

from zaya_hf.bench.real_size import run_real_size_benchmark
from zaya_hf.bench.record import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="the first N of ZAYA1-8B's 40 layers (default 8)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="folder of the random checkpoint (default: zaya1-8b-random-L<layers> in the temp dir)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="decode repetitions per implementation")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--prefill-tokens", type=int, nargs="*", default=[512, 4096])
    parser.add_argument("--prefill-repeats", type=int, default=1)
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--prepack", action="store_true",
                         help="zaya_hf's bf16 weights prepacked for oneDNN (zaya_hf.ops.prepack_for_cpu_inference)")
    variant.add_argument("--compile", action="store_true",
                         help="zaya_hf decodes with a static cache and a compile_config (one compiled graph per step)")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON line here")
    args = parser.parse_args()
    if not 1 <= args.layers <= 40:
        raise SystemExit(f"--layers must be between 1 and 40 (ZAYA1-8B has 40), got {args.layers}.")
    folder = args.checkpoint or Path(tempfile.gettempdir()) / f"zaya1-8b-random-L{args.layers}"
    result = run_real_size_benchmark(
        folder, layers=args.layers, threads=args.threads, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, repeats=args.repeats, prefill_tokens=tuple(args.prefill_tokens),
        prefill_repeats=args.prefill_repeats,
        variant="prepacked" if args.prepack else "compiled" if args.compile else "eager",
    )
    emit(result, "benchmarks/bench_real_size.py", args, args.output)


if __name__ == "__main__":
    main()
