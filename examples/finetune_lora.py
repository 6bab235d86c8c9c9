"""Fine-tune ZAYA with LoRA (PEFT) and Trainer on a generated instruction-style task, on CPU: answer a sequence of
tokens with the same sequence reversed. Prompts have different lengths, so batches are padded and only the answer
tokens are learned (the prompt's labels are -100).

    python examples/pretrain_tiny.py --output-dir tiny-zaya-pretrained        # a base model to adapt
    python examples/finetune_lora.py --model tiny-zaya-pretrained [--max-steps 400] [--targets attention experts router]

Without `--model` it adapts the embedded model (`zaya_hf.default_model_path()`, trained on arithmetic: a new task
for it). The adapter is saved to `--output-dir`, reloaded, merged with `merge_and_unload()` (same logits), and the
merged model is saved to `<output-dir>/merged`. On a GPU the same script adapts ZAYA1-8B: `--model Zyphra/ZAYA1-8B`
(downloaded by transformers, not by this package), with a vocabulary of 262k.
"""

import argparse
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import zaya_hf  # registers model_type "zaya" with the Auto classes
from zaya_hf import ZayaForCausalLM
from zaya_hf.tiny_reasoner.data import collate_right_padded
from zaya_hf.training import LORA_PRESETS, lora_config

SEPARATOR = 3  # token between the prompt and the answer; 0-2 are pad / bos / eos


class ReverseTask(Dataset):
    """`prompt SEP reversed(prompt) EOS` with prompts of 4-12 tokens; labels only on the answer and EOS."""

    def __init__(self, num_rows: int, vocab_size: int, eos_token_id: int, seed: int, vocab_used: int = 64):
        gen = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(num_rows):
            length = int(torch.randint(4, 13, (), generator=gen))
            prompt = torch.randint(4, min(vocab_size, 4 + vocab_used), (length,), generator=gen).tolist()
            answer = prompt[::-1] + [eos_token_id]
            input_ids = prompt + [SEPARATOR] + answer
            labels = [-100] * (length + 1) + answer
            self.rows.append({"input_ids": input_ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


def load_base_model(path: str | None) -> ZayaForCausalLM:
    if path is not None:
        return AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    print("no --model given: adapting the embedded model (zaya_hf.default_model_path())")
    return AutoModelForCausalLM.from_pretrained(zaya_hf.default_model_path(), dtype=torch.float32)


@torch.no_grad()
def answer_loss(model, collator, rows) -> float:
    """Mean loss on the answer tokens of `rows`, in eval mode."""
    model.eval()
    batch = {k: v.to(model.device) for k, v in collator(list(rows)).items()}
    return model(**batch).loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base checkpoint (folder or Hub id); default: the embedded model")
    parser.add_argument("--output-dir", default="tiny-zaya-lora")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--targets", nargs="+", default=list(LORA_PRESETS), choices=LORA_PRESETS)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args()
    if args.model is not None and not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: no such folder (this example loads local folders only)")

    base = load_base_model(args.model)
    config = base.config
    model = get_peft_model(base, lora_config(args.targets, r=args.rank, alpha=2 * args.rank))
    model.print_trainable_parameters()

    train_data = ReverseTask(4096, config.vocab_size, config.eos_token_id, seed=0)
    held_out = ReverseTask(64, config.vocab_size, config.eos_token_id, seed=1)
    collator = partial(collate_right_padded, pad_token_id=config.pad_token_id)

    training_args = TrainingArguments(
        args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=16,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(20, args.max_steps // 10),
        logging_steps=max(1, min(50, args.max_steps // 4)),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=0,
    )
    loss_before = answer_loss(model, collator, held_out)
    Trainer(model, training_args, train_dataset=train_data, data_collator=collator).train()
    loss_after = answer_loss(model, collator, held_out)
    print(f"held-out answer loss: {loss_before:.3f} -> {loss_after:.3f}")

    model.save_pretrained(args.output_dir)
    sample = {k: v.to(model.device) for k, v in collator(held_out.rows[:8]).items()}
    with torch.no_grad():
        adapted_logits = model(input_ids=sample["input_ids"], attention_mask=sample["attention_mask"]).logits
        reloaded = PeftModel.from_pretrained(load_base_model(args.model), args.output_dir).to(model.device).eval()
        merged = reloaded.merge_and_unload()
        merged_logits = merged(input_ids=sample["input_ids"], attention_mask=sample["attention_mask"]).logits
    difference = (merged_logits - adapted_logits).abs().max().item()
    print(f"adapter saved to {args.output_dir}; merged vs adapted logits: max |difference| = {difference:.2e}")
    merged.save_pretrained(Path(args.output_dir) / "merged")
    print(f"merged model saved to {Path(args.output_dir) / 'merged'}")


if __name__ == "__main__":
    main()
