"""Measuring the model on held-out problems: one rollout against Markovian RSA, with the tokens each spends.

Single-rollout accuracy is estimated from round 0 of Markovian RSA itself (N independent rollouts per problem,
same sampling): its mean correctness is the expected accuracy of one rollout, and the tokens of one rollout are
its cost. Markovian RSA's accuracy is the majority vote over the final population (`selection="majority"`);
the mean correctness of that population is reported too.
"""

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from ..generation_zaya import (
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
from .task import ArithmeticProblem


def evaluate_greedy(model, tokenizer, problems: Sequence[ArithmeticProblem], max_new_tokens: int = 128) -> float:
    """Fraction of `problems` whose greedy completion boxes the right answer (one left-padded batch)."""
    engine = LocalGenerationEngine(model, tokenizer)
    prompts = [encode_chat(tokenizer, question_messages(p.question)) for p in problems]
    batch = engine.generate(prompts, max_new_tokens=max_new_tokens, sampling={"do_sample": False}, seed=None)
    return sum(
        answers_match(extract_boxed_answer(c.text), str(p.answer)) for c, p in zip(batch.completions, problems)
    ) / len(problems)


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

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class _TimedEngine:
    """Wraps a rollout engine and adds up the seconds spent in each round (one `generate` call per round)."""

    def __init__(self, engine):
        self.engine = engine
        self.round_seconds: list[float] = []

    def generate(self, prompts, **kwargs):
        start = time.perf_counter()
        batch = self.engine.generate(prompts, **kwargs)
        self.round_seconds.append(time.perf_counter() - start)
        return batch


def compare_single_and_rsa(
    model,
    tokenizer,
    problems: Sequence[ArithmeticProblem],
    config: MarkovianRSAConfig,
    on_problem: Callable[[int], None] | None = None,
) -> Comparison:
    """Run Markovian RSA with `config` on every problem and read both methods off the run (see module doc)."""
    engine = _TimedEngine(LocalGenerationEngine(model, tokenizer))
    start = time.perf_counter()
    per_round: list[list[tuple[int, float, bool]]] = [[] for _ in range(config.rounds + 1)]
    single_tokens = single_seconds = 0.0
    for index, problem in enumerate(problems):
        seeded = config if config.seed is None else replace(config, seed=config.seed + 1000 * index)
        result = run_markovian_rsa(engine, problem.question, tokenizer, seeded, progress=False)
        reference = str(problem.answer)
        for record in result.rounds:
            answers = [extract_boxed_answer(text) for text in record.completions]
            correct = answers_match(majority_vote(answers), reference)
            per_round[record.index].append((record.generated_tokens, mean_accuracy(answers, reference), correct))
        single_tokens += result.rounds[0].generated_tokens / len(result.rounds[0].completions)
        single_seconds += engine.round_seconds[-len(result.rounds)] / len(result.rounds[0].completions)
        if on_problem is not None:
            on_problem(index + 1)
    seconds = time.perf_counter() - start

    count = len(problems)
    points, spent = [], 0.0
    for t, rows in enumerate(per_round):
        spent += sum(r[0] for r in rows) / count
        points.append(RoundPoint(t, spent, sum(r[1] for r in rows) / count, sum(r[2] for r in rows) / count))
    return Comparison(
        num_problems=count,
        single_accuracy=points[0].mean_accuracy,
        single_tokens=single_tokens / count,
        rsa_accuracy=points[-1].majority_accuracy,
        rsa_mean_accuracy=points[-1].mean_accuracy,
        rsa_tokens=points[-1].tokens_per_problem,
        seconds=seconds,
        single_seconds=single_seconds,
        rounds=points,
    )


__all__ = ["Comparison", "RoundPoint", "compare_single_and_rsa", "evaluate_greedy"]
