"""Shared pieces of the Markovian RSA tests: a toy tokenizer that knows every word the tests use, a scripted
(deterministic, model-free) rollout engine, and a tiny ZAYA sized to the tokenizer."""

import re

import torch
from conftest import randomize, tiny_config

from zaya_hf import ZayaForCausalLM
from zaya_hf.generation_zaya import (
    AGGREGATION_HEADER,
    CANDIDATES_MARKER,
    CLOSING_INSTRUCTION,
    PROBLEM_MARKER,
    REFINEMENT_HEADER,
    Completion,
    RolloutBatch,
)
from zaya_hf.testing import toy_chat_tokenizer

QUESTION = "What is three plus four ? Let's think step by step."
PROBLEM = "What is three plus four ?"
REASONING_WORDS = 12  # words of reasoning the scripted engine writes per rollout
MARKER = re.compile(r"r(\d+)c(\d+)k(\d+)")


def scripted_word(round_index: int, candidate: int, position: int) -> str:
    """A word that says which rollout wrote it: round, candidate, position in the reasoning."""
    return f"r{round_index}c{candidate}k{position}"


VOCABULARY = " ".join(
    [
        AGGREGATION_HEADER, REFINEMENT_HEADER, PROBLEM_MARKER, CANDIDATES_MARKER, CLOSING_INSTRUCTION, QUESTION,
        "---- Solution Candidate system You are careful. Refine:",
        " ".join(str(i) for i in range(40)),
        " ".join(f"\\boxed{{{i}}}" for i in range(10)),
        " ".join(scripted_word(r, c, k) for r in range(5) for c in range(8) for k in range(REASONING_WORDS)),
    ]
)


def make_tokenizer():
    return toy_chat_tokenizer([VOCABULARY])


def tiny_rsa_model(tokenizer, seed: int = 0) -> ZayaForCausalLM:
    """A tiny random two-layer ZAYA (one full, one sliding CCA layer) over the toy vocabulary."""
    config = tiny_config(vocab_size=len(tokenizer), num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"])
    torch.manual_seed(seed)
    return randomize(ZayaForCausalLM(config), seed).eval()


class ScriptedEngine:
    """A deterministic stand-in for a model: rollout i of call r writes `<think>` + REASONING_WORDS marker words
    + `</think>` + `\\boxed{answer(r, i)}`, reporting its token count (EOS included). It records every call."""

    def __init__(self, tokenizer, answer=lambda round_index, candidate: 7, offset: int = 0):
        self.tokenizer = tokenizer
        self.answer = answer
        self.offset = offset  # shifts the words written, to show subsets do not depend on the text
        self.calls: list[dict] = []

    def generate(self, prompts, *, max_new_tokens, sampling, seed, on_progress=None) -> RolloutBatch:
        round_index = len(self.calls)
        self.calls.append(dict(prompts=[self.tokenizer.decode(p) for p in prompts], max_new_tokens=max_new_tokens,
                               sampling=sampling, seed=seed))
        completions = []
        for i in range(len(prompts)):
            words = [scripted_word(round_index, i, (k + self.offset) % REASONING_WORDS) for k in range(REASONING_WORDS)]
            text = f"<think> {' '.join(words)} </think> \\boxed{{{self.answer(round_index, i)}}}"
            completions.append(Completion(text, len(self.tokenizer(text)["input_ids"]) + 1, True))
        if on_progress is not None:
            on_progress(len(prompts))
        return RolloutBatch(completions)


def markers(text: str) -> set[tuple[int, int, int]]:
    """The (round, candidate, position) of every scripted word in `text`."""
    return {tuple(int(g) for g in m.groups()) for m in MARKER.finditer(text)}
