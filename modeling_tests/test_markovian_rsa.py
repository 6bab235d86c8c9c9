"""Markovian RSA, the engine-agnostic algorithm: schedule, subsets, tails, prompts, answers, accounting.

A scripted engine stands in for the model here (see rsa_fixtures.py); test_markovian_rsa_local.py runs a real one.
"""

from collections import Counter

import pytest
from rsa_fixtures import PROBLEM, QUESTION, REASONING_WORDS, ScriptedEngine, make_tokenizer, markers, scripted_word

from zaya_hf import generation_zaya
from zaya_hf.generation_zaya import (
    AGGREGATION_HEADER,
    CANDIDATES_MARKER,
    CLOSING_INSTRUCTION,
    PROBLEM_MARKER,
    REFINEMENT_HEADER,
    MarkovianRSAConfig,
    SubsetSampler,
    aggregation_messages,
    answers_match,
    candidate_tail,
    encode_chat,
    extract_boxed_answer,
    extract_tail,
    majority_vote,
    mean_accuracy,
    pass_at_n,
    question_messages,
    question_text,
    run_markovian_rsa,
)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def run(tokenizer, engine=None, **params):
    engine = engine or ScriptedEngine(tokenizer)
    return engine, run_markovian_rsa(engine, QUESTION, tokenizer, MarkovianRSAConfig(**params), progress=False)


# -- schedule and budgets ----------------------------------------------------------------------------------------


def test_schedule_budgets_and_final_round(tokenizer):
    config = MarkovianRSAConfig(rounds=3, population=6, subset_size=2, rollout_tokens=100, tail_tokens=5,
                                final_tokens=300, final_population=2, sampling={"temperature": 0.9},
                                final_sampling={"do_sample": False})
    specs = config.schedule()
    assert [(s.index, s.num_candidates, s.max_new_tokens) for s in specs] == [
        (0, 6, 100), (1, 6, 100), (2, 6, 100), (3, 2, 300)]
    assert [s.sampling for s in specs] == [{"temperature": 0.9}] * 3 + [{"do_sample": False}]
    assert config.max_generated_tokens == 3 * 6 * 100 + 2 * 300

    engine, result = run(tokenizer, rounds=3, population=6, subset_size=2, rollout_tokens=100, tail_tokens=5,
                         final_tokens=300, final_population=2, sampling={"temperature": 0.9},
                         final_sampling={"do_sample": False}, seed=3)
    assert [len(c["prompts"]) for c in engine.calls] == [6, 6, 6, 2]
    assert [c["max_new_tokens"] for c in engine.calls] == [100, 100, 100, 300]
    assert [c["sampling"] for c in engine.calls] == [{"temperature": 0.9}] * 3 + [{"do_sample": False}]
    assert [c["seed"] for c in engine.calls] == [3, 4, 5, 6]  # token sampling: seed + round
    assert [r.index for r in result.rounds] == [0, 1, 2, 3] and len(result.final_texts) == 2


def test_reported_settings_token_budgets():
    # N·(T+1)·β with the final round at the rollout budget (README's table).
    assert MarkovianRSAConfig(rounds=2, population=16, subset_size=4, rollout_tokens=40960).max_generated_tokens == 1_966_080
    assert MarkovianRSAConfig().max_generated_tokens == 16 * 3 * 16384 == 786_432
    assert MarkovianRSAConfig(rounds=4, subset_size=1, rollout_tokens=8192).max_generated_tokens == 655_360
    assert MarkovianRSAConfig(rounds=8, population=32, rollout_tokens=32768).max_generated_tokens == 9_437_184


def test_aggregate_selection_is_one_final_aggregation_at_the_servers_sampling(tokenizer):
    config = MarkovianRSAConfig(rounds=1, population=4, subset_size=2, selection="aggregate")
    final = config.schedule()[-1]
    assert final.num_candidates == 1 and final.sampling == {"temperature": 0.6, "top_p": 0.95, "top_k": 40}
    engine, result = run(tokenizer, rounds=1, population=4, subset_size=2, tail_tokens=4, selection="aggregate",
                         engine=ScriptedEngine(tokenizer, answer=lambda r, i: 5))
    assert len(engine.calls[-1]["prompts"]) == 1 and result.answer == "5"


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(population=4, subset_size=5), "subset_size"),
        (dict(rounds=-1), "rounds"),
        (dict(tail_tokens=0), "tail_tokens"),
        (dict(selection="best"), "selection"),
        (dict(tail_unit="chars"), "tail_unit"),
        (dict(sampling={"temprature": 0.5}), "temprature"),
        (dict(selection="aggregate", final_population=3), "final_population"),
    ],
)
def test_bad_parameters_are_refused_clearly(params, message):
    with pytest.raises(ValueError, match=message):
        MarkovianRSAConfig(**params)


# -- subsets -----------------------------------------------------------------------------------------------------


def test_subsets_are_distinct_and_uniform():
    draws = SubsetSampler(seed=0).draw(previous_size=4, subset_size=2, num_candidates=6000)
    assert all(len(set(s)) == 2 and all(0 <= j < 4 for j in s) for s in draws)
    pairs = Counter(frozenset(s) for s in draws)
    assert len(pairs) == 6 and all(abs(n - 1000) < 120 for n in pairs.values())  # each pair has probability 1/6
    members = Counter(j for s in draws for j in s)
    assert all(abs(n - 3000) < 150 for n in members.values())
    positions = Counter(s[0] for s in draws)  # order inside a subset is random too
    assert all(abs(n - 1500) < 150 for n in positions.values())


def test_subsets_are_seeded_reproducible_and_independent_of_the_generated_text(tokenizer):
    params = dict(rounds=3, population=5, subset_size=3, tail_tokens=3, seed=11)
    _, first = run(tokenizer, **params)
    _, again = run(tokenizer, engine=ScriptedEngine(tokenizer, offset=5), **params)  # other text, same seed
    _, other = run(tokenizer, **{**params, "seed": 12})
    subsets = [r.subsets for r in first.rounds]
    assert subsets == [r.subsets for r in again.rounds]
    assert subsets != [r.subsets for r in other.rounds]
    assert first.rounds[0].subsets == [()] * 5


def test_each_prompt_holds_the_tails_of_its_subset_of_the_previous_round_only(tokenizer):
    engine, result = run(tokenizer, rounds=3, population=5, subset_size=3, tail_tokens=4, tail_unit="words", seed=2)
    for t in range(1, 4):
        for i, subset in enumerate(result.rounds[t].subsets):
            seen = markers(engine.calls[t]["prompts"][i])
            # The last 4 reasoning words of exactly the candidates in the subset, all from round t-1.
            expected = {(t - 1, j, k) for j in subset for k in range(REASONING_WORDS - 4, REASONING_WORDS)}
            assert seen == expected


def test_subset_size_one_continues_each_candidates_own_tail(tokenizer):
    engine, result = run(tokenizer, rounds=2, population=4, subset_size=1, tail_tokens=3, seed=0)
    for t in (1, 2):
        assert result.rounds[t].subsets == [(0,), (1,), (2,), (3,)]
        for i, prompt in enumerate(engine.calls[t]["prompts"]):
            assert {(r, c) for r, c, _ in markers(prompt)} == {(t - 1, i)}
            assert REFINEMENT_HEADER in prompt and "---- Candidate ----" in prompt and "Solution 1" not in prompt


def test_rounds_zero_is_plain_parallel_sampling(tokenizer):
    engine, result = run(tokenizer, rounds=0, population=4, subset_size=2, engine=ScriptedEngine(
        tokenizer, answer=lambda r, i: [3, 7, 7, 1][i]))
    assert len(engine.calls) == 1
    question_ids = encode_chat(tokenizer, question_messages(QUESTION))
    assert engine.calls[0]["prompts"] == [tokenizer.decode(question_ids)] * 4
    assert result.final_answers == ["3", "7", "7", "1"] and result.answer == "7"


# -- token accounting --------------------------------------------------------------------------------------------


def test_token_accounting_counts_generated_tokens_only(tokenizer):
    engine, result = run(tokenizer, rounds=2, population=4, subset_size=2, tail_tokens=6, seed=1)
    per_rollout = len(tokenizer(ScriptedEngine(tokenizer).generate([[1]], max_new_tokens=1, sampling={},
                                                                  seed=None).completions[0].text)["input_ids"]) + 1
    for record in result.rounds:
        assert record.completion_tokens == [per_rollout] * 4
        assert record.generated_tokens == 4 * per_rollout
    assert result.generated_tokens == 3 * 4 * per_rollout
    # Aggregation prompts are much longer than round 0's, and none of that is counted.
    assert min(result.rounds[1].prompt_lengths) > result.rounds[0].prompt_lengths[0]


# -- tails -------------------------------------------------------------------------------------------------------


def test_tails_by_tokens_and_by_words(tokenizer):
    words = [scripted_word(0, 0, k) for k in range(REASONING_WORDS)]
    text = f"<think> {' '.join(words)} </think> The answer is \\boxed{{7}}"
    assert candidate_tail(text, 3, "tokens", tokenizer) == " ".join(words[-3:])
    assert candidate_tail(text, 3, "words", tokenizer) == " ".join(words[-3:])
    assert candidate_tail(text, 100, "words", tokenizer) == " ".join(["<think>", *words])
    assert candidate_tail(text, 100, "tokens", tokenizer) == text.rpartition("</think>")[0]  # short: kept as is
    # "PaCoRe hybrid": the post-</think> answer when there is one (also capped), else the reasoning tail.
    assert candidate_tail(text, 3, "words", tokenizer, answer_tail=True) == "answer is \\boxed{7}"
    assert candidate_tail(text, 20, "words", tokenizer, answer_tail=True) == "The answer is \\boxed{7}"
    unfinished = " ".join(words)
    assert candidate_tail(unfinished, 2, "tokens", tokenizer, answer_tail=True) == " ".join(words[-2:])
    assert candidate_tail(f"{unfinished} </think>  ", 2, "words", tokenizer, answer_tail=True) == " ".join(words[-2:])
    assert extract_tail("a  b\n\nc\td", 3, "words") == "b c d"


class StretchingTokenizer:
    """Characters as tokens, but decoding "é" gives two characters: decode/encode is not the identity."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) for ch in text]}

    def decode(self, ids, **kwargs):
        return "".join("e\u0301" if i == ord("é") else chr(i) for i in ids)


def test_token_tail_re_encodes_within_the_budget():
    tail = extract_tail("abcdéééé", 4, "tokens", StretchingTokenizer())
    assert len(StretchingTokenizer()(tail)["input_ids"]) <= 4 and tail.endswith("e\u0301")


# -- prompts -----------------------------------------------------------------------------------------------------


def test_default_aggregation_prompt_structure(tokenizer):
    (message,) = aggregation_messages(None, PROBLEM, ["tail one", "tail two"])
    assert message["role"] == "user"
    lines = message["content"].split("\n")
    assert lines == [AGGREGATION_HEADER, PROBLEM_MARKER, PROBLEM, CANDIDATES_MARKER, "---- Solution 1 ----",
                     "tail one", "---- Solution 2 ----", "tail two", CLOSING_INSTRUCTION]
    (single,) = aggregation_messages(None, PROBLEM, ["only"])
    assert single["content"].split("\n")[0] == REFINEMENT_HEADER and "---- Candidate ----\nonly" in single["content"]


def test_prompt_template_as_format_string_or_callable(tokenizer):
    template = "Refine: {question}\n{num_candidates}\n{candidates}"
    (message,) = aggregation_messages(template, PROBLEM, ["x", "y"])
    assert message["content"] == f"Refine: {PROBLEM}\n2\n---- Solution 1 ----\nx\n---- Solution 2 ----\ny"
    with pytest.raises(ValueError, match="unknown field 'problem'"):
        aggregation_messages("{problem}", PROBLEM, ["x"])

    assert aggregation_messages(lambda q, tails: f"{q}|{'|'.join(tails)}", "q", ["a", "b"]) == [
        {"role": "user", "content": "q|a|b"}]
    chat = [{"role": "system", "content": "You are careful."}, {"role": "user", "content": "q"}]
    assert aggregation_messages(lambda q, tails: chat, "q", ["a"]) == chat
    with pytest.raises(TypeError, match="prompt_template"):
        aggregation_messages(3, "q", ["a"])

    engine, _ = run(tokenizer, rounds=1, population=2, subset_size=2, tail_tokens=2, prompt_template=template)
    assert all(p.startswith("<bos> <start_of_turn> user Refine:") for p in engine.calls[1]["prompts"])


def test_question_as_messages_and_the_think_instruction_cut(tokenizer):
    assert question_text(question_messages(QUESTION)) == PROBLEM
    assert question_text(question_messages("Let's think about 2+2. What is it?")).startswith("Let's think about")
    assert question_text(question_messages("2+2?\nLet's think step by step and put the answer in \\boxed{}.")) == "2+2?"
    assert question_text(question_messages("Why? Let's think. Then answer.")) == "Why? Let's think. Then answer."
    chat = [{"role": "system", "content": "You are careful."}, {"role": "user", "content": QUESTION}]
    engine = ScriptedEngine(tokenizer)
    run_markovian_rsa(engine, chat, tokenizer, MarkovianRSAConfig(rounds=1, population=2, subset_size=2,
                                                                   tail_tokens=2), progress=False)
    assert engine.calls[0]["prompts"][0].startswith("<bos> <start_of_turn> system You are careful.")
    aggregation = engine.calls[1]["prompts"][0]
    assert "system" not in aggregation and PROBLEM in aggregation and "Let's" not in aggregation
    for bad in ([{"content": "x"}], [{"role": "system", "content": "x"}]):
        with pytest.raises(ValueError, match="question"):
            question_messages(bad)


# -- answers -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, answer",
    [
        ("\\boxed{12}", "12"),
        ("<think>maybe \\boxed{3}</think> so \\boxed{\\frac{1}{2}} or rather \\boxed{ \\frac{3}{4} }", "\\frac{3}{4}"),
        ("<think>\\boxed{3}</think> no box here", None),
        ("<think>a</think><think>b \\boxed{1}</think> \\fbox{x^{2}}", "x^{2}"),
        ("final \\boxed{5} then \\boxed{6", "5"),  # the last box is cut off: the last complete one counts
        ("no answer", None),
        ("put it in \\boxed{ }.", None),
    ],
)
def test_extract_boxed_answer(text, answer):
    assert extract_boxed_answer(text) == answer


def test_answer_matching_without_math_verify(monkeypatch):
    monkeypatch.setattr(generation_zaya, "math_verify", None)
    assert answers_match("042", "42") and answers_match("1,000", "1000") and answers_match("3.0", "3")
    assert answers_match("\\dfrac{1}{2}", "\\frac{1}{2}") and answers_match("$90^\\circ$", "90")
    assert answers_match("\\text{yes}", "yes")
    assert not answers_match("0.5", "\\frac{1}{2}") and not answers_match(None, "1") and not answers_match("2", "3")


def test_answer_matching_with_math_verify():
    pytest.importorskip("math_verify")
    assert answers_match("0.5", "\\frac{1}{2}") and answers_match("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2")
    assert not answers_match("0.25", "\\frac{1}{2}")


def test_majority_vote_mean_accuracy_and_pass_at_n():
    answers = ["4", None, "5", "004", "5", "4.0"]
    assert majority_vote(answers) == "4"  # "4", "004", "4.0" are one answer
    assert majority_vote(["5", "4", "4", "5"]) == "5"  # a tie goes to the earliest
    assert majority_vote([None, None]) is None
    assert mean_accuracy(answers, "4") == pytest.approx(3 / 6) and mean_accuracy([], "4") == 0.0
    assert pass_at_n(answers, "5") and not pass_at_n(answers, "6")


def test_result_selection_and_metrics(tokenizer):
    _, result = run(tokenizer, rounds=1, population=5, subset_size=2, tail_tokens=2,
                    engine=ScriptedEngine(tokenizer, answer=lambda r, i: [2, 9, 9, 3, 9][i]))
    assert result.final_answers == ["2", "9", "9", "3", "9"] and result.answer == "9"
    assert result.mean_accuracy("9") == pytest.approx(0.6) and result.majority_correct("9")
    assert result.pass_at_n("3") and not result.majority_correct("3") and not result.pass_at_n("4")
