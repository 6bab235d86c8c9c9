"""`zaya-hf demo`: single rollout against Markovian RSA on held-out problems, with tokens, time and a plot."""

import argparse
import json
from pathlib import Path

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
    parser.add_argument("--quantize", choices=["int8", "int4", "int4-g32", "int4-g64", "int4-g128"], default=None,
                        help="quantize the model's weights as it loads (int4: group 64)")
    parser.add_argument("--problems", type=positive_int, default=None, help="held-out problems to solve")
    parser.add_argument("--problem-seed", type=int, default=1234, help="which held-out problems (default 1234)")
    parser.add_argument("--plot", default="zaya_demo.png", help="PNG to write (default zaya_demo.png)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    parser.add_argument("--json", action="store_true", help="print the measurements as one JSON object")
    add_rsa_arguments(parser)
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..tiny_reasoner import DEMO_PROBLEMS, DEMO_RSA_SETTINGS
    from ..tiny_reasoner.evaluation import compare_single_and_rsa
    from ..tiny_reasoner.task import chance_accuracy, held_out_problems

    config = rsa_config(args, DEMO_RSA_SETTINGS)
    if config.rounds == 0:
        raise CommandError("--rounds 0 is a single-rollout run: the demo compares against at least one RSA round.")
    plot_path = None if args.no_plot else Path(args.plot)
    if plot_path is not None and plot_path.suffix.lower() != ".png":
        raise CommandError(f"--plot {args.plot}: the plot is a PNG; give a path ending in .png.")
    problems = held_out_problems(args.problems or DEMO_PROBLEMS, seed=args.problem_seed)
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
        written = write_plot(c, plot_path, rsa_label)
        print(f"plot written to {plot_path}" if written else "plot skipped: matplotlib is not installed "
              "(pip install 'zaya-hf[demo]')")
    return 0


def write_plot(comparison, path: Path, rsa_label: str) -> bool:
    """Accuracy against decode tokens per problem: the single-rollout point and the RSA curve over rounds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tokens = [p.tokens_per_problem for p in comparison.rounds]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(tokens, [p.majority_accuracy for p in comparison.rounds], "o-", label=f"{rsa_label}, majority vote")
    ax.plot(tokens, [p.mean_accuracy for p in comparison.rounds], "s--", label="Markovian RSA, population mean")
    ax.plot([comparison.single_tokens], [comparison.single_accuracy], "*", markersize=14, label="single rollout")
    for point, x in zip(comparison.rounds, tokens):
        ax.annotate(f"round {point.round}", (x, point.majority_accuracy), textcoords="offset points", xytext=(4, 6),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("decode tokens spent per problem")
    ax.set_ylabel("accuracy on held-out problems")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{comparison.num_problems} held-out problems")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
