"""The options of an OpenAI-compatible endpoint, shared by `rsa --endpoint`, `eval --endpoint` and
`serve-rsa --upstream`, and the engine built from them."""

import argparse
import sys
from pathlib import Path

from .common import CommandError, load_tokenizer, positive_int

EXTENSIONS = {"auto": None, "on": True, "off": False}


def add_endpoint_arguments(parser: argparse.ArgumentParser, url_flag: str = "--endpoint") -> None:
    from ..serving.openai_engine import DEFAULT_DEADLINE, DEFAULT_TIMEOUT, PROMPT_FORMATS

    group = parser.add_argument_group("OpenAI-compatible endpoint")
    group.add_argument(url_flag, dest="endpoint", metavar="URL",
                       help="base URL of an OpenAI-compatible server (vLLM, SGLang, transformers serve)")
    group.add_argument("--served-model", help="model name on the server (default: the first it serves)")
    group.add_argument("--tokenizer", help=f"tokenizer folder or Hub id for {url_flag} (default: --model's, else the "
                       "served model's folder when it is one here, else the embedded model's)")
    group.add_argument("--api-key", default=None, help="sent as a bearer token")
    group.add_argument("--max-concurrency", type=positive_int, default=16,
                       help="upstream requests in flight at most (default 16)")
    group.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                       help=f"seconds one attempt may take, connect to last byte (default {DEFAULT_TIMEOUT:.0f})")
    group.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE,
                       help=f"seconds one rollout may take, retries included (default {DEFAULT_DEADLINE:.0f})")
    group.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                       help="token-id or text prompts (auto: token ids, text where the server refuses them)")
    group.add_argument("--extensions", choices=list(EXTENSIONS), default="auto",
                       help="send skip_special_tokens/top_k/min_p/repetition_penalty (auto: where accepted)")


def endpoint_engine(args: argparse.Namespace, flag: str = "--endpoint"):
    """(OpenAICompletionsEngine, tokenizer) for the endpoint options; the server is asked for its model now, so an
    unreachable or unsuitable server fails here in one line."""
    from ..serving import EndpointError, OpenAICompletionsEngine

    if args.tokenizer or args.model:
        tokenizer = load_tokenizer(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
    else:
        tokenizer = None
    try:
        engine = OpenAICompletionsEngine(
            args.endpoint, model=args.served_model, tokenizer=tokenizer, api_key=args.api_key,
            max_concurrency=args.max_concurrency, timeout=args.timeout, deadline=args.deadline,
            prompt_format=args.prompt_format, extensions=EXTENSIONS[args.extensions],
        )
        served = engine.model
    except (ValueError, EndpointError) as error:
        raise CommandError(f"{flag} {args.endpoint}: {error}") from None
    if tokenizer is None:
        # vLLM and transformers serve name a model by its folder: where that folder is here, it has the tokenizer.
        source = served if Path(served).is_dir() else None
        if source is None:
            print(f"{flag} {args.endpoint} serves {served!r}: using the embedded model's tokenizer (pass --tokenizer "
                  "for another model).", file=sys.stderr)
        engine.tokenizer = tokenizer = load_tokenizer(source)
    return engine, tokenizer
