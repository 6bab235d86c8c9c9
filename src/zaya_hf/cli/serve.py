"""`zaya-hf serve-rsa`: the OpenAI-compatible Markovian RSA server, in front of an upstream or a local model."""

import argparse

from .common import CommandError, add_model_arguments, load_model, positive_int
from .endpoint import add_endpoint_arguments, endpoint_engine

EMBEDDED_MODEL_NAME = "zaya-embedded"


def add_serve_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve-rsa", help="an OpenAI-compatible Markovian RSA server (drop-in for Zyphra's proxy)",
        description="Serve /v1/chat/completions with Markovian RSA for requests carrying rsa_* fields (Zyphra's "
        "proxy fields and defaults), passing other requests through to --upstream, or answering them with --model "
        "(default: the embedded model) when no upstream is given. Also /v1/completions, /v1/models, /health. "
        "Needs pip install 'zaya-hf[serve]'.",
    )
    add_model_arguments(parser)
    add_endpoint_arguments(parser, url_flag="--upstream")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port (default 8001, as Zyphra's proxy)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name the server answers to with --model (default: --model, or "
                        f"{EMBEDDED_MODEL_NAME!r})")
    parser.add_argument("--max-request-tokens", type=positive_int, default=None,
                        help="refuse RSA requests whose worst case exceeds this many decode tokens")
    parser.add_argument("--max-active-requests", type=positive_int, default=64,
                        help="RSA requests running at once; more wait (default 64)")
    parser.set_defaults(run=run_serve)


def build_backend(args: argparse.Namespace):
    from ..serving.rsa_server import LocalBackend, UpstreamBackend

    if args.endpoint:
        engine, tokenizer = endpoint_engine(args, flag="--upstream")
        return UpstreamBackend(engine, tokenizer)
    if args.tokenizer or args.served_model:
        option = "--tokenizer" if args.tokenizer else "--served-model"
        raise CommandError(f"{option} goes with --upstream; a local --model brings its own tokenizer and name.")
    model, tokenizer = load_model(args)
    return LocalBackend(model, tokenizer, args.served_model_name or args.model or EMBEDDED_MODEL_NAME)


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serving.rsa_server import build_app
    except ImportError as error:
        raise CommandError(f"{error}") from None
    backend = build_backend(args)
    app = build_app(backend, max_request_tokens=args.max_request_tokens,
                    max_active_requests=args.max_active_requests)
    where = f"upstream {args.endpoint}" if args.endpoint else "a local model"
    print(f"serve-rsa: {backend.model_name} ({where}) on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
