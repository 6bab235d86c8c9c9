"""What the subcommands share: resolving and loading `--model`, dtype/device options, user-facing errors."""

import argparse
import json
import re
from pathlib import Path

import torch

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CommandError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


def add_model_arguments(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    parser.add_argument(
        "--model", default=None,
        help="a local model folder or a Hub id (Hub ids need a reachable Hub); default: the embedded model",
    )
    if dtype:
        parser.add_argument(
            "--dtype", choices=["auto", *DTYPES], default="auto",
            help="weights dtype (auto: bfloat16 on GPU and for quantized weights, float32 otherwise)",
        )
        parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def resolve_model(name: str | None, flag: str = "--model") -> str:
    """`from_pretrained` source for `flag`: the embedded model, an existing model folder, or a Hub id."""
    if name is None:
        from ..default_model import default_model_path

        return default_model_path()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CommandError(f"{flag} {name}: the folder has no config.json, so it is not a model folder.")
        return str(path)
    if path.exists():
        raise CommandError(f"{flag} {name}: is a file; give a model folder or a Hub id.")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not _HUB_ID.match(name):
        raise CommandError(f"{flag} {name}: no such folder, and not a Hub id (owner/name).")
    return name


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise CommandError(f"--device {device}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: torch sees no CUDA/ROCm device.")
    return device


def pick_dtype(dtype: str, device: torch.device, quantized: bool = False) -> torch.dtype:
    """`--dtype` as a torch dtype; "auto" is bfloat16 on GPU and for quantized weights (torch's int8 / int4 CPU
    kernels run 4-16x slower on float32 activations than on bfloat16, `bench_quant_kernels.jsonl`), float32
    otherwise."""
    return DTYPES.get(dtype) or (torch.bfloat16 if device.type == "cuda" or quantized else torch.float32)


def is_quantized_checkpoint(source: str) -> bool:
    """Whether the local folder `source` holds a quantized checkpoint (its config.json has a quantization_config)."""
    config = Path(source) / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def load_tokenizer(name: str | None, flag: str = "--model"):
    from transformers import AutoTokenizer

    source = resolve_model(name, flag)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise CommandError(f"could not load the tokenizer of {name or source!r}: {error}") from None


def load_model(args: argparse.Namespace):
    """(model in eval mode, tokenizer) for `--model`, `--dtype`, `--device` (and `--quantize`, where given)."""
    from transformers import AutoModelForCausalLM

    import zaya_hf  # noqa: F401  (registers the zaya classes with the Auto classes)

    device = pick_device(args.device)
    source = resolve_model(args.model)
    quantize = getattr(args, "quantize", None)  # the commands with --quantize
    dtype = pick_dtype(args.dtype, device, quantized=bool(quantize) or is_quantized_checkpoint(source))
    tokenizer = load_tokenizer(args.model)
    quantization = {}
    if quantize:
        from ..quantization import parse_quantize

        quantization["quantization_config"] = parse_quantize(quantize)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **quantization)
    except (OSError, ValueError) as error:
        raise CommandError(f"could not load the model {args.model or source!r}: {error}") from None
    return model.to(device).eval(), tokenizer


def sampling_from(args: argparse.Namespace) -> dict:
    """Sampling arguments as a Markovian-RSA / generate sampling dict (temperature 0 means greedy)."""
    if args.temperature < 0:
        raise CommandError(f"--temperature must be >= 0, got {args.temperature}.")
    if not 0 < args.top_p <= 1:
        raise CommandError(f"--top-p must be in (0, 1], got {args.top_p}.")
    if args.temperature == 0:
        return {"do_sample": False}
    return {"temperature": args.temperature, "top_p": args.top_p}


def int_at_least(minimum: int):
    """argparse type: an integer >= `minimum`, with a message that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
