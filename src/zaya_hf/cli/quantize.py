"""`zaya-hf quantize SRC OUT --bits 4 --group-size 64`: a quantized copy of a checkpoint, streamed tensor by tensor."""

import argparse
import json

from .common import CommandError, positive_int


def add_quantize_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize", help="write an int8 / int4 quantized copy of a checkpoint (streamed; loads without re-quantizing)",
        description="Quantize every Linear, the LM head and the fused experts of the ZAYA checkpoint folder SRC "
        "(weight-only, symmetric, round to nearest) into the new folder OUT, one tensor at a time. OUT loads with "
        "from_pretrained(OUT) and runs on torch's int8 / int4 CPU kernels.",
    )
    parser.add_argument("source", metavar="SRC", help="a ZAYA checkpoint folder (config.json + safetensors)")
    parser.add_argument("output", metavar="OUT", help="the new folder to write (must not exist)")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=4, help="4 (group-wise) or 8 (per channel)")
    parser.add_argument("--group-size", type=positive_int, default=None,
                        help="input features per int4 scale: 32, 64 or 128 (default 64; not with --bits 8)")
    parser.add_argument("--quantize-embedding", action="store_true", help="also quantize the embedding table")
    parser.add_argument("--keep", nargs="*", default=None, metavar="MODULE",
                        help="module paths left unquantized (default: mlp.gate, the routers)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.set_defaults(run=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from ..quantization import ZayaQuantizationConfig
    from ..quantization.convert import quantize_checkpoint

    group_size = args.group_size if args.group_size is not None or args.bits == 8 else 64
    try:
        qconfig = ZayaQuantizationConfig(bits=args.bits, group_size=group_size,
                                         quantize_embedding=args.quantize_embedding, modules_to_not_convert=args.keep)
        summary = quantize_checkpoint(args.source, args.output, qconfig)
    except (ValueError, OSError, KeyError) as error:  # QuantizationFormatError is a ValueError
        raise CommandError(str(error)) from None
    summary = {"output": args.output, "format": qconfig.describe(), **summary}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.output}: {qconfig.describe()}, {summary['tensors_quantized']} tensors quantized, "
              f"{summary['bytes_in'] / 2**30:.2f} GiB -> {summary['bytes_out'] / 2**30:.2f} GiB")
    return 0
