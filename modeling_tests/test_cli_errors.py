"""`zaya-hf` on expected failures (issue 19's CLI table): one line naming the problem, exit status 2, no traceback,
and nothing left behind."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import SMALL_RSA, run

import zaya_hf

SOURCE = Path(zaya_hf.default_model_path())


def assert_one_line_error(status: int, err: str, command: str, message: str) -> None:
    assert status == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # transformers may log its load report above
    assert last.startswith(f"zaya-hf {command}: error: "), err
    assert message in last, err


def test_generate_with_an_empty_raw_prompt(capsys):
    status, _, err = run(["generate", "", "--raw"], capsys)
    assert_one_line_error(status, err, "generate", "the prompt is empty")


def test_generate_past_the_model_context(capsys):
    status, _, err = run(["generate", "Compute 1+1.", "--max-new-tokens", "4096"], capsys)
    assert_one_line_error(status, err, "generate", "past max_position_embeddings (2048): lower max_new_tokens")


def _copy(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(SOURCE, folder)
    edit(folder / "model.safetensors")
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:50])


def _int64(path: Path) -> None:
    state = load_file(path)
    state["model.layers.1.mlp.experts.down_proj"] = state["model.layers.1.mlp.experts.down_proj"].to(torch.int64)
    save_file(state, path, metadata={"format": "pt"})


def _nan_experts(path: Path) -> None:
    state = load_file(path)
    state["model.layers.2.mlp.experts.down_proj"] = torch.full_like(state["model.layers.2.mlp.experts.down_proj"], float("nan"))
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, message",
    [(_truncate, "model.safetensors is truncated or corrupt"), (_int64, "down_proj is stored as int64")],
    ids=["truncated", "int64"],
)
def test_generate_with_a_broken_checkpoint_names_the_file_or_tensor(tmp_path, capsys, edit, message):
    folder = _copy(tmp_path, edit)
    status, _, err = run(["generate", "hi", "--model", str(folder)], capsys)
    assert_one_line_error(status, err, "generate", message)


def test_rsa_endpoint_failing_mid_run(capsys):
    from test_markovian_rsa_remote import serve

    answered = []

    def respond(path, body):
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]}, {}
        answered.append(path)
        if len(answered) > 2:  # round 0 done, then the server breaks
            return 400, {"error": {"message": "model crashed", "type": "invalid_request_error"}}, {}
        return 200, {"id": "c", "object": "text_completion", "model": body["model"],
                     "choices": [{"index": 0, "text": "\\boxed{7}", "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}, {}

    with serve(respond) as url:
        status, _, err = run(["rsa", "Compute 3+4.", "--endpoint", url, *SMALL_RSA, "--no-progress"], capsys)
    assert_one_line_error(status, err, "rsa", f"--endpoint {url}: ")
    assert "HTTP 400" in err and len(answered) >= 3


def test_rsa_names_the_tokenizer_flag(tmp_path, capsys):
    status, _, err = run(["rsa", "q", "--endpoint", "http://127.0.0.1:9", "--tokenizer", str(tmp_path / "nope")], capsys)
    assert_one_line_error(status, err, "rsa", f"--tokenizer {tmp_path / 'nope'}: no such folder")


def test_refused_conversions_exit_2_and_leave_nothing(tmp_path, capsys):
    nan = _copy(tmp_path, _nan_experts)
    deep = tmp_path / "a" / "b" / "out"
    status, _, err = run(["convert", str(nan), str(deep), "--to", "legacy", "--no-progress"], capsys)
    assert_one_line_error(status, err, "convert", "model.layers.2.mlp.experts.down_proj holds 131072 NaN/inf value(s)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no output, no empty parent folders
    status, _, err = run(["convert", str(tmp_path / "missing"), str(deep)], capsys)
    assert_one_line_error(status, err, "convert", f"{tmp_path / 'missing'}: no such folder")
    status, _, err = run(["convert", str(SOURCE), str(tmp_path / "same"), "--no-progress"], capsys)
    assert_one_line_error(status, err, "convert", "already in the current layout")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    status, _, err = run(["export", str(SOURCE), str(tmp_path / "taken"), "--no-progress"], capsys)
    assert_one_line_error(status, err, "export", "not an empty folder")
    assert json.loads((SOURCE / "config.json").read_text())["model_type"] == "zaya"
