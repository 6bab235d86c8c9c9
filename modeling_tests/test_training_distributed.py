"""Trainer DDP with the bias balancer: 2 CPU processes (gloo) launched with torchrun end in the same state."""

import os
import subprocess
import sys
from pathlib import Path

import torch


def test_ddp_ranks_end_with_identical_biases_and_weights(tmp_path):
    worker = Path(__file__).with_name("ddp_balancing_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
               str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]

    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert len(rank0["seen_tokens"]) == 12  # 6 steps x 2 micro-batches
    assert rank0["seen_tokens"] != rank1["seen_tokens"]  # the ranks trained on different data...
    for name, tensor in rank0["state_dict"].items():  # ...and still hold the same weights and biases
        assert torch.equal(tensor, rank1["state_dict"][name]), name
    for key in ("initial_biases", "integral", "previous_error"):  # the controller saw the all-reduced loads
        assert torch.equal(rank0["balancer"][key], rank1["balancer"][key]), key
    assert rank0["balancer"]["num_steps"] == 6
    biases = [t for name, t in rank0["state_dict"].items() if name.endswith("balancing_biases")]
    assert len(biases) == 2 and not torch.equal(biases[0], rank0["balancer"]["initial_biases"][0])
