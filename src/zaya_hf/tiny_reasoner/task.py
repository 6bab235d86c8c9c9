"""The synthetic reasoning task of the embedded model: multi-step integer arithmetic with a written-out chain.

A problem is a chain like `7+5-3+8-6`. Its solution thinks step by step, rewriting the remaining expression after
each operation (a scratchpad that a small model can follow by copying), then boxes the answer:

    <think>
    7+5-3+8-6
    =12-3+8-6
    =9+8-6
    =17-6
    =11
    </think>
    \\boxed{11}

Everything is deterministic by seed. A fixed hash of the expression splits problems into a training part and a
held-out part, so no held-out problem is ever trained on, whatever seeds and sizes are used.
"""

import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

THINK_START, THINK_END = "<think>", "</think>"
HELD_OUT_SHARDS = 8  # one expression in 8 is held out


@dataclass(frozen=True)
class TaskSpec:
    """Difficulty of the generated problems: how many operations, which operands, and the range every running
    total stays in (chosen so that each intermediate result has at most two digits)."""

    min_operations: int = 2
    max_operations: int = 5
    max_operand: int = 9
    max_total: int = 30

    def __post_init__(self):
        if not 1 <= self.min_operations <= self.max_operations:
            raise ValueError(f"need 1 <= min_operations <= max_operations, got {self.min_operations}, {self.max_operations}.")
        if not 1 <= self.max_operand <= self.max_total:
            raise ValueError(f"need 1 <= max_operand <= max_total, got {self.max_operand}, {self.max_total}.")


@dataclass(frozen=True)
class ArithmeticProblem:
    """`first op[0] operands[0] op[1] operands[1] ...` evaluated left to right."""

    first: int
    operators: tuple[str, ...]
    operands: tuple[int, ...]

    @property
    def expression(self) -> str:
        return str(self.first) + "".join(f"{op}{value}" for op, value in zip(self.operators, self.operands))

    @property
    def question(self) -> str:
        return f"Compute {self.expression}."

    @property
    def running_totals(self) -> list[int]:
        totals, total = [], self.first
        for op, value in zip(self.operators, self.operands):
            total = total + value if op == "+" else total - value
            totals.append(total)
        return totals

    @property
    def answer(self) -> int:
        return self.running_totals[-1]

    @property
    def is_held_out(self) -> bool:
        return zlib.crc32(self.expression.encode()) % HELD_OUT_SHARDS == 0

    def solution(self) -> str:
        """The reference completion (what the model is trained to write, EOS excluded)."""
        return format_working(self.expression, self.operators, self.operands, self.running_totals)


def format_working(expression: str, operators, operands, totals) -> str:
    """A completion from a (possibly wrong) chain: the expression, then one line per operation holding the
    running total and the operations still to do (`operands` as copied, `totals` as computed)."""
    rest = [f"{op}{value}" for op, value in zip(operators, operands)]
    lines = [expression] + [f"={total}{''.join(rest[i + 1:])}" for i, total in enumerate(totals)]
    return f"{THINK_START}\n" + "\n".join(lines) + f"\n{THINK_END}\n\\boxed{{{totals[-1]}}}"


def flawed_solution(problem: ArithmeticProblem, rng: random.Random) -> str:
    """A plausible wrong completion: one slip, then every later step done correctly from the slip, so the chain
    looks consistent and ends in a wrong answer — the kind of candidate aggregation has to see through.

    Slips: a wrong result of one operation (off by 1, 2 or 10), or an operand miscopied when the rest of the
    expression is rewritten (and used from then on)."""
    operands = list(problem.operands)
    step = rng.randrange(len(operands))
    slip = 0
    if rng.random() < 0.5 and step + 1 < len(operands):
        index = rng.randrange(step + 1, len(operands))
        operands[index] = rng.choice([v for v in range(1, 10) if v != operands[index]])
    else:
        slip = rng.choice([-10, -2, -1, 1, 2, 10])
    totals, total = [], problem.first
    for i, (op, value) in enumerate(zip(problem.operators, operands)):
        total = (total + value if op == "+" else total - value) + (slip if i == step else 0)
        totals.append(total)
    if totals[-1] == problem.answer:  # the slip cancelled out: the last step goes wrong instead
        totals[-1] += rng.choice([-1, 1])
    return format_working(problem.expression, problem.operators, operands, totals)


def sample_problem(rng: random.Random, spec: TaskSpec) -> ArithmeticProblem:
    num_operations = rng.randint(spec.min_operations, spec.max_operations)
    total = first = rng.randint(1, spec.max_total)
    operators, operands = [], []
    for _ in range(num_operations):
        value = rng.randint(1, spec.max_operand)
        can_add, can_subtract = total + value <= spec.max_total, total - value >= 0
        op = rng.choice("+-") if can_add and can_subtract else ("+" if can_add else "-")
        total = total + value if op == "+" else total - value
        operators.append(op)
        operands.append(value)
    return ArithmeticProblem(first, tuple(operators), tuple(operands))


def iter_problems(seed: int, split: str = "train", spec: TaskSpec = TaskSpec()) -> Iterator[ArithmeticProblem]:
    """An endless, seeded stream of problems of one split ("train" or "held_out")."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}.")
    rng = random.Random(seed)
    while True:
        problem = sample_problem(rng, spec)
        if problem.is_held_out == (split == "held_out"):
            yield problem


def held_out_problems(count: int, seed: int = 1234, spec: TaskSpec = TaskSpec()) -> list[ArithmeticProblem]:
    """`count` distinct held-out problems (never generated for training), the same for the same seed."""
    problems, seen = [], set()
    for problem in iter_problems(seed, "held_out", spec):
        if problem.expression not in seen:
            seen.add(problem.expression)
            problems.append(problem)
        if len(problems) == count:
            return problems
    raise AssertionError("unreachable: the stream is endless")


def chance_accuracy(spec: TaskSpec = TaskSpec()) -> float:
    """Accuracy of guessing uniformly among the possible answers (every answer lies in 0..max_total)."""
    return 1.0 / (spec.max_total + 1)


__all__ = [
    "ArithmeticProblem",
    "TaskSpec",
    "chance_accuracy",
    "flawed_solution",
    "held_out_problems",
    "iter_problems",
]
