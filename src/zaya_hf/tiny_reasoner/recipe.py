"""The recipe of the embedded model: tokenizer, a small ZAYA, supervised training with `Trainer`, then optionally
GRPO with TRL (`rl.py`), on CPU.

`examples/train_tiny_reasoner.py` runs `train_tiny_reasoner(TinyReasonerRecipe())`; the shipped model in
`zaya_hf/default_model/` is its output (weights stored in bf16).
"""

import dataclasses
import functools
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from ..configuration_zaya import ZayaConfig
from ..modeling_zaya import ZayaForCausalLM
from ..training import BiasBalancingCallback, LoadImbalanceLogger, expert_load_imbalance
from .data import AggregationMix, ExampleBuilder, TinyReasonerStream, collate_right_padded, tokenizer_corpus, train_tokenizer
from .evaluation import evaluate_greedy
from .rl import RLRecipe, train_grpo
from .task import TaskSpec, held_out_problems


@dataclass
class TinyReasonerRecipe:
    """Everything that determines the trained model. The defaults are the shipped model's recipe."""

    seed: int = 0
    # tokenizer
    vocab_size: int = 512
    tokenizer_problems: int = 4000
    # model: every ZAYA component (CCA, both layer types, several experts, the MLP router with its skip class)
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    num_experts: int = 4
    moe_intermediate_size: int = 256
    router_hidden_size: int = 32
    sliding_window: int = 64
    # optimisation. At 1,500 steps the model is undertrained, and how far it gets varies by tens of points from one
    # CPU to another; 3,000 steps reached 96-100% greedy held-out accuracy with shares 0, 0.2 and 0.35, and 4,500
    # steps 99.2% with 0.5 (benchmarks/results/tiny_reasoner_sft_steps.json).
    max_steps: int = 4500
    batch_size: int = 16
    learning_rate: float = 2e-3
    # The PID controller on `balancing_biases` (zaya_hf.training.BiasBalancer); without it the routers of this
    # model collapse onto one or two experts per layer.
    bias_balancing: bool = True
    warmup_steps: int = 60
    weight_decay: float = 0.01
    # The share of aggregation batches. Measured on 256 held-out problems (rsa_codesign_sft_*_256.txt): at 3,000
    # steps 0.2 and 0.35 solve well but aggregate little better than they re-solve, and 0.5 aggregates best but
    # solves poorly (greedy 49.2%); at 4,500 steps 0.5 does both (greedy 99.2%, Markovian RSA +2.1 [+0.9, +3.3] over
    # single rollout), while the share-0 control of the same budget cannot aggregate at all.
    aggregation_fraction: float = 0.5
    task: TaskSpec = field(default_factory=TaskSpec)
    aggregation: AggregationMix = field(default_factory=AggregationMix)
    # The GRPO stage after supervised training; off in the shipped recipe (the shipped model is supervised only),
    # `rl=RLRecipe()` runs the stage's defaults.
    rl: RLRecipe = field(default_factory=lambda: RLRecipe(max_steps=0))

    def model_config(self, tokenizer) -> ZayaConfig:
        vocab = -(-len(tokenizer) // 64) * 64  # embedding rows rounded up to a multiple of 64
        return ZayaConfig(
            vocab_size=vocab,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            num_experts=self.num_experts,
            moe_intermediate_size=self.moe_intermediate_size,
            router_hidden_size=self.router_hidden_size,
            layer_types=["hybrid", "hybrid_sliding"] * (self.num_hidden_layers // 2)
            + ["hybrid"] * (self.num_hidden_layers % 2),
            sliding_window=self.sliding_window,
            max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )


def train_tiny_reasoner(
    recipe: TinyReasonerRecipe,
    output_dir: str | os.PathLike,
    *,
    eval_problems: int = 64,
    save_dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> dict:
    """Train the tokenizer and the model of `recipe` (supervised, then GRPO when `recipe.rl.max_steps`), save both to `output_dir` and return a
    summary (run time of each stage, parameter count, final loss, the RL reward curve, greedy accuracy on
    `eval_problems` held-out problems)."""
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    tokenizer = train_tokenizer(
        tokenizer_corpus(recipe.seed, recipe.tokenizer_problems, recipe.task), recipe.vocab_size
    )
    model = ZayaForCausalLM(recipe.model_config(tokenizer))
    dataset = TinyReasonerStream(
        ExampleBuilder(tokenizer, recipe.aggregation),
        seed=recipe.seed,
        batch_size=recipe.batch_size,
        aggregation_fraction=recipe.aggregation_fraction,
        spec=recipe.task,
    )
    with tempfile.TemporaryDirectory(prefix="zaya-tiny-reasoner-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=recipe.max_steps,
            per_device_train_batch_size=recipe.batch_size,
            learning_rate=recipe.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=recipe.warmup_steps,
            weight_decay=recipe.weight_decay,
            adam_beta2=0.98,
            max_grad_norm=1.0,
            logging_steps=max(1, min(25, recipe.max_steps // 10)),
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=recipe.seed,
            data_seed=recipe.seed,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=not progress,
        )
        balancing = BiasBalancingCallback() if recipe.bias_balancing else None
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=functools.partial(collate_right_padded, pad_token_id=tokenizer.pad_token_id),
            callbacks=[balancing, LoadImbalanceLogger(balancing.balancer)] if balancing else None,
        )
        train_output = trainer.train()
    sft_seconds = time.perf_counter() - start
    rl_summary = None
    if recipe.rl.max_steps:
        # RL starts from the supervised weights as they would be saved (bf16), so that this run and the two-stage
        # one (`--rl-steps 0`, then `examples/grpo_tiny_reasoner.py --model` on its output) give the same model.
        model.to(save_dtype).to(torch.float32)
        model, rl_summary = train_grpo(model, tokenizer, recipe.rl, recipe.task, recipe.seed, progress=progress)
    train_seconds = time.perf_counter() - start

    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.max_new_tokens = 128
    output_dir = Path(output_dir)
    save_without_remote_code(model.to(save_dtype), output_dir)
    tokenizer.save_pretrained(output_dir)
    model.to(torch.float32)
    problems = held_out_problems(eval_problems, spec=recipe.task) if eval_problems else []
    accuracy = evaluate_greedy(model, tokenizer, problems) if problems else None
    summary = {
        "train_seconds": round(train_seconds, 1),
        "sft_seconds": round(sft_seconds, 1),
        "threads": torch.get_num_threads(),
        "max_steps": recipe.max_steps,
        "final_loss": round(train_output.training_loss, 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "held_out_greedy_accuracy": accuracy,
        "held_out_problems": len(problems),
        # max / mean expert load per layer over the last supervised step (1.0 = perfectly balanced)
        "expert_load_imbalance": None if balancing is None else [
            round(x, 3) for x in expert_load_imbalance(balancing.balancer.last_load).tolist()
        ],
        "rl": rl_summary,
        "recipe": dataclasses.asdict(recipe),
    }
    (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def save_without_remote_code(model: ZayaForCausalLM, output_dir: Path) -> None:
    """`save_pretrained` minus the modeling files and `auto_map` it adds for the Hub: the embedded model is loaded
    by the installed package, and Python files in its data folder would be a second copy of the package code."""
    model.save_pretrained(output_dir)
    for code in output_dir.glob("*.py"):
        code.unlink()
    config_file = output_dir / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("auto_map", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


__all__ = ["TinyReasonerRecipe", "save_without_remote_code", "train_tiny_reasoner"]
