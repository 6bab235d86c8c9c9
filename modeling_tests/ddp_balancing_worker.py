"""Run by test_training_distributed.py under `torchrun --nproc_per_node 2`: Trainer DDP on CPU (gloo) with the bias
balancer on a tiny ZAYA. Each rank saves its weights, controller state and a fingerprint of the data it saw."""

import sys
from pathlib import Path

import torch
from training_helpers import StrideCorpus, tiny_model, training_args
from transformers import Trainer

from zaya_hf.training import BiasBalancingCallback

output_dir = Path(sys.argv[1])
model = tiny_model()
seen_tokens = []
model.register_forward_pre_hook(lambda module, args, kwargs: seen_tokens.append(kwargs["input_ids"].sum().item()),
                                with_kwargs=True)
callback = BiasBalancingCallback()
args = training_args(output_dir / "run", max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2)
Trainer(model, args, train_dataset=StrideCorpus(256), callbacks=[callback]).train()
torch.save(
    {
        "world_size": args.world_size,
        "state_dict": model.state_dict(),
        "balancer": callback.balancer.state_dict(),
        "seen_tokens": seen_tokens,
    },
    output_dir / f"rank{args.process_index}.pt",
)
