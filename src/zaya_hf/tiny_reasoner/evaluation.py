"""Measuring the model on held-out problems: one rollout against Markovian RSA, with the tokens each spends, through
the evaluation harness of `zaya-hf eval` (`zaya_hf.serving.evaluation`); and the held-out set as a problem file.

Single-rollout accuracy is estimated from round 0 of Markovian RSA itself (N independent rollouts per problem,
same sampling): its mean correctness is the expected accuracy of one rollout, and the tokens of one rollout are
its cost. Markovian RSA's accuracy is the majority vote over the final population (`selection="majority"`);
the mean correctness of that population is reported too.
"""

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..generation_zaya import (
    LocalGenerationEngine,
    MarkovianRSAConfig,
    answers_match,
    encode_chat,
    extract_boxed_answer,
    question_messages,
)
from ..serving.evaluation import Problem, evaluate, summarize, write_problems
from . import DEMO_RSA_SETTINGS
from .task import ArithmeticProblem, held_out_problems


def held_out_problem_set(count: int, seed: int = 1234) -> list[Problem]:
    """The held-out problems of the demo as harness problems (id `held-out-SEED-i`, reference answer)."""
    return [Problem(f"held-out-{seed}-{i}", p.question, str(p.answer))
            for i, p in enumerate(held_out_problems(count, seed=seed))]


def export_problem_set(path: str | os.PathLike, count: int, seed: int = 1234) -> list[Problem]:
    """Write the held-out problems as a `zaya-hf eval` problem file (JSONL)."""
    problems = held_out_problem_set(count, seed)
    write_problems(path, problems)
    return problems


def evaluate_greedy(model, tokenizer, problems: Sequence[ArithmeticProblem], max_new_tokens: int = 128) -> float:
    """Fraction of `problems` whose greedy completion boxes the right answer (one left-padded batch)."""
    return _fraction_correct(model, tokenizer, problems, 1, max_new_tokens, {"do_sample": False}, seed=None)


def evaluate_sampled(
    model,
    tokenizer,
    problems: Sequence[ArithmeticProblem],
    samples: int,
    max_new_tokens: int = DEMO_RSA_SETTINGS["rollout_tokens"],
    temperature: float = 1.0,
    seed: int = 0,
) -> float:
    """Mean correctness of `samples` sampled completions per problem (temperature `temperature`, no other filter,
    Markovian RSA's rollout budget): the expected accuracy of one rollout, which is what RL's reward measures on
    the training stream, here on held-out problems. Greedy accuracy can stay put while this moves."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}.")
    sampling = {"do_sample": True, "temperature": temperature}
    return _fraction_correct(model, tokenizer, problems, samples, max_new_tokens, sampling, seed)


def _fraction_correct(model, tokenizer, problems, repeats: int, max_new_tokens: int, sampling: dict, seed) -> float:
    engine = LocalGenerationEngine(model, tokenizer)
    rows = [(p, encode_chat(tokenizer, question_messages(p.question))) for p in problems for _ in range(repeats)]
    batch = engine.generate([prompt for _, prompt in rows], max_new_tokens=max_new_tokens, sampling=sampling,
                            seed=seed)
    return sum(
        answers_match(extract_boxed_answer(c.text), str(p.answer)) for c, (p, _) in zip(batch.completions, rows)
    ) / len(rows)


@dataclass
class RoundPoint:
    """Accuracy reached after round t and the decode tokens spent per problem up to then."""

    round: int
    tokens_per_problem: float
    mean_accuracy: float
    majority_accuracy: float


@dataclass
class Comparison:
    """Single rollout against Markovian RSA on the same problems, with the same sampling."""

    num_problems: int
    single_accuracy: float
    single_tokens: float  # decode tokens of one rollout, per problem
    rsa_accuracy: float  # majority vote over the final population
    rsa_mean_accuracy: float  # mean correctness of the final population
    rsa_tokens: float  # decode tokens of the whole run, per problem
    seconds: float  # the whole Markovian RSA run
    single_seconds: float  # round 0's time divided by N: one rollout's share of the batched round
    rounds: list[RoundPoint] = field(default_factory=list)
    summary: dict = field(default_factory=dict, repr=False)  # the harness's summary (intervals, pass@N), for plots

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "summary"}


def compare_single_and_rsa(
    model,
    tokenizer,
    problems: Sequence[Problem],
    config: MarkovianRSAConfig,
    on_problem: Callable[[int], None] | None = None,
) -> Comparison:
    """Run Markovian RSA with `config` on every problem (the harness, method "rsa") and read both methods off the
    run (see module doc)."""
    start = time.perf_counter()
    records, _ = evaluate(LocalGenerationEngine(model, tokenizer), tokenizer, problems, config,
                          on_problem=None if on_problem is None else lambda _: on_problem(1))
    seconds = time.perf_counter() - start
    summary = summarize(records)
    points = [RoundPoint(r["round"], r["tokens_per_problem"], r["mean_accuracy"], r["majority_accuracy"])
              for r in summary["rounds"]]
    return Comparison(
        num_problems=summary["problems"],
        single_accuracy=summary["single_rollout"]["accuracy"],
        single_tokens=summary["single_rollout"]["tokens"],
        rsa_accuracy=points[-1].majority_accuracy,
        rsa_mean_accuracy=points[-1].mean_accuracy,
        rsa_tokens=points[-1].tokens_per_problem,
        seconds=seconds,
        single_seconds=summary["single_rollout"]["seconds"],
        rounds=points,
        summary=summary,
    )


__all__ = ["Comparison", "RoundPoint", "compare_single_and_rsa", "evaluate_greedy", "evaluate_sampled",
           "export_problem_set", "held_out_problem_set"]
