"""Smoke runs of the training examples: pre-train a few steps, then LoRA-fine-tune the result a few steps."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_pretrain_then_finetune_lora(tmp_path):
    pytest.importorskip("peft")
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    out = run_example("pretrain_tiny.py", "--max-steps", "4", "--output-dir", str(base))
    assert "held-out loss" in out and len(re.findall(r"layer \d: expert load", out)) == 4
    assert (base / "config.json").is_file() and (base / "model.safetensors").is_file()

    out = run_example("finetune_lora.py", "--model", str(base), "--max-steps", "4", "--output-dir", str(adapter))
    difference = float(re.search(r"max \|difference\| = (\S+)", out).group(1))
    assert difference < 1e-4
    assert (adapter / "adapter_config.json").is_file() and (adapter / "merged" / "config.json").is_file()
