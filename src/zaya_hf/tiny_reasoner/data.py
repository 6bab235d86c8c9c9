"""Tokenizer and training examples of the embedded model.

Two kinds of supervised examples, both as chat turns with the loss on the assistant's tokens only:

* solve: the problem as the user message -> the worked solution;
* aggregate: the Markovian RSA aggregation prompt (built by `generation_zaya`'s own template and tail extraction,
  so training and inference see the same text) holding C candidate tails, some of them wrong -> the correct
  solution. This mirrors how ZAYA1-8B was trained for the method.
"""

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..generation_zaya import aggregation_messages, candidate_tail, encode_chat
from .task import THINK_END, THINK_START, ArithmeticProblem, TaskSpec, flawed_solution, iter_problems

PAD, BOS, TURN_START, TURN_END = "<pad>", "<bos>", "<start_of_turn>", "<end_of_turn>"
# Gemma-style turns, as ZAYA1's tokenizer; `<end_of_turn>` ends the assistant's turn and is the EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ message['content'] }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
IGNORE_INDEX = -100


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes, decoding round-trips) that splits numbers into single digits,
    with the chat tokens as special tokens and `<think>`, `</think>` as plain added tokens (kept when decoding
    with `skip_special_tokens=True`, as in Qwen3 / ZAYA1)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,  # room for the two think tokens
        special_tokens=[PAD, BOS, TURN_START, TURN_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_tokens([AddedToken(THINK_START, normalized=False), AddedToken(THINK_END, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=TURN_END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # generation pads on the left; the training collator pads on the right itself
    )


def tokenizer_corpus(seed: int, num_problems: int, spec: TaskSpec = TaskSpec()) -> Iterator[str]:
    """The texts the tokenizer is trained on: questions, right and wrong solutions, aggregation prompts."""
    rng = random.Random(seed)
    for problem in itertools.islice(iter_problems(seed, "train", spec), num_problems):
        tails = [problem.solution(), flawed_solution(problem, rng)]
        yield problem.question
        yield from tails
        yield aggregation_messages(None, problem.question, tails)[0]["content"]


@dataclass
class AggregationMix:
    """How aggregation examples are drawn: subset sizes C, tail lengths τ (tokens), and the range of the
    probability that a candidate is right (drawn per example, so that every mix of right and wrong occurs).
    The defaults are the demo's C and τ: a small model learns one setting better than many."""

    subset_sizes: tuple[int, ...] = (4,)
    tail_tokens: tuple[int, ...] = (48,)
    candidate_accuracy: tuple[float, float] = (0.2, 0.9)


class ExampleBuilder:
    """Token ids and labels of the two kinds of examples, through the chat template of `tokenizer`."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, mix: AggregationMix = AggregationMix()):
        self.tokenizer = tokenizer
        self.mix = mix

    def _example(self, messages: list[dict], completion: str) -> dict:
        prompt = encode_chat(self.tokenizer, messages)
        target = self.tokenizer(completion, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}

    def solve(self, problem: ArithmeticProblem) -> dict:
        return self._example([{"role": "user", "content": problem.question}], problem.solution())

    def candidate_tails(self, problem: ArithmeticProblem, rng: random.Random) -> list[str]:
        """C candidate completions, each right with a probability drawn for the example, cut to their tails by
        Markovian RSA's own `candidate_tail` (τ tokens of the reasoning)."""
        subset_size = rng.choice(self.mix.subset_sizes)
        tail_tokens = rng.choice(self.mix.tail_tokens)
        accuracy = rng.uniform(*self.mix.candidate_accuracy)
        candidates = [
            problem.solution() if rng.random() < accuracy else flawed_solution(problem, rng) for _ in range(subset_size)
        ]
        return [candidate_tail(text, tail_tokens, "tokens", self.tokenizer) for text in candidates]

    def aggregate(self, problem: ArithmeticProblem, tails: list[str]) -> dict:
        """The aggregation prompt over `tails` (Markovian RSA's default template) -> the correct solution."""
        return self._example(aggregation_messages(None, problem.question, tails), problem.solution())


class TinyReasonerStream(torch.utils.data.IterableDataset):
    """An endless, seeded stream of training examples, in runs of `batch_size` of one kind (solve or aggregate)
    so that a batch holds examples of similar length and little padding. A fraction `aggregation_fraction` of
    the runs are aggregation examples."""

    def __init__(
        self,
        builder: ExampleBuilder,
        seed: int,
        batch_size: int,
        aggregation_fraction: float = 0.5,
        spec: TaskSpec = TaskSpec(),
    ):
        self.builder, self.seed, self.batch_size = builder, seed, batch_size
        self.aggregation_fraction, self.spec = aggregation_fraction, spec

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(self.seed)
        problems = iter_problems(self.seed + 1, "train", self.spec)
        while True:
            aggregate = rng.random() < self.aggregation_fraction
            for problem in itertools.islice(problems, self.batch_size):
                if aggregate:
                    yield self.builder.aggregate(problem, self.builder.candidate_tails(problem, rng))
                else:
                    yield self.builder.solve(problem)


def collate_right_padded(examples: list[dict], pad_token_id: int) -> dict:
    """Right-pad a batch. Padding on the right never reaches a real token (causal attention, causal CCA conv)."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        labels[row, :length] = torch.tensor(example["labels"])
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


__all__ = [
    "AggregationMix",
    "CHAT_TEMPLATE",
    "ExampleBuilder",
    "TinyReasonerStream",
    "collate_right_padded",
    "tokenizer_corpus",
    "train_tokenizer",
]
