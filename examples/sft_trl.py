"""Supervised fine-tuning of ZAYA with TRL's SFTTrainer on CPU: chat-formatted tiny-reasoner data (solve an
arithmetic problem, or aggregate candidate solutions as in Markovian RSA), the loss on the assistant's tokens only,
a LoRA preset and the bias balancer.

    python examples/sft_trl.py [--max-steps 60] [--targets attention experts router] [--padding-free]

It adapts the embedded model (`zaya_hf.default_model_path()`), saves the adapter, reloads it and prints the held-out
answer loss before and after. On GPUs: `--model Zyphra/ZAYA1-8B` (downloaded by transformers), bf16=True in
SFTConfig, a larger batch and `accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/sft_trl.py`
to shard the training. `--padding-free` packs the rows of a
batch into one sequence (position_ids restarting at 0): exact only once the core handles packed sequences.
"""

import argparse

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import zaya_hf
from zaya_hf.training import (
    LORA_PRESETS,
    BiasBalancer,
    BiasBalancingCallback,
    LoadImbalanceLogger,
    lora_config,
    zaya_routers,
)
from zaya_hf.training.sft import ZAYA_TRAINING_CHAT_TEMPLATE, tiny_reasoner_chats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=zaya_hf.default_model_path())
    parser.add_argument("--output-dir", default="tiny-zaya-sft")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--targets", nargs="+", default=list(LORA_PRESETS), choices=LORA_PRESETS)
    parser.add_argument("--padding-free", action="store_true")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.chat_template = ZAYA_TRAINING_CHAT_TEMPLATE  # same text, with the assistant's tokens marked
    train = Dataset.from_list(tiny_reasoner_chats(1024, seed=0, tokenizer=tokenizer))
    held_out = Dataset.from_list(tiny_reasoner_chats(32, seed=99, tokenizer=tokenizer))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    balancer = BiasBalancer()
    config = SFTConfig(
        args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=8, learning_rate=2e-3,
        lr_scheduler_type="cosine", warmup_steps=args.max_steps // 10, logging_steps=max(1, args.max_steps // 6),
        assistant_only_loss=True, padding_free=args.padding_free, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0, per_device_eval_batch_size=8,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer,
        peft_config=lora_config(args.targets, r=8, alpha=16),
        callbacks=[BiasBalancingCallback(balancer), LoadImbalanceLogger(balancer)],
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"held-out answer loss: {before:.3f} -> {after:.3f}")
    trainer.model.save_pretrained(args.output_dir)
    # The balancer moved the base model's biases, which an adapter does not hold: reload onto a base that has them,
    # and save the merged model (a plain ZayaForCausalLM with the adapted weights and the balanced biases).
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    with torch.no_grad():
        for router, trained in zip(zaya_routers(base), zaya_routers(trainer.model)):
            router.balancing_biases.copy_(trained.balancing_biases)
    reloaded = PeftModel.from_pretrained(base, args.output_dir).merge_and_unload()
    reloaded.save_pretrained(f"{args.output_dir}/merged")
    tokenizer.save_pretrained(f"{args.output_dir}/merged")
    print(f"adapter saved to {args.output_dir}, reloaded, merged and saved to {args.output_dir}/merged")

if __name__ == "__main__":
    main()
