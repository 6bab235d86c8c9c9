"""`zaya-hf demo`: single rollout against Markovian RSA on held-out problems, with tokens, time and a plot: the
evaluation harness of `zaya-hf eval` (method "rsa") on the embedded model's held-out set."""

import argparse
import json
from pathlib import Path

from ..quantization.config import QUANTIZE_PRESETS
from .common import CommandError, add_model_arguments, load_model, positive_int
from .rsa import add_rsa_arguments, rsa_config


def add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="single rollout vs Markovian RSA on held-out problems (offline, minutes on CPU)",
        description="Solve held-out arithmetic problems of the embedded model's task with one rollout and with "
        "Markovian RSA (same sampling), print both accuracies with the decode tokens and time each spends, and "
        "plot accuracy against tokens spent (needs matplotlib: pip install 'zaya-hf[demo]').",
    )
    add_model_arguments(parser)
    parser.add_argument("--quantize", choices=list(QUANTIZE_PRESETS), default=None,
                        help="quantize the model's weights as it loads (int4: group 64)")
    parser.add_argument("--problems", type=positive_int, default=None, help="held-out problems to solve")
    parser.add_argument("--problem-seed", type=int, default=1234, help="which held-out problems (default 1234)")
    parser.add_argument("--plot", default="zaya_demo.png", help="PNG to write (default zaya_demo.png)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    parser.add_argument("--json", action="store_true", help="print the measurements as one JSON object")
    parser.add_argument("--export-problems", metavar="PATH", default=None,
                        help="write the held-out problems as a zaya-hf eval problem file (JSONL) and exit")
    add_rsa_arguments(parser)
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..tiny_reasoner import DEMO_PROBLEMS, DEMO_RSA_SETTINGS
    from ..tiny_reasoner.evaluation import compare_single_and_rsa, export_problem_set, held_out_problem_set
    from ..tiny_reasoner.task import chance_accuracy

    count = args.problems or DEMO_PROBLEMS
    if args.export_problems:
        export_problem_set(args.export_problems, count, seed=args.problem_seed)
        print(f"{count} held-out problems written to {args.export_problems}")
        return 0
    config = rsa_config(args, DEMO_RSA_SETTINGS)
    if config.rounds == 0:
        raise CommandError("--rounds 0 is a single-rollout run: the demo compares against at least one RSA round.")
    plot_path = None if args.no_plot else Path(args.plot)
    if plot_path is not None and plot_path.suffix.lower() != ".png":
        raise CommandError(f"--plot {args.plot}: the plot is a PNG; give a path ending in .png.")
    problems = held_out_problem_set(count, seed=args.problem_seed)
    model, tokenizer = load_model(args)
    print(f"{len(problems)} held-out problems such as {problems[0].question!r} (answer {problems[0].answer}); "
          f"chance {chance_accuracy():.1%}")
    print(f"Markovian RSA: T={config.rounds} N={config.population} C={config.subset_size} β={config.rollout_tokens} "
          f"τ={config.tail_tokens}, temperature {args.temperature}, top-p {args.top_p}, seed {config.seed}")
    with torch.no_grad(), tqdm(total=len(problems), desc="demo", unit="problem", leave=False) as bar:
        comparison = compare_single_and_rsa(model, tokenizer, problems, config, on_problem=lambda _: bar.update())

    c = comparison
    rsa_label = f"Markovian RSA (T={config.rounds}, N={config.population}, C={config.subset_size})"
    width = len(rsa_label)
    print(f"\n{'method':<{width}}  accuracy  decode tokens/problem  seconds (all problems)")
    print(f"{'single rollout':<{width}}  {c.single_accuracy:>8.1%}  {c.single_tokens:>21.1f}  {c.single_seconds:>7.1f}")
    print(f"{rsa_label:<{width}}  {c.rsa_accuracy:>8.1%}  {c.rsa_tokens:>21.1f}  {c.seconds:>7.1f}")
    print(f"(single rollout: mean over the {config.population} round-0 rollouts of each problem; its seconds are round "
          f"0's divided by N. RSA: majority vote of the final population, whose mean accuracy is "
          f"{c.rsa_mean_accuracy:.1%}.)")
    for point in c.rounds:
        print(f"  after round {point.round}: {point.tokens_per_problem:8.1f} tokens/problem, population mean "
              f"{point.mean_accuracy:.1%}, majority {point.majority_accuracy:.1%}")
    if args.json:
        print(json.dumps(c.as_dict()))
    if plot_path is not None:
        from ..serving.evaluation import plot_accuracy_against_tokens

        written = plot_accuracy_against_tokens(comparison.summary, plot_path, rsa_label,
                                               f"{c.num_problems} held-out problems")
        print(f"plot written to {plot_path}" if written else "plot skipped: matplotlib is not installed "
              "(pip install 'zaya-hf[demo]')")
    return 0
