"""`zaya-hf rsa`: Markovian RSA on one question, with a local model or an OpenAI-compatible endpoint."""

import argparse
import json

import torch

from .common import CommandError, add_model_arguments, load_model, non_negative_int, positive_int, sampling_from
from .endpoint import add_endpoint_arguments, endpoint_engine


def add_rsa_arguments(parser: argparse.ArgumentParser) -> None:
    """The Markovian RSA parameters (ZAYA notation in the help), shared by `rsa` and `demo`."""
    group = parser.add_argument_group("Markovian RSA")
    group.add_argument("--rounds", type=non_negative_int, default=None, help="T: aggregation rounds after round 0")
    group.add_argument("--population", type=positive_int, default=None, help="N: candidates per round")
    group.add_argument("--subset-size", type=positive_int, default=None, help="C: tails each new candidate reads")
    group.add_argument("--rollout-tokens", type=positive_int, default=None, help="β: new tokens per rollout")
    group.add_argument("--tail-tokens", type=positive_int, default=None, help="τ: tail length carried to the next round")
    group.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature (default 1.0)")
    group.add_argument("--top-p", type=float, default=1.0, help="rollout top-p (default 1.0)")
    group.add_argument("--seed", type=int, default=0, help="seeds the subset sampler and token sampling (default 0)")


def rsa_config(args: argparse.Namespace, defaults: dict, **extra):
    """A `MarkovianRSAConfig` from the arguments, `defaults` filling what was not given; bad values -> CommandError."""
    from ..generation_zaya import MarkovianRSAConfig

    chosen = {name: getattr(args, name) if getattr(args, name) is not None else value for name, value in defaults.items()}
    try:
        return MarkovianRSAConfig(**chosen, sampling=sampling_from(args), seed=args.seed, **extra)
    except ValueError as error:
        raise CommandError(str(error)) from None


def rollout_engine(args: argparse.Namespace):
    """(engine, tokenizer): an `OpenAICompletionsEngine` for `--endpoint`, else `LocalGenerationEngine` on `--model`."""
    from ..generation_zaya import LocalGenerationEngine

    if args.endpoint:
        return endpoint_engine(args)
    if args.tokenizer or args.served_model:
        option = "--tokenizer" if args.tokenizer else "--served-model"
        raise CommandError(f"{option} goes with --endpoint; a local --model brings its own tokenizer and name.")
    model, tokenizer = load_model(args)
    return LocalGenerationEngine(model, tokenizer), tokenizer


def _endpoint_errors() -> tuple:
    try:
        from ..serving import EndpointError
    except ImportError:  # no httpx: no endpoint either
        return ()
    return (EndpointError,)


EndpointErrors = _endpoint_errors()


def add_rsa_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "rsa", help="Markovian RSA on one question (local model or --endpoint URL)",
        description="Markovian RSA (ZAYA1's test-time-compute method) on one question. Defaults: ZAYA1-8B's "
        "recommended deployment (T=2, N=16, C=4, β=16384, τ=4096); with the embedded model, the demo settings.",
    )
    parser.add_argument("question", help="the problem ('-' reads it from standard input)")
    add_model_arguments(parser)
    add_endpoint_arguments(parser)
    parser.add_argument("--reference", help="the correct answer: also prints mean accuracy, majority and pass@N")
    parser.add_argument("--final-tokens", type=positive_int, default=None, help="the last round's budget (default β)")
    parser.add_argument("--final-population", type=positive_int, default=None, help="the last round's size (default N)")
    parser.add_argument("--selection", choices=["majority", "aggregate"], default="majority")
    parser.add_argument("--tail-unit", choices=["tokens", "words"], default="tokens")
    parser.add_argument("--answer-tail", action="store_true", help="pass answers instead of reasoning tails")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_rsa_arguments(parser)
    parser.set_defaults(run=run_rsa)


def run_rsa(args: argparse.Namespace) -> int:
    import sys

    from ..generation_zaya import MarkovianRSAConfig, run_markovian_rsa
    from ..tiny_reasoner import DEMO_RSA_SETTINGS

    question = sys.stdin.read().strip() if args.question == "-" else args.question
    # The embedded model's solutions are a few dozen tokens: it gets the demo settings; real models get ZAYA1-8B's
    # recommended deployment (MarkovianRSAConfig's defaults: T=2, N=16, C=4, β=16K, τ=4K).
    embedded = args.model is None and args.endpoint is None
    defaults = DEMO_RSA_SETTINGS if embedded else {name: getattr(MarkovianRSAConfig(), name) for name in DEMO_RSA_SETTINGS}
    config = rsa_config(
        args, defaults, final_tokens=args.final_tokens,
        final_population=args.final_population, selection=args.selection, tail_unit=args.tail_unit,
        answer_tail=args.answer_tail,
    )
    engine, tokenizer = rollout_engine(args)
    # A server failing mid-run, or inputs the local model refuses (e.g. rollouts past max_position_embeddings).
    expected = EndpointErrors if args.endpoint else (ValueError,)
    try:
        with torch.no_grad():
            result = run_markovian_rsa(engine, question, tokenizer, config, progress=not args.no_progress)
    except expected as error:
        where = f"--endpoint {args.endpoint}" if args.endpoint else "the model"
        raise CommandError(f"{where}: {error}") from None
    finally:
        if args.endpoint:
            engine.close()

    summary = {
        "answer": result.answer,
        "final_answers": result.final_answers,
        "generated_tokens": result.generated_tokens,
        "rounds": [{"round": r.index, "rollouts": len(r.completions), "generated_tokens": r.generated_tokens,
                    "max_prompt_tokens": max(r.prompt_lengths)} for r in result.rounds],
    }
    if args.reference is not None:
        summary.update(mean_accuracy=result.mean_accuracy(args.reference),
                       majority_correct=result.majority_correct(args.reference),
                       pass_at_n=result.pass_at_n(args.reference))
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"T={config.rounds} N={config.population} C={config.subset_size} β={config.rollout_tokens} "
          f"τ={config.tail_tokens} ({'endpoint ' + args.endpoint if args.endpoint else 'local'})")
    for row in summary["rounds"]:
        print(f"round {row['round']}: {row['rollouts']} rollouts, {row['generated_tokens']:,} tokens generated, "
              f"prompts <= {row['max_prompt_tokens']} tokens")
    print("final answers:", ", ".join(str(a) for a in result.final_answers))
    print(f"answer: {result.answer}   ({result.generated_tokens:,} tokens generated)")
    if args.reference is not None:
        print(f"mean accuracy {summary['mean_accuracy']:.3f}, majority correct {summary['majority_correct']}, "
              f"pass@N {summary['pass_at_n']}")
    return 0
