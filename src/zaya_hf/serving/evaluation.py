"""The evaluation harness behind `zaya-hf eval` (and `zaya-hf demo`): a problem set with reference answers, any
rollout engine, single rollouts or Markovian RSA, accuracy per round with 95% intervals and the tokens spent.

* Problems: JSONL, one `{"id": ..., "question": ..., "answer": ...}` per line (`id` optional: the line number).
* Methods: "single" is N independent rollouts per problem (round 0 only): its mean correctness is the accuracy of
  one rollout; "rsa" is Markovian RSA, measured after every round. Both report, per round, the mean accuracy of
  the population, the accuracy of its majority vote and pass@N.
* Problem i is run with seed `seed + 1000·i` (the demo's rule), so a resumed run computes what an uninterrupted
  one would. Results are appended to a JSONL file problem by problem (a settings line first); a run that finds
  the file resumes after the problems it holds, and refuses a file written with other settings.
* Intervals (`interval_95`): Wilson's for per-problem successes (majority, pass@N), the normal approximation of the
  mean for per-problem accuracies in [0, 1] (mean accuracy), both clipped to [0, 1].
"""

import itertools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..generation_zaya import (
    MarkovianRSAConfig,
    answers_match,
    extract_boxed_answer,
    majority_vote,
    run_markovian_rsa,
)

METHODS = ("single", "rsa")
Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile
PROBLEM_SEED_STRIDE = 1000  # problem i is seeded with seed + 1000·i


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str


def read_problems(path: str | os.PathLike) -> list[Problem]:
    """The problems of a JSONL file; a bad line raises `ValueError` naming the file and the line."""
    problems, seen = [], set()
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{where}: not JSON ({error}).") from None
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or "answer" not in row:
                raise ValueError(f"{where}: need an object with a string 'question' and an 'answer'.")
            problem = Problem(str(row.get("id", number)), row["question"], str(row["answer"]))
            if problem.id in seen:
                raise ValueError(f"{where}: the id {problem.id!r} appears twice.")
            seen.add(problem.id)
            problems.append(problem)
    if not problems:
        raise ValueError(f"{path} holds no problems.")
    return problems


def write_problems(path: str | os.PathLike, problems: Sequence[Problem]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for problem in problems:
            out.write(json.dumps(asdict(problem)) + "\n")


def method_config(method: str, config: MarkovianRSAConfig) -> MarkovianRSAConfig:
    """The config a method runs: "single" keeps round 0 of N rollouts and a majority over them."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if method == "single":
        return replace(config, rounds=0, selection="majority", final_population=None, final_tokens=None,
                       final_sampling=None)
    return config


def settings_of(method: str, config: MarkovianRSAConfig, engine: str) -> dict:
    """What determines the results: the method, the config and the engine's description."""
    fields = {k: v for k, v in asdict(config).items() if k != "prompt_template"}
    return {"method": method, "config": json.loads(json.dumps(fields)), "engine": engine}


class ResultsFile:
    """Results appended one JSON line per problem after a settings line; read back to resume."""

    def __init__(self, path: str | os.PathLike, settings: dict):
        self.path, self.settings = Path(path), settings
        self.records = self._load()

    def _load(self) -> dict[str, dict]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as out:
                out.write(json.dumps({"settings": self.settings}) + "\n")
            return {}
        raw = self.path.read_bytes()
        if not raw.endswith(b"\n"):  # a line cut by an interruption: dropped, its problem runs again
            raw = raw[: raw.rfind(b"\n") + 1]
            self.path.write_bytes(raw)
        lines = raw.decode("utf-8").splitlines()
        try:
            header, rows = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
        except (ValueError, IndexError):
            raise ValueError(f"{self.path} is not a results file of zaya-hf eval; pass another --output.") from None
        if header.get("settings") != self.settings:
            differing = sorted(k for k in set(self.settings) | set(header.get("settings") or {})
                               if (header.get("settings") or {}).get(k) != self.settings.get(k))
            raise ValueError(f"{self.path} holds results made with other settings ({', '.join(differing)} differ); "
                             "pass another --output, or delete it to start over.")
        return {row["id"]: row for row in rows}

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())
        self.records[record["id"]] = record


class _TimedEngine:
    """Wraps a rollout engine and records the seconds of each round (one `generate` call per round)."""

    def __init__(self, engine):
        self.engine = engine
        self.round_seconds: list[float] = []

    def generate(self, prompts, **kwargs):
        start = time.perf_counter()
        batch = self.engine.generate(prompts, **kwargs)
        self.round_seconds.append(time.perf_counter() - start)
        return batch


def solve(engine, tokenizer, problem: Problem, index: int, config: MarkovianRSAConfig) -> dict:
    """One problem's record: per round the extracted answers, their correctness, the majority and the tokens."""
    seeded = config if config.seed is None else replace(config, seed=config.seed + PROBLEM_SEED_STRIDE * index)
    timed = _TimedEngine(engine)
    result = run_markovian_rsa(timed, problem.question, tokenizer, seeded, progress=False)
    rounds = []
    for record, seconds in zip(result.rounds, timed.round_seconds):
        answers = [extract_boxed_answer(text) for text in record.completions]
        correct = [answers_match(a, problem.answer) for a in answers]
        majority = majority_vote(answers)
        rounds.append({"round": record.index, "subsets": [list(s) for s in record.subsets], "answers": answers,
                       "correct": correct, "majority": majority,
                       "majority_correct": answers_match(majority, problem.answer), "pass": any(correct),
                       "completion_tokens": record.completion_tokens, "generated_tokens": record.generated_tokens,
                       "seconds": seconds})
    return {"id": problem.id, "index": index, "answer": problem.answer, "rounds": rounds,
            "generated_tokens": result.generated_tokens}


def evaluate(
    engine,
    tokenizer,
    problems: Sequence[Problem],
    config: MarkovianRSAConfig,
    results: ResultsFile | None = None,
    on_problem: Callable[[dict], None] | None = None,
) -> tuple[list[dict], int]:
    """Records of every problem, in order, and how many were already in `results` (not recomputed). Each new
    record is appended to `results` as soon as its problem is done, then passed to `on_problem`."""
    done = dict(results.records) if results is not None else {}
    resumed = sum(problem.id in done for problem in problems)
    records = []
    for index, problem in enumerate(problems):
        record = done.get(problem.id)
        if record is None:
            record = solve(engine, tokenizer, problem, index, config)
            if results is not None:
                results.append(record)
            if on_problem is not None:
                on_problem(record)
        records.append(record)
    return records, resumed


def interval_95(values: Sequence[float], binary: bool) -> tuple[float, float]:
    """A 95% interval for the mean of `values`: Wilson's score interval for 0/1 values, else the normal
    approximation (mean ± z·s/√n, sample standard deviation); clipped to [0, 1]."""
    n = len(values)
    if n == 0:
        return (0.0, 1.0)
    mean = sum(values) / n
    if binary:
        denominator = 1 + Z_95**2 / n
        centre = (mean + Z_95**2 / (2 * n)) / denominator
        half = Z_95 * math.sqrt(mean * (1 - mean) / n + Z_95**2 / (4 * n * n)) / denominator
        if mean in (0.0, 1.0):  # the interval reaches the bound exactly (no rounding just short of it)
            return (0.0, centre + half) if mean == 0.0 else (centre - half, 1.0)
    else:
        variance = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
        centre, half = mean, Z_95 * math.sqrt(variance / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def aggregation_by_right_candidates(records: Sequence[dict]) -> dict[int, dict]:
    """Over every aggregation (rounds 1..T) of every problem: how many there were and how often they were right,
    by how many of the C candidates they read were right. An aggregator that only re-solves is as accurate whatever
    it reads; one that uses its candidates climbs with k. Empty for records without subsets (older files)."""
    table: dict[int, list[int]] = {}
    for record in records:
        for previous, current in itertools.pairwise(record["rounds"]):
            for subset, right in zip(current.get("subsets", []), current["correct"]):
                entry = table.setdefault(sum(previous["correct"][j] for j in subset), [0, 0])
                entry[0] += 1
                entry[1] += right
    return {k: {"aggregations": n, "accuracy": right / n} for k, (n, right) in sorted(table.items())}


def summarize(records: Sequence[dict]) -> dict:
    """Per round over the problems: mean accuracy, majority accuracy and pass@N with 95% intervals, the decode
    tokens per problem spent up to that round, and the seconds per problem of the round; plus the single-rollout
    view of round 0 (accuracy, tokens and seconds of one rollout)."""
    count = len(records)
    rounds, spent = [], 0.0
    for t in range(len(records[0]["rounds"])):
        rows = [record["rounds"][t] for record in records]
        mean = [sum(r["correct"]) / len(r["correct"]) for r in rows]
        majority = [float(r["majority_correct"]) for r in rows]
        passed = [float(r["pass"]) for r in rows]
        spent += sum(r["generated_tokens"] for r in rows) / count
        rounds.append({
            "round": t, "tokens_per_problem": spent,
            "mean_accuracy": sum(mean) / count, "mean_accuracy_ci95": interval_95(mean, binary=False),
            "majority_accuracy": sum(majority) / count, "majority_accuracy_ci95": interval_95(majority, binary=True),
            "pass_at_n": sum(passed) / count, "pass_at_n_ci95": interval_95(passed, binary=True),
            "seconds_per_problem": sum(r["seconds"] for r in rows) / count,
        })
    first = [record["rounds"][0] for record in records]
    return {
        "problems": count,
        "rounds": rounds,
        "aggregation_by_right_candidates": aggregation_by_right_candidates(records),
        "tokens_per_problem": spent,
        "single_rollout": {
            "accuracy": rounds[0]["mean_accuracy"],
            "tokens": sum(r["generated_tokens"] / len(r["correct"]) for r in first) / count,
            "seconds": sum(r["seconds"] / len(r["correct"]) for r in first),
        },
    }


def plot_accuracy_against_tokens(summary: dict, path: str | os.PathLike, label: str, title: str) -> bool:
    """Accuracy against decode tokens per problem: the majority vote and population mean after each round (with
    their 95% intervals) and the single-rollout point. Returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rounds = summary["rounds"]
    tokens = [r["tokens_per_problem"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, style, name in (("majority_accuracy", "o-", f"{label}, majority vote"),
                             ("mean_accuracy", "s--", f"{label}, population mean")):
        values = [r[key] for r in rounds]
        low, high = zip(*(r[f"{key}_ci95"] for r in rounds))
        ax.plot(tokens, values, style, label=name)
        ax.fill_between(tokens, low, high, alpha=0.12)
    single = summary["single_rollout"]
    ax.plot([single["tokens"]], [single["accuracy"]], "*", markersize=14, label="single rollout")
    for r, x in zip(rounds, tokens):
        ax.annotate(f"round {r['round']}", (x, r["majority_accuracy"]), textcoords="offset points", xytext=(4, 6),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("decode tokens spent per problem")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


__all__ = ["METHODS", "Problem", "ResultsFile", "evaluate", "interval_95", "method_config", "plot_accuracy_against_tokens",
           "read_problems", "settings_of", "solve", "summarize", "write_problems"]
