"""How much weight noise the embedded-size model tolerates: greedy held-out accuracy after adding ±δ to every weight.

Adam moves every coordinate by about the learning rate per step whatever the size of its gradient, so the noisy
gradients of RL (64 rollouts a step) move all of a 2 M-parameter model's weights at once. This measures what a
random step of that size costs: each weight of the chosen parts gets +δ or -δ (a seeded random sign), and the
greedy accuracy on held-out problems is measured before and after, for each δ and each part.

    python benchmarks/rl_weight_noise.py --model <dir> --deltas 1e-3 3e-3 1e-2 --problems 256 \\
        --output benchmarks/results/rl_weight_noise.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from zaya_hf.bench.record import emit
from zaya_hf.tiny_reasoner.evaluation import evaluate_greedy
from zaya_hf.tiny_reasoner.task import held_out_problems

# Parameter groups by name: the first pattern a parameter's name contains decides its part.
PARTS = {
    "router": ("mlp.gate.",),
    "experts": ("mlp.experts.",),
    "attention": ("self_attn.",),
    "embedding": ("embed_tokens", "lm_head"),
}


def part_of(name: str, parameter: torch.Tensor) -> str:
    for part, patterns in PARTS.items():
        if any(pattern in name for pattern in patterns):
            return part
    return "other 1-D" if parameter.dim() == 1 else "other matrices"


def perturbed_accuracy(model, tokenizer, problems, delta: float, parts: set[str] | None, seed: int) -> float:
    """Greedy accuracy with ±`delta` added to the parameters of `parts` (None: all), weights restored after."""
    generator = torch.Generator().manual_seed(seed)
    saved = {}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # drawn for every parameter, so that a part gets the same signs alone as in the all-parts run
            signs = torch.randint(0, 2, parameter.shape, generator=generator).to(parameter.dtype) * 2 - 1
            if parts is None or part_of(name, parameter) in parts:
                saved[name] = parameter.detach().clone()
                parameter.add_(delta * signs)
        accuracy = evaluate_greedy(model, tokenizer, problems)
        for name, parameter in model.named_parameters():
            if name in saved:
                parameter.copy_(saved[name])
    return accuracy


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder (a tiny-reasoner model)")
    parser.add_argument("--deltas", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--by-part-delta", type=float, default=3e-3, help="δ of the per-part rows (0: none)")
    parser.add_argument("--problems", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    problems = held_out_problems(args.problems)
    counts: dict[str, int] = {}
    magnitude: dict[str, float] = {}
    for name, parameter in model.named_parameters():
        part = part_of(name, parameter)
        counts[part] = counts.get(part, 0) + parameter.numel()
        magnitude[part] = magnitude.get(part, 0.0) + parameter.detach().abs().sum().item()
    result = {
        "what": __doc__.splitlines()[0],
        "model": args.model,
        "problems": len(problems),
        "parameters_by_part": counts,
        "mean_abs_weight_by_part": {part: round(magnitude[part] / counts[part], 5) for part in counts},
        "greedy_unperturbed": evaluate_greedy(model, tokenizer, problems),
        "greedy_all_parts": {},
        "greedy_by_part": {},
    }
    for delta in args.deltas:
        result["greedy_all_parts"][str(delta)] = perturbed_accuracy(model, tokenizer, problems, delta, None, args.seed)
        print(f"δ={delta}: {result['greedy_all_parts'][str(delta)]:.1%}", file=sys.stderr, flush=True)
    if args.by_part_delta:
        for part in counts:
            result["greedy_by_part"][part] = perturbed_accuracy(model, tokenizer, problems, args.by_part_delta,
                                                                {part}, args.seed)
            print(f"δ={args.by_part_delta} on {part}: {result['greedy_by_part'][part]:.1%}", file=sys.stderr,
                  flush=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    emit(result, "benchmarks/rl_weight_noise.py", args, args.output)
    return result


if __name__ == "__main__":
    main()
