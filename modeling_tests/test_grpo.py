"""GRPO with TRL on ZAYA (zaya_hf.training.grpo, tiny_reasoner.rl): rewards, adaptive difficulty, aggregation prompts
from the policy's own rollouts, and a short GRPOTrainer run on a tiny model (offline: everything is built here)."""

import json
import random
import socket

import pytest
import torch
from training_helpers import tiny_model

pytest.importorskip("trl", reason="GRPO needs the `trl` extra, which `dev` includes")
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from zaya_hf.cache_zaya import ZayaCache  # noqa: E402
from zaya_hf.generation_zaya import aggregation_messages, candidate_tail  # noqa: E402
from zaya_hf.testing import toy_chat_tokenizer  # noqa: E402
from zaya_hf.tiny_reasoner.rl import RLRecipe, task_sampler, train_grpo  # noqa: E402
from zaya_hf.tiny_reasoner.task import TaskSpec  # noqa: E402
from zaya_hf.training import BiasBalancingCallback  # noqa: E402
from zaya_hf.training.grpo import (  # noqa: E402
    AGGREGATE,
    SOLVE,
    AdaptiveDifficulty,
    BoxedAnswerReward,
    RLPromptStream,
    RolloutGroup,
    RolloutPool,
    completion_text,
    rl_dataset,
)

DIGITS = "0 1 2 3 4 5 6 7 8 9"
WORDS = f"Compute + - = . {DIGITS} a b c d e f g h \\boxed{{3}} \\boxed{{4}}"


@pytest.fixture(scope="module")
def tokenizer():
    return toy_chat_tokenizer([WORDS])


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt (a download, a Hub call, telemetry) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during a GRPO test: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def solved(answer: str) -> str:
    return f"<think> 1 + 2 = {answer} </think> \\boxed{{{answer}}}"


def test_adaptive_difficulty_raises_the_top_level_only_once_it_is_mostly_solved():
    difficulty = AdaptiveDifficulty(2, 3, max_level=4, threshold=0.75, min_attempts=4)
    for outcome in (True, True, False, True):  # 3 of 4 at the top level: raise
        difficulty.record(3, outcome)
    assert difficulty.high == 4 and difficulty.raised_at == [(4, 4)]
    for _ in range(10):  # the maximum level is never passed
        difficulty.record(4, True)
    assert difficulty.high == 4
    lower = AdaptiveDifficulty(2, 3, max_level=5, threshold=0.75, min_attempts=4)
    for level, outcome in [(2, True)] * 8 + [(3, False), (3, True), (3, True), (3, False)]:  # below the top, or 2/4
        lower.record(level, outcome)
    assert lower.high == 3
    assert {lower.sample(random.Random(seed)) for seed in range(40)} == {2, 3}
    with pytest.raises(ValueError, match="low <= high <= max_level"):
        AdaptiveDifficulty(3, 2, 4)


def test_reward_checks_the_boxed_answer_and_feeds_difficulty_and_pool(tokenizer):
    difficulty = AdaptiveDifficulty(1, 2, max_level=3, min_attempts=64)
    pool = RolloutPool(tokenizer, subset_size=2, tail_tokens=4)
    reward = BoxedAnswerReward(difficulty, pool)
    completions = [[{"role": "assistant", "content": text}] for text in (solved("3"), solved("4"), "no box", solved("4"))]
    logged = {}
    rewards = reward(
        prompts=[None] * 4, completions=completions, answer=["3", "3", "4", "4"], kind=[SOLVE] * 4,
        level=[2, 2, 1, 1], question=["q3", "q3", "q4", "q4"], log_metric=logged.__setitem__,
    )
    assert rewards == [1.0, 0.0, 0.0, 1.0]
    assert difficulty.num_records == 4 and list(difficulty.recent) == [True, False]  # level-2 rollouts only
    assert [(g.question, g.answer, g.texts) for g in pool.groups] == [
        ("q3", "3", [solved("3"), solved("4")]), ("q4", "4", ["no box", solved("4")])
    ]
    assert logged == {"accuracy/solve": 0.5, "difficulty/high": 2.0}
    # Aggregation rows are rewarded on the aggregated answer and feed neither the pool nor the difficulty.
    assert reward(prompts=[None], completions=[solved("4")], answer=["4"], kind=[AGGREGATE], level=[1],
                  question=["q4"]) == [1.0]
    assert len(pool) == 2 and difficulty.num_records == 4
    with pytest.raises(ValueError, match="question"):
        BoxedAnswerReward(pool=pool)(prompts=[None], completions=["x"], answer=["1"], kind=[SOLVE])


def test_aggregation_prompts_are_markovian_rsa_prompts_over_the_pooled_rollouts(tokenizer):
    pool = RolloutPool(tokenizer, subset_size=2, tail_tokens=3)
    texts = [solved(str(answer)) for answer in (3, 4, 3)]
    pool.add(RolloutGroup("Compute 1 + 2 .", "3", 2, texts))
    prompt = pool.aggregation_prompt(pool.groups[0], random.Random(0))
    chosen = random.Random(0).sample(texts, 2)
    tails = [candidate_tail(text, 3, "tokens", tokenizer) for text in chosen]
    assert prompt == aggregation_messages(None, "Compute 1 + 2 .", tails)  # the inference template, τ-token tails
    assert all("</think>" not in tail and len(tokenizer(tail)["input_ids"]) == 3 for tail in tails)
    with pytest.raises(ValueError, match="num_generations >= subset_size"):
        RolloutPool(tokenizer, subset_size=4).add(RolloutGroup("q", "1", 1, ["a"] * 3))

    difficulty = AdaptiveDifficulty(1, 1, max_level=1)
    stream = RLPromptStream(lambda level, rng: (f"q{rng.random()}", "1"), difficulty, prompts_per_step=3, seed=0,
                            pool=pool, aggregation_fraction=0.5)
    rows = [row for row, _ in zip(stream(), range(60))]
    kinds = [row["kind"] for row in rows]
    assert set(kinds) == {SOLVE, AGGREGATE}
    assert all(len(set(kinds[i:i + 3])) == 1 for i in range(0, 60, 3))  # one kind per step
    aggregate = next(row for row in rows if row["kind"] == AGGREGATE)
    assert aggregate["answer"] == "3" and aggregate["prompt"][0]["content"].startswith("You are given a math problem")
    with pytest.raises(ValueError, match="RolloutPool"):
        RLPromptStream(lambda level, rng: ("q", "1"), difficulty, 3, 0, aggregation_fraction=0.5)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num_generations": 2, "subset_size": 4}, r"must be >= subset_size \(4\)"),
        ({"num_generations": 1, "subset_size": 1}, "num_generations must be >= 2"),
        ({"aggregation_fraction": 1.5}, "aggregation_fraction must be in"),
        ({"max_steps": -1}, "max_steps must be >= 0"),
        ({"prompts_per_step": 0}, "prompts_per_step must be >= 1"),
        ({"tail_tokens": 0}, "tail_tokens must be >= 1"),
        ({"beta": -0.1}, "beta must be >= 0"),
    ],
)
def test_rl_recipe_refuses_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        RLRecipe(**settings)


def test_task_sampler_draws_training_problems_with_up_to_level_operations():
    sample = task_sampler(TaskSpec())
    rng = random.Random(0)
    problems = [sample(6, rng) for _ in range(200)]
    operations = {question.count("+") + question.count("-") for question, _ in problems}
    assert operations == {2, 3, 4, 5, 6}
    assert all(str(eval(q.removeprefix("Compute ").rstrip("."))) == a for q, a in problems)


def digit_share(completions, **kwargs) -> list[float]:
    """A dense reward a random model can climb: the share of digit words in the completion."""
    digits = set(DIGITS.split())
    words = [completion_text(c).split() for c in completions]
    return [sum(word in digits for word in text) / max(1, len(text)) for text in words]


def test_grpo_trainer_on_a_tiny_zaya_raises_the_reward_and_keeps_balancing(tokenizer, tmp_path, no_network):
    model = tiny_model(vocab_size=len(tokenizer), num_experts=4)
    seen = {"caches": set(), "left_padded": False}
    prepare = model._prepare_cache_for_generation

    def spy(generation_config, model_kwargs, *args):  # what rollouts decode with
        prepare(generation_config, model_kwargs, *args)
        seen["caches"].add(type(model_kwargs["cache"]))
        mask = model_kwargs["attention_mask"]
        seen["left_padded"] |= bool((mask[:, 0] == 0).any()) and bool((mask[:, -1] == 1).all())

    model._prepare_cache_for_generation = spy
    difficulty = AdaptiveDifficulty(1, 3, max_level=3)
    pool = RolloutPool(tokenizer, subset_size=2, tail_tokens=4)
    words = DIGITS.split() + list("abcdefgh")
    stream = RLPromptStream(
        lambda level, rng: (" ".join(rng.choice(words) for _ in range(level)), "3"), difficulty,
        prompts_per_step=4, seed=0, pool=pool, aggregation_fraction=0.25,
    )
    callback = BiasBalancingCallback()
    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=24, per_device_train_batch_size=16, num_generations=4,
        max_completion_length=8, learning_rate=3e-3, logging_steps=1, shuffle_dataset=False,
        gradient_checkpointing=False, bf16=False, use_cpu=True, save_strategy="no", report_to=[], seed=0,
        disable_tqdm=True, reward_weights=[1.0, 0.0],  # the boxed reward (0 here) only feeds the pool
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=[digit_share, BoxedAnswerReward(difficulty, pool)], args=args,
        train_dataset=rl_dataset(stream), processing_class=tokenizer, callbacks=[callback],
    )
    biases_before = torch.stack([r.balancing_biases.clone() for r in model.modules() if hasattr(r, "load_counts")])
    trainer.train()

    rewards = [entry["rewards/digit_share/mean"] for entry in trainer.state.log_history if "reward" in entry]
    assert len(rewards) == 24
    assert sum(rewards[-6:]) / 6 > sum(rewards[:6]) / 6 + 0.15, rewards
    assert seen["caches"] == {ZayaCache} and seen["left_padded"]
    assert callback.balancer.num_steps == 24 and callback.balancer.last_load is not None
    biases_after = torch.stack([r.balancing_biases for r in model.modules() if hasattr(r, "load_counts")])
    assert not torch.equal(biases_before, biases_after)
    assert len(pool) > 0 and all(len(group.texts) % 4 == 0 for group in pool.groups)  # G own rollouts per prompt


def test_rl_stage_with_lora_returns_merged_weights_and_is_deterministic(tokenizer, no_network, monkeypatch):
    # A random model never boxes the right answer (every reward 0, so no gradient): the recipe's reward is swapped
    # for the dense one, so that the adapters learn and the comparison of two runs means something.
    import zaya_hf.tiny_reasoner.rl as rl

    monkeypatch.setattr(rl, "BoxedAnswerReward", lambda difficulty, pool: digit_share)

    def run():
        model = tiny_model(vocab_size=len(tokenizer))
        recipe = RLRecipe(max_steps=2, prompts_per_step=2, num_generations=4, max_completion_length=6,
                          aggregation_fraction=0.0, lora_targets=("attention",), learning_rate=1e-2)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        trained, summary = train_grpo(model, tokenizer, recipe, TaskSpec(max_operations=3), seed=0, progress=False)
        return before, trained, summary

    before, trained, summary = run()
    assert type(trained).__name__ == "ZayaForCausalLM" and set(trained.state_dict()) == set(before)
    changed = {k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])}
    assert any("self_attn" in k and k.endswith("weight") for k in changed), changed  # the merged adapters
    assert all("self_attn" in k or "balancing_biases" in k for k in changed), changed
    assert summary["steps"] == 2 and summary["expert_load_imbalance"] is not None
    _, again, summary_again = run()
    assert summary_again["log"] == summary["log"]
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in trained.state_dict().items())


def test_kl_term_refers_to_the_starting_weights_of_a_model_in_memory(tokenizer, no_network, monkeypatch):
    # TRL loads the reference with from_pretrained(config._name_or_path); a model built in memory has none, so the
    # stage saves the starting weights for it: the first step's KL (before any update) is 0, later ones are not.
    import zaya_hf.tiny_reasoner.rl as rl

    monkeypatch.setattr(rl, "BoxedAnswerReward", lambda difficulty, pool: digit_share)
    model = tiny_model(vocab_size=len(tokenizer))
    recipe = RLRecipe(max_steps=3, prompts_per_step=2, num_generations=4, max_completion_length=6,
                      aggregation_fraction=0.0, learning_rate=1e-2, warmup_steps=0, beta=0.1)
    trained, summary = train_grpo(model, tokenizer, recipe, TaskSpec(max_operations=3), seed=0, progress=False)
    kl = [entry["kl"] for entry in summary["log"]]
    assert len(kl) == 3 and abs(kl[0]) < 1e-6 and kl[-1] > 1e-4, kl
    assert trained.config._name_or_path == ""


def test_training_script_runs_the_rl_stage_after_supervised_training(tmp_path, no_network):
    from test_tiny_reasoner import SHORT_RECIPE, load_training_script

    summary = load_training_script().main(["--out", str(tmp_path / "model"), *SHORT_RECIPE, "--rl-steps", "1"])
    assert summary["rl"]["steps"] == 1 and len(summary["rl"]["log"]) == 1
    assert summary["rl"]["expert_load_imbalance"] is not None
    saved = json.loads((tmp_path / "model" / "training_summary.json").read_text())
    assert saved["recipe"]["rl"]["max_steps"] == 1 and saved["recipe"]["rl"]["aggregation_fraction"] == 0.5
