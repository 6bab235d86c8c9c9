"""Full fine-tuning of ZAYA sharded with FSDP2 (`fully_shard`, one ZayaDecoderLayer per unit), bf16 compute, activation
checkpointing, the bias balancer and sharded checkpoints, on CPU processes (gloo) or GPUs (NCCL).

    torchrun --nproc_per_node 2 examples/finetune_fsdp.py [--max-steps 40] [--output-dir tiny-zaya-fsdp]
    torchrun --nproc_per_node 2 examples/finetune_fsdp.py --resume tiny-zaya-fsdp/checkpoint-20

It fine-tunes every weight of the embedded model (`zaya_hf.default_model_path()`) on the tiny-reasoner chats (the
loss on the answers only), saves a sharded checkpoint (torch.distributed.checkpoint: weights, AdamW state and the
balancer's state) every `--save-steps`, and the final model with `save_pretrained`.

On GPUs: the same command with `--model Zyphra/ZAYA1-8B` and one process per GPU (the model is moved to
`cuda:LOCAL_RANK`), or Trainer / TRL with `accelerate launch --config_file examples/accelerate_fsdp2.yaml`, which
applies the same sharding. On CPU accelerate 1.15 does not enable FSDP (it falls back to DDP), hence this loop.
Tested here on 2 CPU processes only; untested on GPUs.
"""

import argparse
import itertools
import os
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

import zaya_hf
from zaya_hf.tiny_reasoner.data import ExampleBuilder, collate_right_padded
from zaya_hf.tiny_reasoner.task import iter_problems
from zaya_hf.training import BiasBalancer, expert_load_imbalance
from zaya_hf.training.fsdp import load_sharded, save_sharded, shard_zaya


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=zaya_hf.default_model_path())
    parser.add_argument("--output-dir", default="tiny-zaya-fsdp")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--save-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch, split over the ranks")
    parser.add_argument("--resume", default=None, help="a checkpoint-N folder written by this script")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}") if on_gpu else torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    model.activation_checkpointing_enable()
    model = shard_zaya(model, param_dtype=torch.bfloat16)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    balancer = BiasBalancer()
    start = 0
    if args.resume:
        load_sharded(args.resume, model, optimizer, balancer)
        start = balancer.num_steps  # one balancer step per optimizer step

    builder = ExampleBuilder(tokenizer)
    collate = partial(collate_right_padded, pad_token_id=tokenizer.pad_token_id)
    problems = iter_problems(0, "train")
    per_rank = args.batch_size // world
    for step in range(args.max_steps):
        examples = [builder.solve(problem) for problem in itertools.islice(problems, args.batch_size)]
        if step < start:
            continue  # the data of the steps before the checkpoint
        batch = {k: v.to(device) for k, v in collate(examples[rank * per_rank : (rank + 1) * per_rank]).items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        load = balancer.step(model)
        if rank == 0 and (step + 1) % 10 == 0:
            print(f"step {step + 1}: loss {loss.item():.3f}, expert load imbalance (worst layer) "
                  f"{expert_load_imbalance(load).max().item():.2f}")
        if (step + 1) % args.save_steps == 0:
            save_sharded(f"{args.output_dir}/checkpoint-{step + 1}", model, optimizer, balancer)

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # a plain checkpoint, loadable without FSDP
        plain = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        plain.load_state_dict(full)
        plain.save_pretrained(f"{args.output_dir}/final")
        tokenizer.save_pretrained(f"{args.output_dir}/final")
        print(f"saved to {args.output_dir}/final")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
