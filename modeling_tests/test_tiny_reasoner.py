"""The embedded model's task, tokenizer, training examples, training script and the shipped model itself."""

import importlib.util
import json
import random
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import zaya_hf
from zaya_hf.generation_zaya import aggregation_messages, encode_chat, extract_boxed_answer, split_reasoning
from zaya_hf.tiny_reasoner.data import IGNORE_INDEX, ExampleBuilder, tokenizer_corpus, train_tokenizer
from zaya_hf.tiny_reasoner.evaluation import evaluate_greedy, evaluate_sampled
from zaya_hf.tiny_reasoner.task import (
    TaskSpec,
    chance_accuracy,
    flawed_solution,
    held_out_problems,
    iter_problems,
)

ROOT = Path(__file__).resolve().parents[1]


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(tokenizer_corpus(seed=0, num_problems=300), vocab_size=400)


def test_problems_are_deterministic_and_held_out_problems_never_trained_on():
    assert take(iter_problems(5), 50) == take(iter_problems(5), 50)
    assert take(iter_problems(5), 50) != take(iter_problems(6), 50)
    train = {p.expression for p in take(iter_problems(0), 3000)}
    held_out = held_out_problems(200)
    assert len({p.expression for p in held_out}) == 200
    assert not train & {p.expression for p in held_out}
    assert held_out == held_out_problems(200)


def test_solutions_are_correct_chains_and_flawed_ones_end_wrong():
    spec = TaskSpec()
    rng = random.Random(0)
    for problem in take(iter_problems(1), 200):
        assert 0 <= problem.answer <= spec.max_total
        assert spec.min_operations <= len(problem.operands) <= spec.max_operations
        assert eval(problem.expression) == problem.answer  # left to right, + and - only
        solution = problem.solution()
        assert extract_boxed_answer(solution) == str(problem.answer)
        reasoning, answer = split_reasoning(solution)
        lines = reasoning.removeprefix("<think>\n").strip().split("\n")
        assert lines[0] == problem.expression and len(lines) == len(problem.operands) + 1
        assert all(eval(line.lstrip("=")) == problem.answer for line in lines)  # every rewrite keeps the value
        flawed = flawed_solution(problem, rng)
        assert extract_boxed_answer(flawed) not in (None, str(problem.answer))
        assert flawed.split("\n")[1] == problem.expression  # the slip comes later, as a model's would


def test_tokenizer_round_trips_splits_digits_and_keeps_think_tokens(tokenizer):
    problem = held_out_problems(1)[0]
    text = problem.solution()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # <think> / </think> are not special
    assert "<think>" in tokenizer.convert_ids_to_tokens(ids)
    assert all(len(token) == 1 for token in tokenizer.convert_ids_to_tokens(tokenizer("12345")["input_ids"]))
    assert tokenizer.decode(tokenizer("héllo wörld ✓")["input_ids"]) == "héllo wörld ✓"  # byte level: no unknowns
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert tokenizer.eos_token == "<end_of_turn>" and tokenizer.pad_token_id == 0


def test_examples_supervise_only_the_answer_and_use_the_rsa_template(tokenizer):
    builder = ExampleBuilder(tokenizer)
    problem = held_out_problems(1)[0]
    solve = builder.solve(problem)
    prompt = encode_chat(tokenizer, [{"role": "user", "content": problem.question}])
    target = tokenizer(problem.solution(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert solve["input_ids"] == prompt + target
    assert solve["labels"] == [IGNORE_INDEX] * len(prompt) + target

    rng = random.Random(3)
    wrong_candidates = 0
    for _ in range(20):
        tails = builder.candidate_tails(problem, rng)
        assert 1 <= len(tails) <= 4 and all("</think>" not in t and t.strip() for t in tails)
        wrong_candidates += sum(not t.rstrip().endswith(f"={problem.answer}") for t in tails)
        example = builder.aggregate(problem, tails)
        # The prompt is exactly what Markovian RSA renders for these tails at inference time...
        prompt = encode_chat(tokenizer, aggregation_messages(None, problem.question, tails))
        assert example["input_ids"] == prompt + target
        # ...and the target is always the correct solution.
        assert example["labels"] == [IGNORE_INDEX] * len(prompt) + target
    assert wrong_candidates > 0


def load_training_script():
    spec = importlib.util.spec_from_file_location("train_tiny_reasoner", ROOT / "examples" / "train_tiny_reasoner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHORT_RECIPE = ["--max-steps", "3", "--batch-size", "4", "--hidden-size", "32", "--layers", "2",
                "--moe-intermediate-size", "32", "--tokenizer-problems", "200", "--eval-problems", "2"]


def test_training_script_runs_a_shortened_recipe_reproducibly(tmp_path):
    out = tmp_path / "model"
    summary = load_training_script().main(["--out", str(out), *SHORT_RECIPE])
    assert summary["max_steps"] == 3 and summary["held_out_problems"] == 2
    assert not list(out.glob("*.py")) and "auto_map" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, zaya_hf.ZayaForCausalLM)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert json.loads((out / "training_summary.json").read_text())["parameters"] == model.num_parameters()
    with pytest.raises(SystemExit):  # never overwrites a model
        load_training_script().main(["--out", str(out), "--max-steps", "1"])

    # Same recipe and seed, same thread count: the same tokenizer and bit-identical weights.
    load_training_script().main(["--out", str(tmp_path / "again"), *SHORT_RECIPE])
    assert (out / "tokenizer.json").read_text() == (tmp_path / "again" / "tokenizer.json").read_text()
    first, second = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys() and all(first[k].equal(second[k]) for k in first)


def test_sampled_accuracy_is_seeded_and_near_zero_temperature_is_greedy():
    folder = zaya_hf.default_model_path()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    problems = held_out_problems(16)
    with torch.no_grad():
        greedy = evaluate_greedy(model, tokenizer, problems)
        cold = evaluate_sampled(model, tokenizer, problems, samples=2, max_new_tokens=128, temperature=1e-4, seed=0)
        first = evaluate_sampled(model, tokenizer, problems, samples=3, seed=5)
        again = evaluate_sampled(model, tokenizer, problems, samples=3, seed=5)
    assert cold == greedy
    assert first == again and first * 48 == round(first * 48)  # a mean over 16 problems x 3 rollouts
    with pytest.raises(ValueError, match="samples must be >= 1"):
        evaluate_sampled(model, tokenizer, problems, samples=0)


def test_the_embedded_model_ships_inside_the_package_and_solves_held_out_problems():
    folder = Path(zaya_hf.default_model_path())
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix != ".py")
    assert "model.safetensors" in files and "tokenizer.json" in files and "config.json" in files
    assert sum((folder / name).stat().st_size for name in files) < 10 * 2**20
    # Every data file is matched by the package-data patterns, so a non-editable install carries it.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["zaya_hf.default_model"]
    assert all(any(fnmatch(name, pattern) for pattern in patterns) for name in files)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert isinstance(model, zaya_hf.ZayaForCausalLM) and model.config.num_experts >= 4
    assert set(model.config.layer_types) == {"hybrid", "hybrid_sliding"}
    with torch.no_grad():
        accuracy = evaluate_greedy(model, tokenizer, held_out_problems(64))
    # The shipped model gets all 64 (training_summary.json; 99.2% on 256 in rsa_codesign_sft_4500_256.txt); chance 1/31.
    assert accuracy >= 25 * chance_accuracy()
