"""GRPO for ZAYA with TRL's `GRPOTrainer`: verifiable `\\boxed{}` rewards, difficulty that follows the pass rate,
and Markovian RSA aggregation prompts built from the policy's own rollouts.

TRL does the RL (rollouts with the model's `generate()`, so with left-padded prompts and a `ZayaCache`; group
advantages; the clipped policy loss). This module adds what the ZAYA1-8B recipe needs on top, for any task whose
answers are checked by `generation_zaya.answers_match` on the last `\\boxed{}`:

* `BoxedAnswerReward`: the reward function (1 for the right boxed answer, else 0). It also feeds the two pieces below,
  since it is the one place where TRL hands over every rollout with its problem.
* `AdaptiveDifficulty`: the range of difficulty levels problems are drawn from; the top of the range moves up once the
  problems at the top are mostly solved (as RLVE's adaptive environments do).
* `RolloutPool`: the recent rollouts of plain problems, from which aggregation prompts are built with Markovian RSA's
  own template and tail extraction (C tails of τ tokens), so that RL trains exactly what inference asks for.
* `RLPromptStream` / `rl_dataset`: the endless prompt stream `GRPOTrainer` reads, in runs of one kind per step.

Run `BiasBalancingCallback` with the trainer to keep the routers balanced during RL: `GRPOTrainer` is a `Trainer`, and
its rollouts run in training mode, so the balancer sees the routing of the generated tokens as well as of the loss
forward. Starting from a trained model, use a small integral gain (the tiny reasoner's RL stage uses `ki=0.05`):
re-balancing a trained model's routers at full gain re-routes its tokens faster than RL can follow.
"""

import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..generation_zaya import aggregation_messages, answers_match, candidate_tail, extract_boxed_answer

try:
    import datasets
except ImportError as error:  # datasets comes with trl
    raise ImportError("zaya_hf.training.grpo needs TRL and datasets: pip install 'zaya-hf[trl]'.") from error

SOLVE, AGGREGATE = "solve", "aggregate"


def completion_text(completion: str | Sequence[dict]) -> str:
    """The text of a TRL completion: a string (standard prompts) or `[{"role": "assistant", "content": ...}]`."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion if message.get("role") == "assistant")


class AdaptiveDifficulty:
    """Problems are drawn with a level uniform in [`low`, `high`]; when the last `min_attempts` rollouts of level
    `high` solved at least a fraction `threshold`, `high` moves up one level (up to `max_level`) and counting starts
    afresh. The policy keeps seeing problems at the edge of what it solves, instead of a fixed mix that it either
    masters (no learning signal: every rollout right) or cannot start on."""

    def __init__(self, low: int, high: int, max_level: int, threshold: float = 0.75, min_attempts: int = 64):
        if not low <= high <= max_level:
            raise ValueError(f"need low <= high <= max_level, got {low}, {high}, {max_level}.")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}.")
        if min_attempts < 1:
            raise ValueError(f"min_attempts must be at least 1, got {min_attempts}.")
        self.low, self.high, self.max_level = low, high, max_level
        self.threshold, self.min_attempts = threshold, min_attempts
        self.recent: deque[bool] = deque(maxlen=min_attempts)  # outcomes of the latest rollouts at level `high`
        self.num_records = 0
        self.raised_at: list[tuple[int, int]] = []  # (rollouts recorded so far, new high) at each raise

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def record(self, level: int, solved: bool) -> None:
        """One rollout of a problem of `level` was (not) solved."""
        self.num_records += 1
        if level != self.high or self.high == self.max_level:
            return
        self.recent.append(bool(solved))
        if len(self.recent) == self.min_attempts and sum(self.recent) >= self.threshold * self.min_attempts:
            self.high += 1
            self.recent.clear()
            self.raised_at.append((self.num_records, self.high))

    def state(self) -> dict:
        return {"low": self.low, "high": self.high, "max_level": self.max_level, "raised_at": self.raised_at}


@dataclass
class RolloutGroup:
    """The policy's rollouts of one plain problem."""

    question: str
    answer: str
    level: int
    texts: list[str]


class RolloutPool:
    """The latest `capacity` groups of rollouts of plain problems; aggregation prompts draw their candidates here.

    `aggregation_prompt` is what a round of Markovian RSA asks: `subset_size` (C) of the group's rollouts, drawn
    uniformly without replacement, each cut to the last `tail_tokens` (τ) tokens of its reasoning by
    `candidate_tail`, in the package's aggregation template."""

    def __init__(self, tokenizer, subset_size: int = 4, tail_tokens: int = 48, capacity: int = 64):
        if subset_size < 1 or tail_tokens < 1 or capacity < 1:
            raise ValueError(
                f"subset_size, tail_tokens and capacity must be positive, got {subset_size}, {tail_tokens}, {capacity}."
            )
        self.tokenizer, self.subset_size, self.tail_tokens = tokenizer, subset_size, tail_tokens
        self.groups: deque[RolloutGroup] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, group: RolloutGroup) -> None:
        if len(group.texts) < self.subset_size:
            raise ValueError(
                f"a group needs at least subset_size={self.subset_size} rollouts to aggregate, got {len(group.texts)}: "
                "use num_generations >= subset_size."
            )
        self.groups.append(group)

    def draw(self, count: int, rng: random.Random) -> list[RolloutGroup]:
        """`count` groups, distinct while the pool holds enough."""
        pool = list(self.groups)
        if count <= len(pool):
            return rng.sample(pool, count)
        return [rng.choice(pool) for _ in range(count)]

    def aggregation_prompt(self, group: RolloutGroup, rng: random.Random) -> list[dict]:
        tails = [
            candidate_tail(text, self.tail_tokens, "tokens", self.tokenizer)
            for text in rng.sample(group.texts, self.subset_size)
        ]
        return aggregation_messages(None, group.question, tails)


class BoxedAnswerReward:
    """Reward 1.0 when the completion's last `\\boxed{}` (after `</think>`) matches the row's `answer`, else 0.0.

    For the rows of plain problems (`kind` "solve") it also records each rollout's outcome in `difficulty` and the
    problem's group of rollouts in `pool`, and logs the accuracy of each kind of prompt and the top difficulty level
    through TRL's `log_metric`."""

    __name__ = "boxed_answer"  # the name TRL logs the reward under

    def __init__(self, difficulty: AdaptiveDifficulty | None = None, pool: RolloutPool | None = None):
        self.difficulty, self.pool = difficulty, pool

    def __call__(
        self,
        prompts: list,
        completions: list,
        answer: list[str],
        kind: list[str] | None = None,
        level: list[int] | None = None,
        question: list[str] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        texts = [completion_text(c) for c in completions]
        rewards = [float(answers_match(extract_boxed_answer(t), str(a))) for t, a in zip(texts, answer)]
        kind = kind or [SOLVE] * len(texts)
        solve_rows = [i for i, k in enumerate(kind) if k == SOLVE]
        if self.difficulty is not None and level is not None:
            for i in solve_rows:
                self.difficulty.record(level[i], rewards[i] > 0)
        if self.pool is not None and solve_rows:
            if question is None or level is None:
                raise ValueError("BoxedAnswerReward with a pool needs the dataset columns `question` and `level`.")
            groups: dict[str, RolloutGroup] = {}  # a problem's G rollouts, in order
            for i in solve_rows:
                groups.setdefault(question[i], RolloutGroup(question[i], str(answer[i]), level[i], [])).texts.append(
                    texts[i]
                )
            for group in groups.values():
                self.pool.add(group)
        if log_metric is not None:
            for name in (SOLVE, AGGREGATE):
                scores = [r for r, k in zip(rewards, kind) if k == name]
                if scores:
                    log_metric(f"accuracy/{name}", sum(scores) / len(scores))
            if self.difficulty is not None:
                log_metric("difficulty/high", float(self.difficulty.high))
        return rewards


class RLPromptStream:
    """An endless, seeded stream of RL prompts in runs of `prompts_per_step` (one optimizer step's prompts), each run
    of one kind so that a step's prompts have similar lengths and little padding:

    * solve: a problem from `sample_problem(level, rng) -> (question, answer)` at a level drawn by `difficulty`;
    * aggregate (a fraction `aggregation_fraction` of the runs, once `pool` holds rollouts): an aggregation prompt over
      C of the policy's own earlier rollouts of a problem, whose answer it keeps.

    Rows: `prompt` (chat messages), `question`, `answer`, `level`, `kind` (the reward reads the last four).
    `GRPOTrainer` reads one step ahead, so an aggregation run uses the rollouts of the steps before the previous one.
    """

    def __init__(
        self,
        sample_problem: Callable[[int, random.Random], tuple[str, str]],
        difficulty: AdaptiveDifficulty,
        prompts_per_step: int,
        seed: int,
        pool: RolloutPool | None = None,
        aggregation_fraction: float = 0.0,
    ):
        if not 0.0 <= aggregation_fraction <= 1.0:
            raise ValueError(f"aggregation_fraction must be in [0, 1], got {aggregation_fraction}.")
        if aggregation_fraction > 0 and pool is None:
            raise ValueError("aggregation_fraction > 0 needs a RolloutPool to draw the candidates from.")
        self.sample_problem, self.difficulty, self.pool = sample_problem, difficulty, pool
        self.prompts_per_step, self.seed, self.aggregation_fraction = prompts_per_step, seed, aggregation_fraction

    def __call__(self) -> Iterator[dict]:
        rng = random.Random(self.seed)
        while True:
            aggregate = rng.random() < self.aggregation_fraction
            if aggregate and self.pool:
                for group in self.pool.draw(self.prompts_per_step, rng):
                    prompt = self.pool.aggregation_prompt(group, rng)
                    yield self._row(prompt, group.question, group.answer, group.level, AGGREGATE)
            else:
                for _ in range(self.prompts_per_step):
                    level = self.difficulty.sample(rng)
                    question, answer = self.sample_problem(level, rng)
                    yield self._row([{"role": "user", "content": question}], question, answer, level, SOLVE)

    @staticmethod
    def _row(prompt: list[dict], question: str, answer: str, level: int, kind: str) -> dict:
        return {"prompt": prompt, "question": question, "answer": str(answer), "level": level, "kind": kind}


def rl_dataset(stream: RLPromptStream) -> "datasets.IterableDataset":
    """The stream as the `IterableDataset` `GRPOTrainer` takes. Train with `shuffle_dataset=False`: TRL's shuffle
    buffer would read a thousand prompts ahead, built from a stale difficulty and pool."""
    features = datasets.Features(
        {
            "prompt": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "level": datasets.Value("int64"),
            "kind": datasets.Value("string"),
        }
    )
    return datasets.IterableDataset.from_generator(stream, features=features)


__all__ = [
    "AdaptiveDifficulty",
    "BoxedAnswerReward",
    "RLPromptStream",
    "RolloutGroup",
    "RolloutPool",
    "completion_text",
    "rl_dataset",
]
