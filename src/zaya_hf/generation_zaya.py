# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""Markovian RSA: the test-time-compute method ZAYA1-8B was trained for (MARKOVIAN_RSA.md).

RSA (Recursive Self-Aggregation) keeps a population of N candidate solutions; every round, each new candidate
is written after reading C candidates drawn from the previous round. "Markovian" means that a candidate is seen
only through the last τ tokens of its reasoning, so a prompt never holds more than |q| + C·τ + template tokens
and a rollout never more than β new tokens: memory does not grow with the number of rounds T.

The algorithm (`run_markovian_rsa`) is independent of how tokens are produced: it talks to a `RolloutEngine`.
`LocalGenerationEngine` runs the model's own `generate()`; `zaya_hf.serving.OpenAICompletionsEngine` runs the same
algorithm against an OpenAI-compatible server. `ZayaGenerationMixin.generate_markovian_rsa` is the model method.

This module travels with checkpoints as remote code: relative imports only, optional dependencies guarded.
"""

import copy
import random
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, Union

import torch

from .cache_zaya import ZayaCache

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are optional
    tqdm = None

try:
    import math_verify
except ImportError:  # answer comparison falls back to normalised exact / numeric matching
    math_verify = None


THINK_END = "</think>"
# Rollout sampling of the report (temperature 1.0, top-p 1.0).
DEFAULT_SAMPLING = {"temperature": 1.0, "top_p": 1.0}
# What Zyphra's server samples its single final aggregation with.
FINAL_AGGREGATION_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 40}
SAMPLING_KEYS = frozenset({"do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty"})
SELECTIONS = ("majority", "aggregate")
TAIL_UNITS = ("tokens", "words")

Question = Union[str, Sequence[dict]]
PromptTemplate = Union[str, Callable[[str, Sequence[str]], Union[str, list]]]


# ----------------------------------------------------------------------------------------------------------------
# Text: reasoning / answer split, tails, answers
# ----------------------------------------------------------------------------------------------------------------


def split_reasoning(text: str) -> tuple[str, str | None]:
    """`(reasoning, answer)`: the text before and after the last `</think>`; `answer` is None without one."""
    head, sep, tail = text.rpartition(THINK_END)
    return (head, tail) if sep else (text, None)


def extract_tail(text: str, length: int, unit: str, tokenizer=None) -> str:
    """The last `length` tokens (or whitespace-separated words, re-joined by single spaces) of `text`.

    A token tail is the longest suffix whose decoded text re-encodes to at most `length` tokens: decoding and
    re-encoding is not always the identity (byte-level merges, replacement characters), and the prompt bound
    |q| + C·τ + template must hold for the tokens the next round actually prefills.
    """
    if unit == "words":
        return " ".join(text.split()[-length:])
    if unit != "tokens":
        raise ValueError(f"tail_unit must be one of {TAIL_UNITS}, got {unit!r}.")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= length:
        return text

    def decode_last(count: int) -> str:
        return tokenizer.decode(ids[len(ids) - count :], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def fits(count: int) -> bool:
        return len(tokenizer(decode_last(count), add_special_tokens=False)["input_ids"]) <= length

    if fits(length):  # the usual case: decoding round-trips
        return decode_last(length)
    low, high = 0, length  # fits(low), not fits(high): the longest tail that fits, in O(log τ) encodes
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return decode_last(low)


def candidate_tail(text: str, length: int, unit: str, tokenizer=None, answer_tail: bool = False) -> str:
    """What a candidate contributes to the next round: the tail of its reasoning part (the text before
    `</think>`, or all of it), or with `answer_tail` ("PaCoRe hybrid") its post-`</think>` answer when it has one.
    Both are capped at `length` units so that the prompt bound holds either way."""
    reasoning, answer = split_reasoning(text)
    source = answer.strip() if answer_tail and answer and answer.strip() else reasoning
    return extract_tail(source, length, unit, tokenizer)


_BOXED_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed_answer(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` (brace-matched) after the last `</think>`, else None
    (also for an empty box)."""
    reasoning, answer = split_reasoning(text)
    region = reasoning if answer is None else answer
    for match in reversed(list(_BOXED_OPEN.finditer(region))):
        depth, end = 1, match.end()
        while end < len(region) and depth:
            depth += {"{": 1, "}": -1}.get(region[end], 0)
            end += 1
        if depth == 0:
            return region[match.end() : end - 1].strip() or None  # an empty box is no answer
    return None


_LATEX_NOISE = re.compile(r"\\left|\\right|\\[!,;: ]|\^\{?\\circ\}?|\\%|%|\$|\s")
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")


def normalize_answer(answer: str) -> str:
    """A canonical string for exact comparison: spacing, `\\left`/`\\right`, `$`, degrees, percent and
    `\\text{}` removed, `\\dfrac`/`\\tfrac` -> `\\frac`, thousands separators dropped, numbers canonicalised."""
    text = re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", answer)
    text = _LATEX_NOISE.sub("", text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")).rstrip(".")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d*)?", text):
        text = text.replace(",", "")
    if _NUMBER.fullmatch(text):
        value = float(text)
        text = str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    return text


def answers_match(prediction: str | None, reference: str | None) -> bool:
    """Whether two extracted answers are the same: equal after `normalize_answer`, else (when `math-verify` is
    installed) mathematically equivalent."""
    if prediction is None or reference is None:
        return False
    if normalize_answer(prediction) == normalize_answer(reference):
        return True
    if math_verify is None:
        return False
    # math-verify times out through SIGALRM, which exists only in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = math_verify.parse(f"${reference}$", parsing_timeout=timeout)
        target = math_verify.parse(f"${prediction}$", parsing_timeout=timeout)
        return bool(math_verify.verify(gold, target, timeout_seconds=timeout))
    except Exception:  # math-verify raises on unparsable LaTeX and on timeouts: not a match
        return False


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer (grouped by `answers_match`; None ignored; ties go to the earliest)."""
    groups: list[list] = []  # [representative, count], in order of first appearance
    for answer in answers:
        if answer is None:
            continue
        group = next((g for g in groups if answers_match(answer, g[0])), None)
        if group is None:
            groups.append([answer, 1])
        else:
            group[1] += 1
    return max(groups, key=lambda g: g[1])[0] if groups else None


def mean_accuracy(answers: Sequence[str | None], reference: str) -> float:
    """Fraction of the population whose answer matches `reference` (what the ZAYA1 report evaluates)."""
    return sum(answers_match(a, reference) for a in answers) / len(answers) if answers else 0.0


def pass_at_n(answers: Sequence[str | None], reference: str) -> bool:
    """Whether any answer of the population matches `reference`."""
    return any(answers_match(a, reference) for a in answers)


# ----------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------

AGGREGATION_HEADER = (
    "You are given a math problem and several candidate solutions. Some candidates may be incorrect or contain "
    "errors. Aggregate the useful ideas and produce a single, high-quality solution. Where the candidates "
    "disagree, choose the correct path. If all candidates are incorrect, try a different strategy. Do not "
    "restate the problem or the candidate solutions."
)
REFINEMENT_HEADER = (
    "You are given a math problem and a candidate solution trajectory, which may be incomplete or contain "
    "mistakes. Refine this trajectory: keep its useful progress, fix its errors and produce a single, "
    "high-quality solution. Do not restate the problem or the candidate."
)
PROBLEM_MARKER = "[[ Problem ]]:"
CANDIDATES_MARKER = "[[ Candidate solutions (may contain mistakes) ]]:"
CLOSING_INSTRUCTION = (
    "Now write a single improved solution with clear reasoning, and put your final answer in \\boxed{}."
)
TEMPLATE_FIELDS = ("question", "candidates", "num_candidates")
# A last sentence "Let's think ..." after the problem (a sentence that starts the question is kept).
_THINK_INSTRUCTION = re.compile(r"(?<=\S)\s+let['\u2019]s think\b[^.!?\n]*[.!?]?\s*\Z", re.IGNORECASE)


def question_messages(question: Question) -> list[dict]:
    """The round-0 chat: `question` as one user message, or the given message list (validated)."""
    if isinstance(question, str):
        return [{"role": "user", "content": question}]
    messages = list(question)
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError("question must be a string or a list of chat messages {'role': ..., 'content': ...}.")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("question has no user message.")
    return messages


def question_text(messages: Sequence[dict]) -> str:
    """The problem statement for aggregation prompts: the first user message, without a trailing
    "Let's think ..." instruction."""
    content = next(m["content"] for m in messages if m["role"] == "user")
    if not isinstance(content, str):
        raise ValueError("the first user message must hold plain text to build aggregation prompts from.")
    return _THINK_INSTRUCTION.sub("", content).strip()


def render_candidates(tails: Sequence[str]) -> str:
    """The candidate block: `---- Solution i ----` and the tail for each (`---- Candidate ----` for one)."""
    if len(tails) == 1:
        return f"---- Candidate ----\n{tails[0]}"
    return "\n".join(f"---- Solution {i} ----\n{tail}" for i, tail in enumerate(tails, start=1))


def render_aggregation_prompt(question: str, tails: Sequence[str]) -> str:
    """The package's aggregation prompt, in the structure of the reference server's (MARKOVIAN_RSA.md)."""
    header = REFINEMENT_HEADER if len(tails) == 1 else AGGREGATION_HEADER
    return "\n".join(
        [header, PROBLEM_MARKER, question, CANDIDATES_MARKER, render_candidates(tails), CLOSING_INSTRUCTION]
    )


def aggregation_messages(template: PromptTemplate | None, question: str, tails: Sequence[str]) -> list[dict]:
    """The chat of one aggregation prompt: a single user message (no system prompt) from the default template,
    a format string with fields {question}, {candidates}, {num_candidates}, or a callable
    `(question, tails) -> str | messages`."""
    if template is None:
        content = render_aggregation_prompt(question, tails)
    elif isinstance(template, str):
        try:
            content = template.format(
                question=question, candidates=render_candidates(tails), num_candidates=len(tails)
            )
        except (KeyError, IndexError) as error:
            raise ValueError(
                f"prompt_template uses an unknown field {error}; the fields are {', '.join(TEMPLATE_FIELDS)}."
            ) from None
    elif callable(template):
        content = template(question, list(tails))
        if not isinstance(content, str):
            return question_messages(content)
    else:
        raise TypeError(f"prompt_template must be None, a format string or a callable, got {type(template)}.")
    return [{"role": "user", "content": content}]


def encode_chat(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of `messages` with the chat template applied and the generation prompt appended."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    # The chat template writes the special tokens (BOS) itself.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------------------------------------------
# Configuration and schedule
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundSpec:
    """What one round generates: `num_candidates` rollouts of at most `max_new_tokens` tokens each."""

    index: int
    num_candidates: int
    max_new_tokens: int
    sampling: dict


@dataclass
class MarkovianRSAConfig:
    """Parameters of Markovian RSA (ZAYA notation: T=`rounds`, N=`population`, C=`subset_size`,
    β=`rollout_tokens`, τ=`tail_tokens`). Defaults: the ZAYA1-8B recommended deployment (T=2, N=16, C=4,
    β=16K, τ=4K). The final round is round T (round 0 when T=0); it uses `final_population` (default N),
    `final_tokens` (default β) and `final_sampling` (default `sampling`)."""

    rounds: int = 2
    population: int = 16
    subset_size: int = 4
    rollout_tokens: int = 16384
    tail_tokens: int = 4096
    final_tokens: int | None = None
    final_population: int | None = None
    selection: str = "majority"
    tail_unit: str = "tokens"
    answer_tail: bool = False
    prompt_template: PromptTemplate | None = None
    sampling: dict | None = None
    final_sampling: dict | None = None
    seed: int | None = None

    def __post_init__(self):
        for name in ("population", "subset_size", "rollout_tokens", "tail_tokens"):
            _check_positive_int(name, getattr(self, name))
        _check_positive_int("rounds", self.rounds, minimum=0)
        for name in ("final_tokens", "final_population"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.rounds and self.subset_size > self.population:
            raise ValueError(
                f"subset_size ({self.subset_size}) cannot exceed population ({self.population}): subsets are drawn "
                "without replacement."
            )
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}.")
        if self.tail_unit not in TAIL_UNITS:
            raise ValueError(f"tail_unit must be one of {TAIL_UNITS}, got {self.tail_unit!r}.")
        if self.selection == "aggregate":
            # One final aggregation, as Zyphra's server returns it.
            if self.final_population not in (None, 1):
                raise ValueError("selection='aggregate' returns the one final aggregation: final_population must be 1.")
            self.final_population = 1
            if self.final_sampling is None:
                self.final_sampling = dict(FINAL_AGGREGATION_SAMPLING)
        for name in ("sampling", "final_sampling"):
            check_sampling(name, getattr(self, name) or {})

    def schedule(self) -> list[RoundSpec]:
        """Rounds 0..T; the last one has the final population, budget and sampling."""
        sampling = dict(self.sampling or DEFAULT_SAMPLING)
        final = RoundSpec(
            index=self.rounds,
            num_candidates=self.final_population or self.population,
            max_new_tokens=self.final_tokens or self.rollout_tokens,
            sampling=dict(self.final_sampling or sampling),
        )
        return [RoundSpec(t, self.population, self.rollout_tokens, sampling) for t in range(self.rounds)] + [final]

    @property
    def max_generated_tokens(self) -> int:
        """Upper bound on decode tokens per problem: sum over rounds of candidates × budget (= N·(T+1)·β with
        the final defaults). Real runs generate fewer: rollouts stop at EOS."""
        return sum(spec.num_candidates * spec.max_new_tokens for spec in self.schedule())


def check_sampling(name: str, sampling: dict) -> None:
    """Refuse a sampling dict that an engine would misread: unknown keys, or values out of range (a negative
    temperature would otherwise decode greedily without a word). Temperature 0 means greedy."""
    unknown = set(sampling) - SAMPLING_KEYS
    if unknown:
        raise ValueError(f"{name} has unknown keys {sorted(unknown)}; allowed: {sorted(SAMPLING_KEYS)}.")
    ranges = {  # key -> (accepts the value, the rule)
        "temperature": (lambda v: v >= 0, ">= 0 (0 is greedy)"),
        "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "top_k": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 is off)"),
        "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "repetition_penalty": (lambda v: v > 0, "> 0"),
    }
    for key, (accepts, rule) in ranges.items():
        value = sampling.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not accepts(value)):
            raise ValueError(f"{name}[{key!r}] must be {rule}, got {value!r}.")
    if not isinstance(sampling.get("do_sample", False), bool):
        raise ValueError(f"{name}['do_sample'] must be True or False, got {sampling['do_sample']!r}.")
    if sampling.get("do_sample") and sampling.get("temperature") == 0:
        raise ValueError(f"{name} sets do_sample=True with temperature 0: drop one (temperature 0 is greedy).")


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


class SubsetSampler:
    """Draws which candidates of round t-1 each new candidate reads: C distinct indices, uniformly at random.

    It owns its RNG, separate from token sampling, so the same seed gives the same subsets whatever the engine
    generates. With C=1 there is nothing to draw: candidate i continues from candidate i's own tail.
    """

    def __init__(self, seed: int | None = None):
        self.rng = random.Random(seed)

    def draw(self, previous_size: int, subset_size: int, num_candidates: int) -> list[tuple[int, ...]]:
        if subset_size == 1:
            return [(i % previous_size,) for i in range(num_candidates)]
        return [tuple(self.rng.sample(range(previous_size), subset_size)) for _ in range(num_candidates)]


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MarkovianRSARound:
    """One round: which previous candidates each new one read (`subsets`, indices into round t-1; empty in
    round 0), the prompt lengths, the completions and the decode tokens each one generated (EOS included)."""

    index: int
    subsets: list[tuple[int, ...]]
    prompt_lengths: list[int]
    completions: list[str]
    completion_tokens: list[int]
    max_new_tokens: int
    peak_cache_bytes: int | None = None  # largest ZayaCache of the round (local engine only)
    generated_tokens: int = field(init=False)

    def __post_init__(self):
        self.generated_tokens = sum(self.completion_tokens)


@dataclass
class MarkovianRSAResult:
    """The selected `answer`, the final population's texts and extracted answers, and one record per round.
    `generated_tokens` counts new decode tokens over all rounds (prompts and copied tails excluded)."""

    answer: str | None
    final_texts: list[str]
    final_answers: list[str | None]
    rounds: list[MarkovianRSARound]
    generated_tokens: int = field(init=False)

    def __post_init__(self):
        self.generated_tokens = sum(record.generated_tokens for record in self.rounds)

    def mean_accuracy(self, reference: str) -> float:
        return mean_accuracy(self.final_answers, reference)

    def majority_correct(self, reference: str) -> bool:
        return answers_match(majority_vote(self.final_answers), reference)

    def pass_at_n(self, reference: str) -> bool:
        return pass_at_n(self.final_answers, reference)


# ----------------------------------------------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Completion:
    """One rollout: its text (EOS excluded) and how many tokens were generated (EOS included)."""

    text: str
    num_tokens: int
    finished: bool  # stopped at EOS rather than at the token budget


@dataclass
class RolloutBatch:
    completions: list[Completion]
    peak_cache_bytes: int | None = None


class RolloutEngine(Protocol):
    """Anything that turns a round's prompts (token ids) into completions, one per prompt, in order.

    `seed` (None: unseeded) seeds token sampling for the round; `on_progress(k)` reports k finished rollouts.
    """

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        sampling: dict,
        seed: int | None,
        on_progress: Callable[[int], None] | None = None,
    ) -> RolloutBatch: ...


def is_greedy(sampling: dict) -> bool:
    return not sampling.get("do_sample", sampling.get("temperature", 1.0) > 0)


class LocalGenerationEngine:
    """Rollouts with the model's own `generate()`: each round is one left-padded batch (or chunks of
    `max_batch_size` rows). When all prompts are identical (round 0) their shared prefix is prefilled once and
    fanned out through `ZayaCache.batch_repeat_interleave`. Each round builds fresh caches, so nothing but the
    tails in the prompts reaches the next round."""

    def __init__(self, model, tokenizer, max_batch_size: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        if not eos:
            raise ValueError("Markovian RSA needs an EOS token: set generation_config.eos_token_id or the tokenizer's.")
        self.eos_token_ids = eos
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else model.generation_config.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = eos[0]

    @staticmethod
    def generation_kwargs(sampling: dict) -> dict:
        """`generate()` arguments for `sampling`. Filters it does not name are off (top_k=0, top_p=1), whatever
        the checkpoint's generation_config says, so that a sampling dict means the same on every engine."""
        kwargs = {"do_sample": not is_greedy(sampling)}
        if "repetition_penalty" in sampling:
            kwargs["repetition_penalty"] = sampling["repetition_penalty"]
        if kwargs["do_sample"]:
            kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
            kwargs.update({k: v for k, v in sampling.items() if k in ("temperature", "top_p", "top_k", "min_p")})
        return kwargs

    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens, sampling, seed, on_progress=None) -> RolloutBatch:
        if seed is not None:
            torch.manual_seed(seed)
        shared = len(prompts) > 1 and len(prompts[0]) > 1 and all(p == prompts[0] for p in prompts)
        prefix_cache = self._prefill(prompts[0][:-1]) if shared else None
        chunk = self.max_batch_size or len(prompts)
        completions, peak_cache_bytes = [], 0
        for start in range(0, len(prompts), chunk):
            rows = prompts[start : start + chunk]
            cache = None
            if prefix_cache is not None:
                last_chunk = start + chunk >= len(prompts)
                cache = prefix_cache if last_chunk else copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(rows))
            input_ids, attention_mask = self._left_pad(rows)
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                cache=cache,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
                return_dict_in_generate=True,
                **self.generation_kwargs(sampling),
            )
            final_cache = output.cache if hasattr(output, "cache") else output.past_key_values
            peak_cache_bytes = max(peak_cache_bytes, final_cache.nbytes)
            new_tokens = output.sequences[:, input_ids.shape[1] :]  # [rows, <= max_new_tokens]
            completions += [self._completion(row) for row in new_tokens.tolist()]
            del output, final_cache, cache
            if on_progress is not None:
                on_progress(len(rows))
        return RolloutBatch(completions, peak_cache_bytes)

    def _prefill(self, prefix: list[int]) -> ZayaCache:
        cache = ZayaCache(self.model.config)
        self.model(torch.tensor([prefix], device=self.model.device), cache=cache, use_cache=True, logits_to_keep=1)
        return cache

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
        return input_ids.to(self.model.device), attention_mask.to(self.model.device)

    def _completion(self, new_tokens: list[int]) -> Completion:
        """Tokens up to and including the first EOS are generated; what follows is padding of a finished row.
        A row without EOS ran to the budget (generate() stops early only once every row has finished)."""
        eos_at = next((i for i, token in enumerate(new_tokens) if token in self.eos_token_ids), None)
        kept = new_tokens if eos_at is None else new_tokens[:eos_at]
        text = self.tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return Completion(text, len(new_tokens) if eos_at is None else eos_at + 1, eos_at is not None)


# ----------------------------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------------------------


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress_bar(total: int, description: str, enabled: bool):
    if enabled and tqdm is not None:
        return tqdm(total=total, desc=description, unit="rollout", leave=False)
    return _NoProgress()


def run_markovian_rsa(
    engine: RolloutEngine,
    question: Question,
    tokenizer,
    config: MarkovianRSAConfig | None = None,
    progress: bool = True,
) -> MarkovianRSAResult:
    """Run Markovian RSA with `engine` producing the tokens (see the module docstring).

    Round 0 samples the question; round t samples aggregation prompts built from C tails of round t-1's
    candidates. Only those tails cross a round boundary, so prompt length and memory do not grow with T.
    """
    config = config or MarkovianRSAConfig()
    messages = question_messages(question)
    problem = question_text(messages) if config.rounds else None
    sampler = SubsetSampler(config.seed)
    records: list[MarkovianRSARound] = []
    tails: list[str] = []
    for spec in config.schedule():
        if spec.index == 0:
            subsets = [()] * spec.num_candidates
            prompts = [encode_chat(tokenizer, messages)] * spec.num_candidates
        else:
            subsets = sampler.draw(len(tails), config.subset_size, spec.num_candidates)
            prompts = [
                encode_chat(tokenizer, aggregation_messages(config.prompt_template, problem, [tails[j] for j in s]))
                for s in subsets
            ]
        with _progress_bar(len(prompts), f"Markovian RSA round {spec.index}/{config.rounds}", progress) as bar:
            batch = engine.generate(
                prompts,
                max_new_tokens=spec.max_new_tokens,
                sampling=spec.sampling,
                seed=None if config.seed is None else config.seed + spec.index,
                on_progress=bar.update,
            )
        if len(batch.completions) != len(prompts):
            raise RuntimeError(f"the engine returned {len(batch.completions)} completions for {len(prompts)} prompts.")
        texts = [c.text for c in batch.completions]
        records.append(
            MarkovianRSARound(
                index=spec.index,
                subsets=list(subsets),
                prompt_lengths=[len(p) for p in prompts],
                completions=texts,
                completion_tokens=[c.num_tokens for c in batch.completions],
                max_new_tokens=spec.max_new_tokens,
                peak_cache_bytes=batch.peak_cache_bytes,
            )
        )
        # The only state carried into the next round.
        tails = [
            candidate_tail(text, config.tail_tokens, config.tail_unit, tokenizer, config.answer_tail) for text in texts
        ]

    final_texts = records[-1].completions
    final_answers = [extract_boxed_answer(text) for text in final_texts]
    answer = majority_vote(final_answers) if config.selection == "majority" else final_answers[0]
    return MarkovianRSAResult(answer, final_texts, final_answers, records)


class ZayaGenerationMixin:
    """Adds `generate_markovian_rsa` to ZAYA causal LMs (next to transformers' `generate`)."""

    def generate_markovian_rsa(
        self,
        question: Question,
        tokenizer,
        *,
        rounds: int = 2,
        population: int = 16,
        subset_size: int = 4,
        rollout_tokens: int = 16384,
        tail_tokens: int = 4096,
        final_tokens: int | None = None,
        final_population: int | None = None,
        selection: str = "majority",
        tail_unit: str = "tokens",
        answer_tail: bool = False,
        prompt_template: PromptTemplate | None = None,
        sampling: dict | None = None,
        final_sampling: dict | None = None,
        seed: int | None = None,
        progress: bool = True,
    ) -> MarkovianRSAResult:
        """Markovian RSA with this model: `rounds` (T) aggregation rounds over a `population` (N) of rollouts of
        at most `rollout_tokens` (β) new tokens; each new candidate reads the last `tail_tokens` (τ) tokens (or
        words, `tail_unit="words"`) of the reasoning of `subset_size` (C) candidates of the previous round
        (their answers instead, when they have one, with `answer_tail=True`).

        Args:
            question: the problem, as a string or a chat message list.
            tokenizer: the model's tokenizer (with its chat template).
            final_tokens, final_population, final_sampling: the last round's budget, size and sampling
                (defaults: `rollout_tokens`, `population`, `sampling`).
            selection: "majority" (majority vote over the final answers) or "aggregate" (one final aggregation,
                sampled at temperature 0.6, top-p 0.95, top-k 40 unless `final_sampling` says otherwise).
            prompt_template: None (the package's template), a format string with {question}, {candidates},
                {num_candidates}, or a callable `(question, tails) -> str | messages`.
            sampling: dict of `do_sample`, `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`
                (default temperature 1.0, top-p 1.0).
            seed: seeds the subset sampler (its own RNG) and, separately, token sampling (`seed + round`).
            progress: show a tqdm bar per round.
        """
        config = MarkovianRSAConfig(
            rounds=rounds,
            population=population,
            subset_size=subset_size,
            rollout_tokens=rollout_tokens,
            tail_tokens=tail_tokens,
            final_tokens=final_tokens,
            final_population=final_population,
            selection=selection,
            tail_unit=tail_unit,
            answer_tail=answer_tail,
            prompt_template=prompt_template,
            sampling=sampling,
            final_sampling=final_sampling,
            seed=seed,
        )
        return run_markovian_rsa(LocalGenerationEngine(self, tokenizer), question, tokenizer, config, progress)


__all__ = [
    "Completion",
    "LocalGenerationEngine",
    "MarkovianRSAConfig",
    "MarkovianRSAResult",
    "MarkovianRSARound",
    "RolloutBatch",
    "RolloutEngine",
    "SubsetSampler",
    "ZayaGenerationMixin",
    "answers_match",
    "candidate_tail",
    "extract_boxed_answer",
    "extract_tail",
    "majority_vote",
    "mean_accuracy",
    "pass_at_n",
    "render_aggregation_prompt",
    "run_markovian_rsa",
]
