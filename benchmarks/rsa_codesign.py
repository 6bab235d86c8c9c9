"""The co-design experiment: does training for aggregation make Markovian RSA gain more?

For each model (e.g. one trained with aggregation prompts in SFT and RL, and a control trained on plain problems
only with the same budget: `examples/train_tiny_reasoner.py --aggregation-fraction 0 --rl-aggregation-fraction 0`),
on the same held-out problems with the same seeds, through the evaluation harness of `zaya-hf eval`
(`zaya_hf.serving.evaluation`, method "rsa", the demo's settings T=2 N=16 C=4):

* greedy: one greedy completion per problem;
* single rollout: the mean correctness of the N round-0 rollouts (temperature 1.0): one sampled rollout's accuracy;
* round-0 majority: the majority vote over those N rollouts (voting without any aggregation);
* Markovian RSA: the majority vote over the final population after T aggregation rounds;
* the RSA gain (RSA minus single rollout, per problem) and, for the first two models, the difference of their gains;
* the aggregations' accuracy by how many of the C candidates they read were right (an aggregator that only
  re-solves the problem is as accurate whatever it reads).

95% intervals: the harness's (Wilson's for successes, the normal approximation for mean accuracies); for gains and
their difference, the normal approximation of the mean of the per-problem differences (paired: the same problems).
Results are appended per problem to `--results-dir/LABEL.results.jsonl`, so a run with more `--problems` resumes
after the problems already done.

    python benchmarks/rsa_codesign.py --model co-trained=runs/co-trained --model control=runs/control \\
        --problems 256 --out benchmarks/results/rsa_codesign.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from zaya_hf.generation_zaya import LocalGenerationEngine, MarkovianRSAConfig
from zaya_hf.serving.evaluation import ResultsFile, evaluate, interval_95, settings_of, summarize
from zaya_hf.tiny_reasoner import DEMO_RSA_SETTINGS
from zaya_hf.tiny_reasoner.evaluation import evaluate_greedy, held_out_problem_set
from zaya_hf.tiny_reasoner.task import held_out_problems


def difference_interval_95(differences: list[float]) -> tuple[float, float]:
    """95% interval of the mean of per-problem differences in [-1, 1]: the harness's normal approximation on
    (d + 1) / 2, which lies in [0, 1], mapped back."""
    low, high = interval_95([(d + 1) / 2 for d in differences], binary=False)
    return 2 * low - 1, 2 * high - 1


def per_problem_gains(records: list[dict]) -> list[float]:
    """Final majority correctness minus the round-0 mean correctness, per problem."""
    return [float(r["rounds"][-1]["majority_correct"]) - sum(r["rounds"][0]["correct"]) / len(r["rounds"][0]["correct"])
            for r in records]


def evaluate_model(label: str, path: str, problem_seed: int, count: int, config: MarkovianRSAConfig,
                   results_dir: Path) -> dict:
    problems = held_out_problem_set(count, seed=problem_seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    results = ResultsFile(results_dir / f"{label}.results.jsonl", settings_of("rsa", config, f"local:{path}"))
    start = time.perf_counter()
    done = [0]

    def progress(_record):
        done[0] += 1
        if done[0] % 16 == 0:
            print(f"  {label}: {done[0]} new problems done", file=sys.stderr, flush=True)

    with torch.no_grad():
        records, resumed = evaluate(LocalGenerationEngine(model, tokenizer), tokenizer, problems, config, results,
                                    on_problem=progress)
        greedy = evaluate_greedy(model, tokenizer, held_out_problems(count, seed=problem_seed))
    summary = summarize(records)
    gains = per_problem_gains(records)
    successes = [1.0] * round(greedy * count) + [0.0] * (count - round(greedy * count))
    first, last = summary["rounds"][0], summary["rounds"][-1]
    return {
        "path": path,
        "seconds_this_run": round(time.perf_counter() - start, 1),
        "problems_resumed": resumed,
        "greedy": (greedy, *interval_95(successes, binary=True)),
        "single": (first["mean_accuracy"], *first["mean_accuracy_ci95"]),
        "round0_majority": (first["majority_accuracy"], *first["majority_accuracy_ci95"]),
        "rsa": (last["majority_accuracy"], *last["majority_accuracy_ci95"]),
        "rsa_population_mean": (last["mean_accuracy"], *last["mean_accuracy_ci95"]),
        "rsa_gain": (sum(gains) / count, *difference_interval_95(gains)),
        "tokens_per_problem": summary["tokens_per_problem"],
        "aggregation_by_right_candidates": summary["aggregation_by_right_candidates"],
        "rounds": summary["rounds"],
        "gains": gains,
    }


NAMES = {"greedy": "greedy", "single": "single rollout", "round0_majority": "round-0 majority (no aggregation)",
         "rsa": "Markovian RSA (majority of the final population)", "rsa_population_mean": "  its population mean",
         "rsa_gain": "RSA gain over single rollout"}


def format_table(header: str, models: dict, comparison: dict | None) -> str:
    lines = [header, ""]
    for label, entry in models.items():
        lines.append(f"{label}  ({entry['path']})")
        for key, name in NAMES.items():
            mean, low, high = entry[key]
            signed = "+" if key == "rsa_gain" else ""
            lines.append(f"  {name:<50} {mean:{signed}7.1%}  [{low:{signed}7.1%}, {high:{signed}7.1%}]")
        lines.append(f"  {'decode tokens per problem (all rounds)':<50} {entry['tokens_per_problem']:7.1f}")
        by_right = entry["aggregation_by_right_candidates"]
        if by_right:
            lines.append("  aggregations by right candidates read: " + ", ".join(
                f"{k}: {row['accuracy']:.1%} of {row['aggregations']}" for k, row in by_right.items()))
    if comparison is not None:
        mean, low, high = comparison["gain_difference"]
        lines.append(f"RSA gain of {comparison['first']} minus that of {comparison['second']} (paired): "
                     f"{mean:+.1%}  [{low:+.1%}, {high:+.1%}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="LABEL=PATH",
                        help="a model to evaluate (repeat; the first two are compared)")
    parser.add_argument("--problems", type=int, default=256)
    parser.add_argument("--problem-seed", type=int, default=1234)
    parser.add_argument("--seed", type=int, default=0, help="Markovian RSA seed (sampling and subsets)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results-dir", type=Path, default=Path("benchmarks/results/rsa_codesign"),
                        help="per-problem results, one JSONL per model (resumed)")
    parser.add_argument("--out", type=Path, help="summary JSON to write (a .txt with the table goes next to it)")
    args = parser.parse_args(argv)
    models = []
    for spec in args.model:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            parser.error(f"--model {spec!r}: expected LABEL=PATH.")
        if not Path(path).is_dir():
            parser.error(f"--model {spec!r}: {path} is no folder.")
        models.append((label, path))
    if len({label for label, _ in models}) != len(models):
        parser.error("--model labels must differ.")
    if args.problems < 2:
        parser.error(f"--problems must be at least 2, got {args.problems}.")
    torch.set_num_threads(args.threads)
    config = MarkovianRSAConfig(**DEMO_RSA_SETTINGS, seed=args.seed)

    results = {}
    for label, path in models:
        print(f"{label}: {path}", file=sys.stderr, flush=True)
        results[label] = evaluate_model(label, path, args.problem_seed, args.problems, config,
                                        args.results_dir)
    comparison = None
    if len(models) >= 2:
        (first, _), (second, _) = models[:2]
        difference = [a - b for a, b in zip(results[first]["gains"], results[second]["gains"])]
        comparison = {"first": first, "second": second,
                      "gain_difference": (sum(difference) / len(difference), *difference_interval_95(difference))}

    header = (f"{args.problems} held-out problems (seed {args.problem_seed}); Markovian RSA T={config.rounds} "
              f"N={config.population} C={config.subset_size} β={config.rollout_tokens} τ={config.tail_tokens}, "
              f"temperature 1.0, seed {config.seed}, {args.threads} thread(s); 95% intervals (see the script)")
    table = format_table(header, results, comparison)
    print(table)
    command = "python benchmarks/rsa_codesign.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {
        "command": command,
        "settings": {**DEMO_RSA_SETTINGS, "seed": args.seed, "problems": args.problems,
                     "problem_seed": args.problem_seed, "threads": args.threads},
        "models": {label: {k: v for k, v in entry.items() if k != "gains"} for label, entry in results.items()},
        "comparison": comparison,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        args.out.with_suffix(".txt").write_text(f"$ {command}\n\n{table}\n")
    return record


if __name__ == "__main__":
    main()
