"""`zaya-hf`: the command line of zaya_hf.

    zaya-hf demo                      single rollout vs Markovian RSA on held-out problems (offline)
    zaya-hf generate "Compute 3+4."   complete a prompt        zaya-hf chat      talk in the terminal
    zaya-hf rsa QUESTION              Markovian RSA, local or --endpoint URL
    zaya-hf serve-rsa                 an OpenAI-compatible Markovian RSA server (--upstream URL or --model)
    zaya-hf eval PROBLEMS.jsonl       accuracy of single rollouts or Markovian RSA on a problem set
    zaya-hf info | bench              config and sizes | speed against transformers' ZAYA
    zaya-hf convert | export          legacy -> current layout | a Hub folder with remote code
    zaya-hf quantize SRC OUT --bits 4 an int8 / int4 copy of a checkpoint

Every command that takes `--model` defaults to the embedded model, so all of them work offline.
"""

import argparse
import sys

from .common import CommandError

# Commands whose arguments belong to an existing entry point (issue 7's checkpoint tools): forwarded unchanged.
FORWARDED = {
    "convert": ("convert a checkpoint between the legacy and the current layout", "zaya_hf.checkpoints.convert"),
    "export": ("write a checkpoint as a Hub folder that loads with trust_remote_code", "zaya_hf.checkpoints.hub"),
}


def build_parser() -> argparse.ArgumentParser:
    from .demo import add_demo_parser
    from .eval import add_eval_parser
    from .generation import add_chat_parser, add_generate_parser
    from .info import add_bench_parser, add_info_parser
    from .quantize import add_quantize_parser
    from .rsa import add_rsa_parser
    from .serve import add_serve_parser

    parser = argparse.ArgumentParser(
        prog="zaya-hf", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'zaya-hf COMMAND --help' for a command's options.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"zaya-hf {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_demo_parser(subparsers)
    add_generate_parser(subparsers)
    add_chat_parser(subparsers)
    add_rsa_parser(subparsers)
    add_serve_parser(subparsers)
    add_eval_parser(subparsers)
    add_info_parser(subparsers)
    add_bench_parser(subparsers)
    add_quantize_parser(subparsers)
    for name, (help_text, _) in FORWARDED.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def run_forwarded(name: str, argv: list[str]) -> int:
    import importlib

    try:
        module = importlib.import_module(FORWARDED[name][1])
    except ImportError as error:
        print(f"zaya-hf {name}: not available in this installation ({error}).", file=sys.stderr)
        return 1
    previous = sys.argv[0]
    sys.argv[0] = f"zaya-hf {name}"  # the forwarded parser names itself after argv[0]
    try:
        return module.main(argv)
    finally:
        sys.argv[0] = previous


def main(argv: list[str] | None = None) -> int:
    """Run the command line on `argv` (default: `sys.argv[1:]`); returns the exit status. Usage errors print a
    message and exit with status 2 (argparse's convention), as do bad values found after parsing."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        return run_forwarded(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CommandError as error:
        print(f"zaya-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"zaya-hf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
