"""The RL stage of the embedded model: GRPO (TRL) with the task's answer checker as the reward, like ZAYA1-8B's RL.

A share of the steps are Markovian RSA aggregation steps: their prompts hold C tails of τ tokens of the model's own
earlier rollouts of a problem (the demo's C and τ), in the template and tail extraction that inference uses, and
the reward is the aggregated answer's correctness. The others are plain problems, whose number of operations adapts
to the pass rate (`zaya_hf.training.grpo.AdaptiveDifficulty`). The PID bias balancer keeps running on the routers.
"""

import dataclasses
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..training import BiasBalancingCallback, expert_load_imbalance
from ..training.grpo import AdaptiveDifficulty, BoxedAnswerReward, RLPromptStream, RolloutPool, rl_dataset
from . import DEMO_RSA_SETTINGS
from .task import TaskSpec, sample_problem


@dataclass
class RLRecipe:
    """The GRPO stage. `max_steps=0` skips it."""

    max_steps: int = 300
    prompts_per_step: int = 8
    num_generations: int = 8  # G rollouts per prompt (>= subset_size: an aggregation prompt draws C of them)
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    # KL coefficient to the starting model (TRL's `beta`; 0: no reference model, TRL's default)
    beta: float = 0.0
    # the rollout budget and sampling of Markovian RSA in the demo (β, temperature 1.0)
    max_completion_length: int = DEMO_RSA_SETTINGS["rollout_tokens"]
    temperature: float = 1.0
    # a fraction of the steps aggregate C tails of τ tokens of the model's own rollouts (0.0: plain problems only)
    aggregation_fraction: float = 0.5
    subset_size: int = DEMO_RSA_SETTINGS["subset_size"]
    tail_tokens: int = DEMO_RSA_SETTINGS["tail_tokens"]
    # Difficulty: up to `max_operations` operations once the current top level is solved at `raise_threshold`.
    # 6 operations is the longest chain whose solution (about 78 tokens) fits the 96-token budget.
    max_operations: int = 6
    raise_threshold: float = 0.75
    raise_attempts: int = 128
    # The bias balancer keeps running, with a gentler integral gain than supervised training's ki=1: on the shipped
    # model (expert load imbalance 2.2-3.2 after supervised training) ki=1 re-balanced the routers within a few
    # steps and the solve rate fell from 17% to 0% by step 12 (benchmarks/results/grpo_balancer_gain.json; measured while
    # the routers also counted the rollouts' padding, fixed since in `ZayaForCausalLM.generate`).
    bias_balancing: bool = True
    balancer_ki: float = 0.05
    # LoRA on these `zaya_hf.training.lora_config` targets instead of full weights (None: full weights)
    lora_targets: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("max_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("prompts_per_step", "num_generations", "max_completion_length", "subset_size", "tail_tokens",
                     "max_operations", "raise_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("balancer_ki", "beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not 0.0 <= self.aggregation_fraction <= 1.0:
            raise ValueError(f"aggregation_fraction must be in [0, 1], got {self.aggregation_fraction}.")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (GRPO's advantages compare a prompt's rollouts), got "
                             f"{self.num_generations}.")
        if self.num_generations < self.subset_size:
            raise ValueError(
                f"num_generations ({self.num_generations}) must be >= subset_size ({self.subset_size}): an aggregation "
                "prompt draws its C candidates from one problem's rollouts."
            )


def task_sampler(spec: TaskSpec):
    """`(level, rng) -> (question, answer)`: a training-split problem of `spec` with up to `level` operations."""

    def sample(level: int, rng: random.Random) -> tuple[str, str]:
        level_spec = dataclasses.replace(spec, max_operations=level)
        while True:
            problem = sample_problem(rng, level_spec)
            if not problem.is_held_out:
                return problem.question, str(problem.answer)

    return sample


def train_grpo(model, tokenizer, recipe: RLRecipe, spec: TaskSpec, seed: int, progress: bool = True):
    """Run the GRPO stage on `model`; returns `(model, summary)`: the trained model (the same object with full
    weights, the merged one with LoRA) and the run's seconds, logged reward curve, difficulty and expert balance."""
    from trl import GRPOConfig, GRPOTrainer

    start = time.perf_counter()
    difficulty = AdaptiveDifficulty(
        spec.min_operations, spec.max_operations, max(recipe.max_operations, spec.max_operations),
        threshold=recipe.raise_threshold, min_attempts=recipe.raise_attempts,
    )
    pool = RolloutPool(tokenizer, recipe.subset_size, recipe.tail_tokens) if recipe.aggregation_fraction else None
    stream = RLPromptStream(
        task_sampler(spec), difficulty, recipe.prompts_per_step, seed, pool, recipe.aggregation_fraction
    )
    peft_config = None
    if recipe.lora_targets:
        from ..training import lora_config

        peft_config = lora_config(recipe.lora_targets)
    balancing = BiasBalancingCallback(ki=recipe.balancer_ki) if recipe.bias_balancing else None
    with tempfile.TemporaryDirectory(prefix="zaya-grpo-") as scratch:
        starting_path = model.config._name_or_path
        if recipe.beta and peft_config is None:
            # TRL loads the KL reference with `from_pretrained(config._name_or_path)`: the starting weights as they
            # are in memory (with LoRA, TRL disables the adapters instead).
            model.save_pretrained(Path(scratch) / "reference")
            model.config._name_or_path = str(Path(scratch) / "reference")
        args = GRPOConfig(
            output_dir=scratch,
            max_steps=recipe.max_steps,
            per_device_train_batch_size=recipe.prompts_per_step * recipe.num_generations,
            num_generations=recipe.num_generations,
            max_completion_length=recipe.max_completion_length,
            temperature=recipe.temperature,
            learning_rate=recipe.learning_rate,
            beta=recipe.beta,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=recipe.warmup_steps,
            shuffle_dataset=False,  # the stream is random already, and must not be read ahead (rl_dataset)
            gradient_checkpointing=False,  # a small model: recomputing the forward only costs time
            bf16=False,
            use_cpu=not torch.cuda.is_available(),
            logging_steps=max(1, min(10, recipe.max_steps // 10)),
            save_strategy="no",
            report_to=[],
            seed=seed,
            data_seed=seed,
            disable_tqdm=not progress,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=BoxedAnswerReward(difficulty, pool),
            args=args,
            train_dataset=rl_dataset(stream),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[balancing] if balancing else None,
        )
        model.config._name_or_path = starting_path  # the reference is loaded by now
        trainer.train()
    if peft_config is not None:  # ship plain weights: fold the adapters in
        model = trainer.model.merge_and_unload()
    log = [
        {key: round(value, 4) if isinstance(value, float) else value for key, value in entry.items()
         if key in ("step", "reward", "accuracy/solve", "accuracy/aggregate", "difficulty/high",
                    "completions/mean_length", "kl")}
        for entry in trainer.state.log_history if "reward" in entry
    ]
    summary = {
        "seconds": round(time.perf_counter() - start, 1),
        "steps": trainer.state.global_step,
        "log": log,
        "difficulty": difficulty.state(),
        # max / mean expert load per layer at the last step (1.0 = perfectly balanced)
        "expert_load_imbalance": None if balancing is None else [
            round(x, 3) for x in expert_load_imbalance(balancing.balancer.last_load).tolist()
        ],
    }
    return model, summary


__all__ = ["RLRecipe", "task_sampler", "train_grpo"]
