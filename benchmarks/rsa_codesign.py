"""The co-design experiment: does training for aggregation make Markovian RSA gain more?

For each model (e.g. the embedded model, trained with aggregation prompts in SFT and RL, and a control trained on
plain problems only with the same budget), on the same held-out problems and with the same seeds:

* greedy: one greedy completion per problem;
* single rollout: the mean correctness of Markovian RSA's N round-0 rollouts (temperature 1.0), i.e. the expected
  accuracy of one sampled rollout;
* round-0 majority: the majority vote over those N rollouts (what voting gives without any aggregation);
* Markovian RSA: the majority vote over the final population after T aggregation rounds.

95% confidence intervals come from a paired bootstrap over problems (the problem is the unit: the N rollouts of one
problem are not independent draws of the accuracy), for every accuracy, for each model's RSA gain over its single
rollout and for the difference between the two models' gains.

    python benchmarks/rsa_codesign.py --model co-trained=src/zaya_hf/default_model --model control=runs/control \\
        --problems 256 --out benchmarks/results/rsa_codesign.json

Progress goes to stderr; the summary table to stdout and, with --out, everything (per-problem records included) to
a JSON file next to a .txt copy of the table.
"""

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from zaya_hf.generation_zaya import (
    LocalGenerationEngine,
    MarkovianRSAConfig,
    answers_match,
    encode_chat,
    extract_boxed_answer,
    majority_vote,
    mean_accuracy,
    question_messages,
    run_markovian_rsa,
)
from zaya_hf.tiny_reasoner import DEMO_RSA_SETTINGS
from zaya_hf.tiny_reasoner.task import held_out_problems

BOOTSTRAP_SAMPLES = 10_000


def per_problem_results(model, tokenizer, problems, config: MarkovianRSAConfig) -> list[dict]:
    """Round-0 mean correctness and majority, and the final majority, of one Markovian RSA run per problem (the seed
    of problem i is `config.seed + 1000 * i`, as in `zaya-hf demo`)."""
    engine = LocalGenerationEngine(model, tokenizer)
    rows = []
    for index, problem in enumerate(problems):
        seeded = dataclasses.replace(config, seed=config.seed + 1000 * index)
        result = run_markovian_rsa(engine, problem.question, tokenizer, seeded, progress=False)
        reference = str(problem.answer)
        first = [extract_boxed_answer(text) for text in result.rounds[0].completions]
        rows.append({
            "question": problem.question,
            "answer": problem.answer,
            "single": mean_accuracy(first, reference),
            "round0_majority": float(answers_match(majority_vote(first), reference)),
            "rsa": float(result.majority_correct(reference)),
            "rsa_population_mean": result.mean_accuracy(reference),
            "tokens": result.generated_tokens,
        })
        if (index + 1) % 16 == 0:
            print(f"  {index + 1}/{len(problems)} problems", file=sys.stderr, flush=True)
    return rows


def bootstrap(values_per_problem: list[float], rng: random.Random) -> tuple[float, float, float]:
    """(mean, 2.5th percentile, 97.5th percentile) of the mean over problems, resampling problems."""
    count = len(values_per_problem)
    values = torch.tensor(values_per_problem, dtype=torch.float64)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    picks = torch.randint(count, (BOOTSTRAP_SAMPLES, count), generator=generator)
    means = values[picks].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return values.mean().item(), low, high


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="LABEL=PATH",
                        help="a model to evaluate (repeat; the first two are compared)")
    parser.add_argument("--problems", type=int, default=256)
    parser.add_argument("--problem-seed", type=int, default=1234)
    parser.add_argument("--seed", type=int, default=0, help="Markovian RSA seed (sampling and subsets)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="JSON file to write (a .txt with the table goes next to it)")
    args = parser.parse_args(argv)
    models = []
    for spec in args.model:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            parser.error(f"--model {spec!r}: expected LABEL=PATH.")
        models.append((label, path))
    torch.set_num_threads(args.threads)
    config = MarkovianRSAConfig(**DEMO_RSA_SETTINGS, seed=args.seed)
    problems = held_out_problems(args.problems, seed=args.problem_seed)

    results = {}
    for label, path in models:
        print(f"{label}: {path}", file=sys.stderr, flush=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        start = time.perf_counter()
        with torch.no_grad():
            greedy = [
                float(answers_match(extract_boxed_answer(text), str(p.answer)))
                for text, p in zip(greedy_texts(model, tokenizer, problems), problems)
            ]
            rows = per_problem_results(model, tokenizer, problems, config)
        for row, score in zip(rows, greedy):
            row["greedy"] = score
        results[label] = {"path": path, "seconds": round(time.perf_counter() - start, 1), "problems": rows}

    rng = random.Random(0)
    summary = {}
    for label, result in results.items():
        rows = result["problems"]
        column = {key: [row[key] for row in rows] for key in ("greedy", "single", "round0_majority", "rsa")}
        column["rsa_gain"] = [row["rsa"] - row["single"] for row in rows]
        summary[label] = {key: bootstrap(values, rng) for key, values in column.items()}
    if len(models) >= 2:
        (first, _), (second, _) = models[:2]
        difference = [
            (a["rsa"] - a["single"]) - (b["rsa"] - b["single"])
            for a, b in zip(results[first]["problems"], results[second]["problems"])
        ]
        summary[f"gain difference ({first} - {second})"] = {"rsa_gain": bootstrap(difference, rng)}

    table = format_table(summary, args, config)
    print(table)
    record = {
        "command": "python benchmarks/rsa_codesign.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {**DEMO_RSA_SETTINGS, "seed": args.seed, "problems": args.problems,
                     "problem_seed": args.problem_seed, "threads": args.threads,
                     "bootstrap_samples": BOOTSTRAP_SAMPLES},
        "summary": {label: {key: dict(zip(("mean", "ci_low", "ci_high"), value)) for key, value in entry.items()}
                    for label, entry in summary.items()},
        "models": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        args.out.with_suffix(".txt").write_text(f"$ {record['command']}\n\n{table}\n")
    return record


def greedy_texts(model, tokenizer, problems) -> list[str]:
    """Greedy completions (`evaluate_greedy`'s decoding, kept per problem), in left-padded batches of 64."""
    engine = LocalGenerationEngine(model, tokenizer)
    texts = []
    for start in range(0, len(problems), 64):
        prompts = [encode_chat(tokenizer, question_messages(p.question)) for p in problems[start:start + 64]]
        batch = engine.generate(prompts, max_new_tokens=128, sampling={"do_sample": False}, seed=None)
        texts += [c.text for c in batch.completions]
    return texts


def format_table(summary: dict, args, config: MarkovianRSAConfig) -> str:
    names = {"greedy": "greedy", "single": "single rollout", "round0_majority": "round-0 majority (no aggregation)",
             "rsa": f"Markovian RSA (T={config.rounds}, N={config.population}, C={config.subset_size})",
             "rsa_gain": "RSA gain over single rollout"}
    lines = [f"{args.problems} held-out problems (seed {args.problem_seed}); Markovian RSA T={config.rounds} "
             f"N={config.population} C={config.subset_size} β={config.rollout_tokens} τ={config.tail_tokens}, "
             f"temperature 1.0, seed {config.seed}; 95% intervals: paired bootstrap over problems "
             f"({BOOTSTRAP_SAMPLES} resamples)", ""]
    for label, entry in summary.items():
        lines.append(label)
        for key, (mean, low, high) in entry.items():
            lines.append(f"  {names[key]:<40} {mean:+7.1%}  [{low:+7.1%}, {high:+7.1%}]" if key == "rsa_gain"
                         else f"  {names[key]:<40} {mean:7.1%}  [{low:7.1%}, {high:7.1%}]")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
