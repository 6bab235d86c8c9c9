"""GRPO (TRL) on the embedded model's task: verifiable `\\boxed{}` rewards, difficulty that follows the pass rate, and
Markovian RSA aggregation prompts built from the model's own rollouts. CPU only, offline.

    python examples/grpo_tiny_reasoner.py --out my-rl-model --max-steps 20     # a few minutes on one thread
    python examples/grpo_tiny_reasoner.py --model my-sft-model --out my-rl-model  # the recipe's RL stage on a model

It starts from `--model` (default: the embedded model, which is supervised only; `train_tiny_reasoner.py --rl-steps N`
runs this same stage after supervised training), prints the logged reward curve and the held-out accuracy before and
after (greedy, and the mean of `--eval-samples` sampled rollouts per problem: what the reward measures), and saves
the model (bf16), tokenizer and `rl_summary.json` to `--out`.
"""

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import zaya_hf
from zaya_hf.tiny_reasoner.evaluation import evaluate_greedy, evaluate_sampled
from zaya_hf.tiny_reasoner.recipe import save_without_remote_code
from zaya_hf.tiny_reasoner.rl import RLRecipe, train_grpo
from zaya_hf.tiny_reasoner.task import TaskSpec, held_out_problems
from zaya_hf.training import LORA_PRESETS


def main(argv: list[str] | None = None) -> dict:
    defaults = RLRecipe()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=zaya_hf.default_model_path(), help="model folder to start from")
    parser.add_argument("--out", required=True, help="folder to save the trained model and tokenizer in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--prompts-per-step", type=int, default=defaults.prompts_per_step)
    parser.add_argument("--num-generations", type=int, default=defaults.num_generations, help="rollouts per prompt (G)")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--beta", type=float, default=defaults.beta, help="KL coefficient to the starting model")
    parser.add_argument("--aggregation-fraction", type=float, default=defaults.aggregation_fraction,
                        help="share of the steps on aggregation prompts (0: plain problems only)")
    parser.add_argument("--lora", nargs="+", choices=LORA_PRESETS, default=None,
                        help="train LoRA adapters on these parts (merged before saving) instead of all weights")
    parser.add_argument("--no-bias-balancing", action="store_true", help="train without the router bias controller")
    parser.add_argument("--balancer-ki", type=float, default=defaults.balancer_ki,
                        help="integral gain of the bias balancer (supervised training uses 1)")
    parser.add_argument("--eval-problems", type=int, default=64, help="held-out problems for the accuracy checks")
    parser.add_argument("--eval-samples", type=int, default=4,
                        help="sampled rollouts per held-out problem (temperature and budget of the rollouts; 0: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (bitwise reproduction needs the same count)")
    args = parser.parse_args(argv)
    if args.eval_samples < 0:
        parser.error(f"--eval-samples must be >= 0, got {args.eval_samples}.")
    if args.max_steps < 1:
        parser.error(f"--max-steps must be at least 1, got {args.max_steps}.")
    if os.path.exists(args.out) and os.listdir(args.out):
        parser.error(f"--out {args.out} exists and is not empty; choose a new folder.")
    if not Path(args.model).is_dir():
        parser.error(f"--model {args.model} is no folder (this example never downloads).")
    try:
        recipe = RLRecipe(
            max_steps=args.max_steps, prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
            learning_rate=args.learning_rate, beta=args.beta, aggregation_fraction=args.aggregation_fraction,
            bias_balancing=not args.no_bias_balancing, balancer_ki=args.balancer_ki,
            lora_targets=tuple(args.lora) if args.lora else None,
        )
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    problems = held_out_problems(args.eval_problems) if args.eval_problems else []

    def held_out_accuracy(model) -> dict:
        if not problems:
            return {"greedy": None, "sampled": None}
        model.eval()
        sampled = None
        if args.eval_samples:
            sampled = evaluate_sampled(model, tokenizer, problems, args.eval_samples, recipe.max_completion_length,
                                       recipe.temperature, seed=args.seed)
        return {"greedy": evaluate_greedy(model, tokenizer, problems), "sampled": sampled}

    before = held_out_accuracy(model)
    model, summary = train_grpo(model.train(), tokenizer, recipe, TaskSpec(), seed=args.seed)
    after = held_out_accuracy(model)
    summary.update(held_out_greedy_before=before["greedy"], held_out_greedy_after=after["greedy"],
                   held_out_sampled_before=before["sampled"], held_out_sampled_after=after["sampled"],
                   held_out_problems=len(problems), held_out_samples=args.eval_samples)
    out = Path(args.out)
    save_without_remote_code(model.to(torch.bfloat16), out)
    tokenizer.save_pretrained(out)
    (out / "rl_summary.json").write_text(json.dumps({**summary, "recipe": dataclasses.asdict(recipe)}, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
