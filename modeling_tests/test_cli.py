"""`zaya-hf`: every subcommand in process through `main(argv)`, with the embedded model, plus bad arguments."""

import argparse
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from reference_data import ZAYA1_8B_CONFIG
from safetensors.torch import load_file

import zaya_hf
from zaya_hf.cli import main
from zaya_hf.cli.common import CommandError, load_model, resolve_model

SUBCOMMANDS = ["demo", "generate", "chat", "rsa", "info", "bench", "convert", "export", "serve-rsa", "eval"]
# Markovian RSA shrunk to seconds: 1 aggregation round over 2 candidates.
SMALL_RSA = ["--rounds", "1", "--population", "2", "--subset-size", "2", "--rollout-tokens", "48", "--tail-tokens", "32"]


def run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse: --help (0) and usage errors (2)
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    status, out, _ = run([command, "--help"], capsys)
    assert status == 0 and "usage:" in out


def test_top_level_help_lists_every_subcommand_and_a_missing_command_is_an_error(capsys):
    status, out, _ = run(["--help"], capsys)
    assert status == 0 and all(command in out for command in SUBCOMMANDS)
    status, _, err = run([], capsys)
    assert status == 2 and "required" in err
    status, _, err = run(["frobnicate"], capsys)
    assert status == 2 and "invalid choice" in err


def test_model_argument_accepts_folders_and_hub_ids_and_rejects_the_rest(tmp_path):
    assert resolve_model(None) == zaya_hf.default_model_path()
    assert resolve_model(zaya_hf.default_model_path()) == zaya_hf.default_model_path()
    assert resolve_model("Zyphra/ZAYA1-8B") == "Zyphra/ZAYA1-8B"  # loaded by from_pretrained where the Hub is reachable
    for bad, message in [(str(tmp_path / "missing"), "no such folder"), (str(tmp_path), "no config.json"),
                         ("not a hub id!", "not a Hub id")]:
        with pytest.raises(CommandError, match=message):
            resolve_model(bad)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CommandError, match="is a file"):
        resolve_model(str(tmp_path / "file.txt"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "hi", "--model", "/nonexistent/model"], "no such folder"),
        (["generate", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
        (["generate", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["generate", "hi", "--max-new-tokens", "0"], "must be >= 1"),
        (["generate", "hi", "--device", "cuda:0"] if not __import__("torch").cuda.is_available() else
         ["generate", "hi", "--device", "nonsense"], "device"),
        (["chat", "--dtype", "int8"], "invalid choice"),
        (["rsa", "q", "--population", "2", "--subset-size", "3"], "subset_size (3) cannot exceed population (2)"),
        (["rsa", "q", "--rounds", "-1"], "must be >= 0"),
        (["rsa", "q", "--endpoint", "ftp://example"], "http(s) URL"),
        (["rsa", "q", "--tokenizer", "x"], "--tokenizer goes with --endpoint"),
        (["demo", "--rounds", "0"], "--rounds 0"),
        (["demo", "--plot", "out.txt"], "ending in .png"),
        (["demo", "--problems", "zero"], "expected an integer"),
        (["info", "--seq-len", "0"], "must be >= 1"),
        (["bench", "--new-tokens", "1"], "--new-tokens must be >= 2"),
        (["bench", "--bench-small", "--model", "x/y"], "exclusive"),
    ],
)
def test_bad_arguments_give_a_clear_message_and_a_non_zero_status(argv, message, capsys):
    status, out, err = run(argv, capsys)
    assert status != 0
    assert message in err, err


def test_info_describes_the_embedded_model_and_zaya1_8b_from_its_config(tmp_path, capsys):
    status, out, _ = run(["info"], capsys)
    assert status == 0 and "active:" in out and "B per token" in out
    status, out, _ = run(["info", "--json"], capsys)
    info = json.loads(out)
    params = info["parameters"]
    weights = load_file(Path(zaya_hf.default_model_path()) / "model.safetensors")
    assert params["total"] == sum(w.numel() for name, w in weights.items() if "balancing_biases" not in name)
    assert params["embeddings"] < params["active_per_token"] < params["total"]

    shutil.copy(ZAYA1_8B_CONFIG, tmp_path / "config.json")
    status, out, _ = run(["info", "--model", str(tmp_path), "--json"], capsys)
    info = json.loads(out)
    assert 8.8e9 < info["parameters"]["total"] < 8.9e9  # "8.84 B parameters"
    assert 0.74e9 < info["parameters"]["active_per_token_without_embeddings"] < 0.77e9  # "about 0.75 B active"
    assert info["cache"]["bytes_per_token_per_layer"] == 1024  # 2 x kv_heads x head_dim x 2 bytes
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    status, _, err = run(["info", "--model", str(tmp_path)], capsys)
    assert status == 2 and "not a ZAYA model" in err


def test_generate_answers_with_thinking_and_a_boxed_answer(capsys):
    status, out, _ = run(["generate", "Compute 12+5-3.", "--max-new-tokens", "64"], capsys)
    assert status == 0 and "</think>" in out and "\\boxed{" in out
    status, out, _ = run(["generate", "Compute 12+5-3.", "--max-new-tokens", "8", "--temperature", "1",
                          "--num-return-sequences", "2", "--seed", "0"], capsys)
    assert status == 0 and out.count("---- sample") == 2
    status, out, _ = run(["generate", "<bos>Compute", "--raw", "--max-new-tokens", "4"], capsys)
    assert status == 0


def test_chat_reads_turns_from_standard_input(capsys, monkeypatch):
    status, out, err = run(["chat", "--max-new-tokens", "48", "--temperature", "0"], capsys,
                           stdin="Compute 3+4.\n/reset\n\nCompute 9-2.\n/exit\n", monkeypatch=monkeypatch)
    assert status == 0 and out.count("model> ") == 2 and "Ctrl-D" in err


def test_rsa_runs_locally_and_reports_rounds(capsys):
    status, out, _ = run(["rsa", "Compute 12+5-3.", *SMALL_RSA, "--json", "--no-progress", "--reference", "14"], capsys)
    assert status == 0
    result = json.loads(out)
    assert [r["round"] for r in result["rounds"]] == [0, 1] and result["generated_tokens"] > 0
    assert len(result["final_answers"]) == 2 and 0 <= result["mean_accuracy"] <= 1
    status, out, _ = run(["rsa", "Compute 12+5-3.", *SMALL_RSA, "--no-progress"], capsys)
    assert status == 0 and "answer:" in out and "round 1:" in out


def test_rsa_runs_against_an_openai_compatible_endpoint(capsys):
    from test_markovian_rsa_remote import serve

    def respond(path, body):
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]}, {}
        return 200, {"id": "c", "object": "text_completion", "model": body["model"],
                     "choices": [{"index": 0, "text": "<think>\n3+4\n=7\n</think>\n\\boxed{7}", "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 9, "total_tokens": 9}}, {}

    with serve(respond) as url:
        status, out, _ = run(["rsa", "Compute 3+4.", "--endpoint", url, *SMALL_RSA, "--json", "--no-progress"], capsys)
    assert status == 0
    result = json.loads(out)
    assert result["answer"] == "7" and result["generated_tokens"] == 4 * 9


def test_demo_prints_both_methods_and_writes_the_plot(tmp_path, capsys, monkeypatch):
    plot = tmp_path / "demo.png"
    argv = ["demo", "--problems", "2", *SMALL_RSA, "--plot", str(plot), "--json"]
    status, out, _ = run(argv, capsys)
    assert status == 0 and "single rollout" in out and "Markovian RSA" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    measured = json.loads(out.strip().splitlines()[-2])
    assert measured["num_problems"] == 2 and measured["rsa_tokens"] > measured["single_tokens"] > 0
    assert [p["round"] for p in measured["rounds"]] == [0, 1]

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if the extra were not installed
    status, out, _ = run(["demo", "--problems", "1", *SMALL_RSA, "--plot", str(tmp_path / "b.png")], capsys)
    assert status == 0 and "plot skipped" in out and not (tmp_path / "b.png").exists()


def test_quantized_weights_load_with_bfloat16_activations_unless_a_dtype_is_asked_for(tmp_path):
    # torch's int8 / int4 CPU kernels are 4-16x slower on float32 activations (bench_quant_kernels.jsonl).
    def scale_dtype(**options):
        args = argparse.Namespace(**{"model": None, "device": "cpu", "dtype": "auto", "quantize": None, **options})
        model, _ = load_model(args)
        quantized = args.quantize or args.model
        return model.model.layers[0].mlp.experts.gate_up_proj_scale.dtype if quantized else model.dtype

    assert scale_dtype() == torch.float32  # unquantized: float32 on the CPU, as before
    assert scale_dtype(quantize="int8") == torch.bfloat16
    assert scale_dtype(quantize="int8", dtype="float32") == torch.float32  # asked for: kept
    assert main(["quantize", zaya_hf.default_model_path(), str(tmp_path / "int4"), "--bits", "4"]) == 0
    assert scale_dtype(model=str(tmp_path / "int4")) == torch.bfloat16  # a quantized checkpoint, too


def test_bench_times_the_model_against_transformers_zaya(capsys):
    status, out, _ = run(["bench", "--batch-sizes", "1", "--prompt-tokens", "8", "--new-tokens", "3",
                          "--prefill-tokens", "16", "--repeats", "1"], capsys)
    assert status == 0
    result = json.loads(out)
    assert result["greedy_tokens_identical"] is True
    assert result["zaya_hf_decode_tok_s_bs1"] > 0 and "decode_ratio_bs1" in result
    status, out, _ = run(["bench", "--batch-sizes", "2", "--prompt-tokens", "8", "--new-tokens", "2",
                          "--prefill-tokens", "8", "--repeats", "1", "--no-reference"], capsys)
    assert status == 0 and "transformers_decode_tok_s_bs2" not in json.loads(out)


def test_convert_and_export_forward_to_the_checkpoint_tools(tmp_path, capsys):
    source = Path(zaya_hf.default_model_path())
    status, _, _ = run(["convert", str(source), str(tmp_path / "legacy"), "--to", "legacy", "--no-progress"], capsys)
    assert status == 0
    status, _, _ = run(["convert", str(tmp_path / "legacy"), str(tmp_path / "back"), "--no-progress"], capsys)
    assert status == 0
    original, back = load_file(source / "model.safetensors"), {}
    for shard in (tmp_path / "back").glob("*.safetensors"):
        back.update(load_file(shard))
    assert original.keys() == back.keys() and all(original[k].equal(back[k]) for k in original)

    status, _, _ = run(["export", str(source), str(tmp_path / "hub"), "--no-progress"], capsys)
    assert status == 0
    assert "auto_map" in json.loads((tmp_path / "hub" / "config.json").read_text())
    assert (tmp_path / "hub" / "modeling_zaya.py").is_file() and (tmp_path / "hub" / "tokenizer.json").is_file()

    status, _, err = run(["export", str(source), str(tmp_path / "hub"), "--no-progress"], capsys)
    assert status == 2 and "error" in err  # never overwrites
    status, _, err = run(["convert", str(tmp_path / "missing"), str(tmp_path / "out")], capsys)
    assert status != 0 and "missing" in err


def test_markovian_rsa_example_defaults_to_the_embedded_model():
    import os
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[1] / "examples" / "markovian_rsa.py"
    done = subprocess.run([sys.executable, str(example), *SMALL_RSA], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the embedded model on 'Compute" in done.stdout and "round 1: 2 rollouts" in done.stdout
    assert "mean accuracy" in done.stdout  # the held-out problem's answer is the reference
