"""`zaya-hf eval`: the harness on the embedded model's held-out set against the demo and the algorithm itself, its
intervals, and resuming a run killed halfway."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from zaya_hf import default_model_path
from zaya_hf.cli.main import main
from zaya_hf.generation_zaya import (
    LocalGenerationEngine,
    MarkovianRSAConfig,
    answers_match,
    extract_boxed_answer,
    majority_vote,
    mean_accuracy,
    run_markovian_rsa,
)
from zaya_hf.serving.evaluation import interval_95, read_problems
from zaya_hf.tiny_reasoner.evaluation import export_problem_set

SMALL = ["--rounds", "1", "--population", "2", "--subset-size", "2", "--rollout-tokens", "48", "--tail-tokens", "24"]


def run_cli(argv, capsys):
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_eval_on_the_held_out_set_equals_the_demo_and_the_algorithm(tmp_path, capsys):
    problems_file = tmp_path / "held_out.jsonl"
    status, out, _ = run_cli(["demo", "--export-problems", str(problems_file), "--problems", "2"], capsys)
    assert status == 0 and len(read_problems(problems_file)) == 2
    status, out, _ = run_cli(["eval", str(problems_file), "--method", "rsa", *SMALL, "--json", "--no-progress",
                              "--output", str(tmp_path / "rsa.jsonl")], capsys)
    assert status == 0
    evaluated = last_json(out)
    status, out, _ = run_cli(["demo", "--problems", "2", *SMALL, "--json", "--no-plot"], capsys)
    assert status == 0
    demo = json.loads(out.strip().splitlines()[-1])

    # The demo's figures are the harness's, computed in the same run (the embedded model may be retrained).
    assert demo["single_accuracy"] == evaluated["single_rollout"]["accuracy"]
    assert demo["single_tokens"] == evaluated["single_rollout"]["tokens"]
    assert demo["rsa_accuracy"] == evaluated["rounds"][-1]["majority_accuracy"]
    assert demo["rsa_mean_accuracy"] == evaluated["rounds"][-1]["mean_accuracy"]
    assert [(p["tokens_per_problem"], p["mean_accuracy"], p["majority_accuracy"]) for p in demo["rounds"]] == [
        (r["tokens_per_problem"], r["mean_accuracy"], r["majority_accuracy"]) for r in evaluated["rounds"]]

    # ... and the algorithm's, run here problem by problem with the harness's seeding rule (seed + 1000·i).
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    config = MarkovianRSAConfig(rounds=1, population=2, subset_size=2, rollout_tokens=48, tail_tokens=24,
                                sampling={"temperature": 1.0, "top_p": 1.0}, seed=0)
    final_mean, final_majority, tokens, by_right = [], [], 0, {}
    for index, problem in enumerate(read_problems(problems_file)):
        result = run_markovian_rsa(LocalGenerationEngine(model, tokenizer), problem.question, tokenizer,
                                   replace(config, seed=1000 * index), progress=False)
        final_mean.append(mean_accuracy(result.final_answers, problem.answer))
        final_majority.append(answers_match(majority_vote(result.final_answers), problem.answer))
        tokens += result.generated_tokens
        first_right = [answers_match(a, problem.answer) for a in map(extract_boxed_answer, result.rounds[0].completions)]
        for subset, answer in zip(result.rounds[1].subsets, result.final_answers):
            row = by_right.setdefault(str(sum(first_right[j] for j in subset)), [0, 0])
            row[0] += 1
            row[1] += answers_match(answer, problem.answer)
    assert evaluated["rounds"][-1]["mean_accuracy"] == pytest.approx(sum(final_mean) / 2)
    assert evaluated["rounds"][-1]["majority_accuracy"] == pytest.approx(sum(final_majority) / 2)
    assert evaluated["tokens_per_problem"] == pytest.approx(tokens / 2)
    # The aggregations by how many right candidates they read (round 1 of 1 here).
    assert evaluated["aggregation_by_right_candidates"] == {
        k: {"aggregations": n, "accuracy": right / n} for k, (n, right) in sorted(by_right.items())}


def test_single_rollouts_are_round_zero_of_the_same_run(tmp_path, capsys):
    problems_file = tmp_path / "p.jsonl"
    export_problem_set(problems_file, 2)
    outputs = {}
    for method, extra in (("single", []), ("rsa", ["--rounds", "1"])):
        argv = ["eval", str(problems_file), "--method", method, "--population", "3", "--subset-size", "2",
                "--rollout-tokens", "48", "--tail-tokens", "24", *extra, "--json", "--no-progress",
                "--output", str(tmp_path / f"{method}.jsonl")]
        status, out, _ = run_cli(argv, capsys)
        assert status == 0
        outputs[method] = last_json(out)
    single, rsa = outputs["single"], outputs["rsa"]
    assert len(single["rounds"]) == 1 and len(rsa["rounds"]) == 2
    assert single["rounds"][0] == {**rsa["rounds"][0], "seconds_per_problem": single["rounds"][0]["seconds_per_problem"]}


def test_a_run_killed_halfway_resumes_without_recomputing_finished_problems(tmp_path, capsys):
    problems_file, output = tmp_path / "p.jsonl", tmp_path / "results.jsonl"
    export_problem_set(problems_file, 5)
    argv = ["eval", str(problems_file), "--method", "single", "--population", "2", "--rollout-tokens", "40",
            "--output", str(output)]
    process = subprocess.Popen([sys.executable, "-m", "zaya_hf.cli", *argv, "--no-progress"],
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 180
        while time.monotonic() < end and process.poll() is None:
            if output.exists() and output.read_text().count("\n") >= 3:  # the settings line and two problems
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    before = output.read_bytes()
    finished = before.count(b"\n") - 1
    assert process.returncode == -signal.SIGKILL and 2 <= finished < 5, f"killed after {finished} problems"
    with output.open("ab") as out:
        out.write(b'{"id": "held-out-1234-4", "rou')  # a line cut by the kill is dropped and its problem rerun

    status, out, _ = run_cli([*argv, "--json", "--no-progress"], capsys)
    assert status == 0
    summary = last_json(out)
    assert summary["resumed"] == finished and summary["computed"] == 5 - finished
    after = output.read_bytes()
    assert after.startswith(before) and after.count(b"\n") == 6  # finished lines kept as they were
    ids = [json.loads(line)["id"] for line in after.splitlines()[1:]]
    assert sorted(ids) == sorted(p.id for p in read_problems(problems_file))

    # The same output with other settings is refused, not mixed.
    status, _, err = run_cli([*argv[:4], "--population", "3", *argv[6:]], capsys)
    assert status == 2 and "other settings (config differ)" in err


def test_bad_problem_files_name_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Compute 1+1.", "answer": 2}\n{"question": 3}\n')
    status, _, err = run_cli(["eval", str(bad), "--method", "single"], capsys)
    assert status == 2 and "bad.jsonl, line 2: need an object with a string 'question'" in err


def test_intervals():
    low, high = interval_95([1, 1, 0, 0], binary=True)  # Wilson, 2 of 4
    assert low == pytest.approx(0.1500, abs=1e-4) and high == pytest.approx(0.8500, abs=1e-4)
    low, high = interval_95([0.5, 0.5, 0.5], binary=False)
    assert low == high == 0.5
    assert interval_95([1.0] * 10, binary=True)[1] == 1.0 and interval_95([1.0] * 10, binary=True)[0] < 1.0
