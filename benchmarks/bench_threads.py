"""Intra-op threads for small products: greedy decoding of the embedded model and of bench-small with torch's threads
as they are, with zaya_hf's work-size rule (`ops.thresholds.PARALLEL_MIN_MULTIPLY_ADDS`: layers and products with less
work run on one thread) and without it, and on one thread throughout. One process, the settings taking turns; the
1-minute load average is recorded with every figure, since on a shared machine it decides what threads cost.

    python benchmarks/bench_threads.py [--threads 2] [--repeats 3] [--output benchmarks/results/bench_threads.json]
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import zaya_hf.ops.cpu as cpu_ops
from zaya_hf import ZayaForCausalLM
from zaya_hf.bench import build_bench_small
from zaya_hf.bench.record import emit
from zaya_hf.default_model import default_model_path

RULE = cpu_ops.PARALLEL_MIN_MULTIPLY_ADDS
SETTINGS = {  # name: (intra-op threads, PARALLEL_MIN_MULTIPLY_ADDS)
    "threads_with_rule": (None, RULE),
    "threads_without_rule": (None, 0),
    "one_thread": (1, RULE),
}


@torch.no_grad()
def generate_seconds(model, batch: int, prompt_tokens: int, new_tokens: int) -> float:
    prompt = torch.randint(4, model.config.vocab_size, (batch, prompt_tokens), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    models = {
        "embedded_bf16": ZayaForCausalLM.from_pretrained(default_model_path()).eval(),
        "bench_small_fp32": build_bench_small().eval(),
    }
    result = {"threads": args.threads, "repeats": args.repeats, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "parallel_min_multiply_adds": RULE, "load_average_1min": [os.getloadavg()[0]]}
    for model_name, model in models.items():
        for batch in (1, 16):
            samples = {name: [] for name in SETTINGS}
            for repeat in range(args.repeats + 1):  # the first round warms up
                for name, (threads, rule) in SETTINGS.items():
                    torch.set_num_threads(threads or args.threads)
                    cpu_ops.PARALLEL_MIN_MULTIPLY_ADDS = rule
                    seconds = generate_seconds(model, batch, args.prompt_tokens, args.new_tokens)
                    if repeat:
                        samples[name].append(seconds)
            for name, values in samples.items():
                result[f"{model_name}_bs{batch}_{name}_tok_s"] = round(batch * args.new_tokens / statistics.median(values), 1)
            result["load_average_1min"].append(os.getloadavg()[0])
    cpu_ops.PARALLEL_MIN_MULTIPLY_ADDS = RULE
    emit(result, "benchmarks/bench_threads.py", args, args.output)


if __name__ == "__main__":
    main()
