"""`zaya-hf eval`: a problem set (JSONL with reference answers) through single rollouts or Markovian RSA, on any
engine, resumable, with accuracy per round and 95% intervals (the harness: `zaya_hf.serving.evaluation`)."""

import argparse
import json
from pathlib import Path

from .common import CommandError, add_model_arguments, resolve_model
from .endpoint import add_endpoint_arguments
from .rsa import EndpointErrors, add_rsa_arguments, rollout_engine, rsa_config


def add_eval_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="accuracy of single rollouts or Markovian RSA on a problem set (JSONL), resumable",
        description="Solve every problem of PROBLEMS (JSONL lines {\"id\", \"question\", \"answer\"}) with N single "
        "rollouts or with Markovian RSA, on a local --model (default: the embedded model) or an --endpoint. Prints "
        "mean accuracy, majority-vote accuracy and pass@N after each round with 95%% intervals, and the decode tokens "
        "per problem. Results are appended to --output problem by problem: re-running the same command resumes. "
        "`zaya-hf demo --export-problems FILE` writes the embedded model's held-out set.",
    )
    parser.add_argument("problems", help="the problem set (JSONL)")
    parser.add_argument("--method", choices=["single", "rsa"], required=True,
                        help="single: N independent rollouts per problem; rsa: Markovian RSA")
    add_model_arguments(parser)
    add_endpoint_arguments(parser)
    parser.add_argument("--output", default=None,
                        help="results file, appended problem by problem (default: PROBLEMS-METHOD.results.jsonl "
                        "in the current folder)")
    parser.add_argument("--plot", default=None, help="write a PNG of accuracy against tokens (needs matplotlib)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_rsa_arguments(parser)
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..generation_zaya import MarkovianRSAConfig
    from ..serving.evaluation import (
        ResultsFile,
        evaluate,
        method_config,
        plot_accuracy_against_tokens,
        read_problems,
        settings_of,
        summarize,
    )
    from ..tiny_reasoner import DEMO_RSA_SETTINGS

    if args.method == "single":
        if args.rounds not in (None, 0):
            raise CommandError("--rounds goes with --method rsa; single rollouts have round 0 only.")
        args.rounds = 0
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        raise CommandError(f"--plot {args.plot}: the plot is a PNG; give a path ending in .png.")
    try:
        problems = read_problems(args.problems)
    except (OSError, ValueError) as error:
        raise CommandError(str(error)) from None
    embedded = args.model is None and args.endpoint is None
    defaults = DEMO_RSA_SETTINGS if embedded else {name: getattr(MarkovianRSAConfig(), name) for name in DEMO_RSA_SETTINGS}
    config = method_config(args.method, rsa_config(args, defaults, selection="majority"))
    described = f"endpoint {args.endpoint} ({args.served_model or 'first served model'})" if args.endpoint else \
        f"model {resolve_model(args.model)}"
    output = Path(args.output or f"{Path(args.problems).stem}-{args.method}.results.jsonl")
    try:
        results = ResultsFile(output, settings_of(args.method, config, described))
    except ValueError as error:
        raise CommandError(str(error)) from None
    finished = sum(p.id in results.records for p in problems)
    engine, tokenizer = rollout_engine(args)
    print(f"{len(problems)} problems, {args.method}: T={config.rounds} N={config.population} "
          f"C={config.subset_size} β={config.rollout_tokens} τ={config.tail_tokens}, {described}; results in {output}"
          + (f" ({finished} done, resuming)" if finished else ""))
    try:
        with tqdm(total=len(problems), initial=finished, desc="eval", unit="problem",
                  disable=args.no_progress) as bar:
            records, resumed = evaluate(engine, tokenizer, problems, config, results,
                                        on_problem=lambda record: bar.update())
    except EndpointErrors as error:
        raise CommandError(f"--endpoint {args.endpoint}: {error} (finished problems are kept in {output})") from None
    finally:
        if args.endpoint:
            engine.close()
    summary = {"method": args.method, **summarize(records), "computed": len(problems) - resumed, "resumed": resumed,
               "output": str(output), "settings": results.settings}

    for r in summary["rounds"]:
        print(f"round {r['round']}: {r['tokens_per_problem']:9.1f} tokens/problem   mean {_pct(r, 'mean_accuracy')}   "
              f"majority {_pct(r, 'majority_accuracy')}   pass@N {_pct(r, 'pass_at_n')}")
    single = summary["single_rollout"]
    print(f"single rollout: accuracy {single['accuracy']:.1%}, {single['tokens']:.1f} tokens")
    if args.plot:
        label = "Markovian RSA" if args.method == "rsa" else f"{config.population} rollouts"
        written = plot_accuracy_against_tokens(summary, args.plot, label, f"{len(problems)} problems")
        print(f"plot written to {args.plot}" if written else "plot skipped: matplotlib is not installed")
    if args.json:
        print(json.dumps(summary))
    return 0


def _pct(row: dict, key: str) -> str:
    low, high = row[f"{key}_ci95"]
    return f"{row[key]:6.1%} [{low:.1%}, {high:.1%}]"
