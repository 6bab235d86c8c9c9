"""Train the embedded default model: a small ZAYA that solves multi-step arithmetic with `<think>` working and
was trained, like ZAYA1-8B, on Markovian RSA aggregation prompts; supervised, then optionally with GRPO (TRL).
CPU only, offline.

    python examples/train_tiny_reasoner.py --out my-tiny-reasoner          # the shipped recipe and seed
    python examples/train_tiny_reasoner.py --out /tmp/t --max-steps 5 --rl-steps 2   # a quick check that it runs
    python examples/train_tiny_reasoner.py --out rl --rl-steps 300          # then 300 GRPO steps (not shipped)
    python examples/train_tiny_reasoner.py --out control --rl-steps 300 --aggregation-fraction 0 \
        --rl-aggregation-fraction 0                     # the co-design control: plain problems only, same budget

The shipped model (`zaya_hf/default_model/`) is this script's output with the default arguments.
"""

import argparse
import json
import os

import torch

from zaya_hf.tiny_reasoner.recipe import TinyReasonerRecipe, train_tiny_reasoner
from zaya_hf.tiny_reasoner.rl import RLRecipe


def main(argv: list[str] | None = None) -> dict:
    defaults = TinyReasonerRecipe()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to save the model and tokenizer in")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps, help="supervised steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--layers", type=int, default=defaults.num_hidden_layers)
    parser.add_argument("--moe-intermediate-size", type=int, default=defaults.moe_intermediate_size)
    parser.add_argument("--tokenizer-problems", type=int, default=defaults.tokenizer_problems,
                        help="problems whose texts train the tokenizer")
    parser.add_argument("--aggregation-fraction", type=float, default=defaults.aggregation_fraction,
                        help="share of the supervised batches that are aggregation prompts")
    parser.add_argument("--rl-steps", type=int, default=defaults.rl.max_steps,
                        help="GRPO steps after supervised training (default 0: supervised only, as shipped)")
    parser.add_argument("--rl-aggregation-fraction", type=float, default=RLRecipe().aggregation_fraction,
                        help="share of the GRPO steps on aggregation prompts over the model's own rollouts")
    parser.add_argument("--no-bias-balancing", action="store_true", help="train without the router bias controller")
    parser.add_argument("--eval-problems", type=int, default=64, help="held-out problems for the final greedy check")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: the model is small, and one thread is fastest on a shared CPU; the "
        "shipped model was trained with 1, and bitwise reproduction needs the same count)",
    )
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        parser.error(f"--out {args.out} exists and is not empty; choose a new folder.")
    torch.set_num_threads(args.threads)
    recipe = TinyReasonerRecipe(
        seed=args.seed, max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        hidden_size=args.hidden_size, num_hidden_layers=args.layers, moe_intermediate_size=args.moe_intermediate_size,
        tokenizer_problems=args.tokenizer_problems, bias_balancing=not args.no_bias_balancing,
        aggregation_fraction=args.aggregation_fraction,
        rl=RLRecipe(max_steps=args.rl_steps, aggregation_fraction=args.rl_aggregation_fraction,
                    bias_balancing=not args.no_bias_balancing),
    )
    summary = train_tiny_reasoner(recipe, args.out, eval_problems=args.eval_problems)
    print(json.dumps({k: v for k, v in summary.items() if k != "recipe"}))
    return summary


if __name__ == "__main__":
    main()
