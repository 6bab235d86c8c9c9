"""Pre-train a tiny ZAYA from scratch with Trainer and bias balancing of the routers, on CPU, on a synthetic
Markov language it generates (every token has four likely successors).

    python examples/pretrain_tiny.py [--max-steps 600] [--output-dir tiny-zaya-pretrained] [--rule pid|sign] [--no-balancer]

Prints the loss, then each layer's expert load (fractions of the held-out tokens per expert, skip class last) and
its imbalance (max / mean expert load, 1.0 = perfect), and saves the model with `save_pretrained`. Run it with
`--no-balancer` to see the routers drift without the controller. Under `torchrun` / `accelerate launch` the same
script trains with DDP; the balancer all-reduces the loads so that every rank applies the same bias update.
"""

import argparse

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from zaya_hf import ZayaConfig, ZayaForCausalLM
from zaya_hf.training import (
    BiasBalancer,
    BiasBalancingCallback,
    LoadImbalanceLogger,
    collect_router_loads,
    expert_load_imbalance,
)


class MarkovLanguage(Dataset):
    """Token sequences from a fixed random bigram chain: each token is followed by one of four successors with
    probabilities 0.5 / 0.25 / 0.15 / 0.1, so the best achievable loss is about 1.2 nats per token."""

    def __init__(self, num_rows: int, seq_len: int, vocab_size: int, seed: int):
        chain = torch.Generator().manual_seed(1234)  # the same language for every split
        successors = torch.randint(3, vocab_size, (vocab_size, 4), generator=chain)
        probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.empty(num_rows, seq_len, dtype=torch.long)
        tokens[:, 0] = torch.randint(3, vocab_size, (num_rows,), generator=gen)
        for t in range(1, seq_len):
            pick = torch.multinomial(probs.expand(num_rows, 4), 1, generator=gen)[:, 0]
            tokens[:, t] = successors[tokens[:, t - 1], pick]
        self.input_ids = tokens

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.input_ids[index]}


@torch.no_grad()
def held_out_loads(model: ZayaForCausalLM, input_ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(loss, tokens per router class [L, E+1]) on held-out data; training mode only so that the routers count."""
    model.train()
    collect_router_loads(model)  # drop whatever the last training step left
    loss = model(input_ids=input_ids, labels=input_ids).loss.item()
    return loss, collect_router_loads(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--output-dir", default="tiny-zaya-pretrained")
    parser.add_argument("--no-balancer", action="store_true", help="train without the bias balancer")
    parser.add_argument("--rule", choices=BiasBalancer.RULES, default="pid", help="the balancer's update rule")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()

    # initializer_range 0.1 ~ 1/sqrt(width) suits a 64-wide model; transformers' usual 0.02 (made for widths in the
    # thousands) leaves this router's probabilities within 1e-4 of uniform, and it learns to route only slowly.
    config = ZayaConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=8, moe_intermediate_size=64, router_hidden_size=32,
        layer_types=["hybrid", "hybrid_sliding"] * 2, sliding_window=16, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = ZayaForCausalLM(config)
    train_data = MarkovLanguage(8192, args.seq_len, config.vocab_size, seed=0)
    held_out = MarkovLanguage(64, args.seq_len, config.vocab_size, seed=1).input_ids

    callbacks = []
    if not args.no_balancer:
        balancer = BiasBalancer(rule=args.rule)  # target: uniform over experts, skip 0
        callbacks = [BiasBalancingCallback(balancer), LoadImbalanceLogger(balancer)]
    training_args = TrainingArguments(
        args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=min(50, args.max_steps // 10),
        weight_decay=0.01,
        logging_steps=max(1, min(50, args.max_steps // 4)),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model, training_args, train_dataset=train_data, callbacks=callbacks)

    loss_before, _ = held_out_loads(model, held_out)
    trainer.train()
    loss_after, loads = held_out_loads(model, held_out)
    model.eval()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():  # under DDP every rank holds the same model
        print(f"held-out loss: {loss_before:.3f} -> {loss_after:.3f} (the chain's entropy is about 1.2)")
        fractions = loads.float() / loads.sum(-1, keepdim=True)
        for layer, (row, imbalance) in enumerate(zip(fractions, expert_load_imbalance(loads))):
            print(f"layer {layer}: expert load {[round(x, 3) for x in row.tolist()]}, max/mean {imbalance:.2f}")
        print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
