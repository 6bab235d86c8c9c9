"""Run by test_training_fsdp.py under `torchrun --nproc_per_node N` (gloo): FSDP2 full fine-tuning of a tiny ZAYA
with bf16 compute, activation checkpointing and the bias balancer, on a global batch of 8 rows split over the ranks.

It trains 8 steps straight, saving a sharded checkpoint after step 4; then builds a fresh model and optimizer,
resumes from that checkpoint and trains steps 5-8 again; then trains 8 steps straight in fp32 (`--fp32-only`: only
that), the run to compare across world sizes. Each rank saves its losses, its biases (and their dtype) after every
step, the balancer states and, gathered, the final weights of every run.

    fsdp_balancing_worker.py OUTPUT_DIR [--fp32-only]
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from training_helpers import StrideCorpus, tiny_model

from zaya_hf.training import BiasBalancer, zaya_routers
from zaya_hf.training.fsdp import load_sharded, save_sharded, shard_zaya

GLOBAL_BATCH, STEPS, SAVE_AFTER = 8, 8, 4

output_dir = Path(sys.argv[1])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
rows = StrideCorpus(GLOBAL_BATCH * STEPS).input_ids  # [64, 32]


def fresh(param_dtype=torch.bfloat16):
    # initializer_range 0.1: at the usual 0.02 this router's probabilities round to the same bf16 values (all ties).
    model = tiny_model(initializer_range=0.1)
    model.activation_checkpointing_enable()
    model = shard_zaya(model, param_dtype=param_dtype)
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3), BiasBalancer()


def train(model, optimizer, balancer, steps, record):
    for step in steps:
        per_rank = GLOBAL_BATCH // world
        batch = rows[step * GLOBAL_BATCH + rank * per_rank : step * GLOBAL_BATCH + (rank + 1) * per_rank]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        balancer.step(model)
        record["losses"].append(loss.item())
        record["biases"].append(torch.stack([r.balancing_biases.detach().clone() for r in zaya_routers(model)]))
        if step + 1 == SAVE_AFTER and "checkpoint" in record:
            save_sharded(record["checkpoint"], model, optimizer, balancer)


def finish(model, balancer, record):
    record["state_dict"] = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    record["balancer"] = balancer.state_dict()
    record.pop("checkpoint", None)
    return record


runs = {}
if "--fp32-only" not in sys.argv:
    runs["straight"] = {"losses": [], "biases": [], "checkpoint": output_dir / "checkpoint-4"}
    model, optimizer, balancer = fresh()
    train(model, optimizer, balancer, range(STEPS), runs["straight"])
    finish(model, balancer, runs["straight"])

    runs["resumed"] = {"losses": [], "biases": []}
    model, optimizer, balancer = fresh()
    load_sharded(output_dir / "checkpoint-4", model, optimizer, balancer)
    train(model, optimizer, balancer, range(SAVE_AFTER, STEPS), runs["resumed"])
    finish(model, balancer, runs["resumed"])

runs["fp32"] = {"losses": [], "biases": []}
model, optimizer, balancer = fresh(param_dtype=torch.float32)
train(model, optimizer, balancer, range(STEPS), runs["fp32"])
finish(model, balancer, runs["fp32"])

torch.save({"world_size": world, **runs}, output_dir / f"rank{rank}.pt")
dist.destroy_process_group()
