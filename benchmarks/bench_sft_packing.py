"""Tokens per second of TRL SFT on ZAYA, padded batches against padding-free (packed) ones, on the tiny-reasoner chats.

The same model (the embedded one, with a LoRA adapter on every preset), data, batch size and steps; only
`padding_free` differs. Counts the assistant and prompt tokens that are not padding (`num_input_tokens_seen` is not
used: it counts padding too). Prints and writes one JSON object. Meaningful only once the core computes packed
sequences exactly (position_ids restarting at 0); until then the packed run's loss is not the padded one's.

    python benchmarks/bench_sft_packing.py [--steps 30] [--output benchmarks/results/bench_sft_packing.json]
"""

import argparse
import json
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

import zaya_hf
from zaya_hf.training import lora_config
from zaya_hf.training.sft import ZAYA_TRAINING_CHAT_TEMPLATE, tiny_reasoner_chats


class RealTokens(TrainerCallback):
    """Counts the non-padding tokens of every training batch (through a forward pre-hook on the model)."""

    def __init__(self, model, pad_token_id: int):
        self.tokens = 0

        def count(module, args, kwargs):
            ids = kwargs["input_ids"]
            self.tokens += int(ids.numel() if "position_ids" in kwargs and ids.shape[0] == 1 else (ids != pad_token_id).sum())

        model.register_forward_pre_hook(count, with_kwargs=True)


def run(padding_free: bool, steps: int, rows: list[dict], tokenizer) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(zaya_hf.default_model_path(), dtype=torch.float32)
    args = SFTConfig(
        "/tmp/bench-sft-packing", max_steps=steps, per_device_train_batch_size=8, learning_rate=2e-3,
        logging_steps=steps, assistant_only_loss=True, padding_free=padding_free, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora_config(r=8, alpha=16))
    counter = RealTokens(trainer.model, tokenizer.pad_token_id)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"padding_free": padding_free, "seconds": round(seconds, 2), "real_tokens": counter.tokens,
            "tokens_per_second": round(counter.tokens / seconds, 1), "train_loss": trainer.state.log_history[-1]["train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output", default="benchmarks/results/bench_sft_packing.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(zaya_hf.default_model_path())
    tokenizer.chat_template = ZAYA_TRAINING_CHAT_TEMPLATE
    rows = tiny_reasoner_chats(8 * args.steps, seed=0, tokenizer=tokenizer)
    padded, packed = run(False, args.steps, rows, tokenizer), run(True, args.steps, rows, tokenizer)
    result = {
        "command": f"python benchmarks/bench_sft_packing.py --steps {args.steps}",
        "torch": torch.__version__,
        "padded": padded,
        "packed": packed,
        "packed_over_padded_tokens_per_second": round(packed["tokens_per_second"] / padded["tokens_per_second"], 3),
    }
    print(json.dumps(result, indent=1))
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
