"""`zaya-hf info` (config, parameter counts, active parameters, cache footprint) and `zaya-hf bench`."""

import argparse
import json
from collections import Counter

import torch

from .common import (
    DTYPES, CommandError, add_model_arguments, load_model, pick_device, pick_dtype, positive_int, resolve_model,
)


def add_info_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "info", help="config, parameter counts, active parameters per token, cache bytes per token",
        description="Describe a ZAYA model from its config alone (no weights are loaded): architecture, parameter "
        "counts, parameters active per token (top-1 routing), and the CCA cache footprint.",
    )
    add_model_arguments(parser, dtype=False)
    parser.add_argument("--seq-len", type=positive_int, default=4096, help="context for the cache total (default 4096)")
    parser.add_argument("--cache-dtype", choices=list(DTYPES), default="bfloat16", help="cache dtype (default bfloat16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run_info)


def parameter_counts(config) -> dict:
    """Total, embedding, expert and per-token active parameter counts, from a meta-device model (no memory)."""
    from ..modeling_zaya import ZayaForCausalLM

    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    counts = Counter()
    for name, param in model.named_parameters():  # the tied lm_head is listed once
        counts["total"] += param.numel()
        if "embed_tokens" in name:
            counts["embeddings"] += param.numel()
        elif ".mlp.experts." in name:
            counts["experts"] += param.numel()
    # Top-1 routing: a token runs one expert of each layer (none when the router picks the skip class).
    active = counts["total"] - counts["experts"] + counts["experts"] // config.num_experts
    return {
        "total": counts["total"],
        "embeddings": counts["embeddings"],
        "experts": counts["experts"],
        "active_per_token": active,
        "active_per_token_without_embeddings": active - counts["embeddings"],
    }


def describe(config, seq_len: int, cache_dtype: torch.dtype) -> dict:
    from ..cache_zaya import predict_cache_nbytes

    layer_types = Counter(config.layer_types)
    fixed = predict_cache_nbytes(config, 1, 0, cache_dtype)
    per_token = predict_cache_nbytes(config, 1, 1, cache_dtype) - fixed
    full_layers = layer_types.get("hybrid", 0)
    return {
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "layer_types": dict(layer_types),
        "sliding_window": config.sliding_window if "hybrid_sliding" in layer_types else None,
        "hidden_size": config.hidden_size,
        "attention_heads": config.num_attention_heads,
        "key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "experts": config.num_experts,
        "moe_intermediate_size": config.moe_intermediate_size,
        "router_hidden_size": config.router_hidden_size,
        "vocab_size": config.vocab_size,
        "parameters": parameter_counts(config),
        "weights": weight_bytes(config),
        "cache": {
            "dtype": str(cache_dtype).removeprefix("torch."),
            # Growth per token while every layer still grows (short contexts); sliding layers stop at their window.
            "bytes_per_token": per_token,
            "bytes_per_token_per_layer": per_token // config.num_hidden_layers,
            "full_attention_layers": full_layers,
            "fixed_bytes_per_sequence": fixed,
            "seq_len": seq_len,
            "bytes_at_seq_len": predict_cache_nbytes(config, 1, seq_len, cache_dtype),
        },
    }


def weight_bytes(config) -> dict:
    """Bytes of the weights in bf16 and quantized (int8; int4 group 64), and as this config's checkpoint holds them
    when it is quantized (`quantized`)."""
    from ..quantization import ZayaQuantizationConfig
    from ..quantization.convert import weight_footprint

    sizes = {
        "bfloat16": weight_footprint(config, None)["memory_bytes"],
        "int8": weight_footprint(config, ZayaQuantizationConfig(bits=8, group_size=None))["memory_bytes"],
        "int4_group64": weight_footprint(config, ZayaQuantizationConfig(bits=4, group_size=64))["memory_bytes"],
    }
    stored = getattr(config, "quantization_config", None)
    if stored:
        qconfig = ZayaQuantizationConfig(**(stored if isinstance(stored, dict) else stored.to_dict()))
        sizes["quantized"] = {"format": qconfig.describe(), **weight_footprint(config, qconfig)}
    return sizes


def size(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:,.2f} MiB"


def run_info(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    import zaya_hf  # noqa: F401  (registers the zaya config class)

    source = resolve_model(args.model)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise CommandError(f"could not read the config of {args.model or source!r}: {error}") from None
    if config.model_type != "zaya":
        raise CommandError(f"{args.model or source!r} is a {config.model_type!r} model, not a ZAYA model.")
    info = {"model": args.model or "embedded default model", **describe(config, args.seq_len, DTYPES[args.cache_dtype])}
    if args.json:
        print(json.dumps(info))
        return 0
    params, cache = info["parameters"], info["cache"]
    kinds = ", ".join(f"{count} {kind}" for kind, count in info["layer_types"].items())
    window = f", window {info['sliding_window']}" if info["sliding_window"] else ""
    print(f"model:       {info['model']} (model_type {info['model_type']})")
    print(f"layers:      {info['layers']} ({kinds}{window}); hidden {info['hidden_size']}; CCA attention with "
          f"{info['attention_heads']} query / {info['key_value_heads']} kv heads x {info['head_dim']}")
    print(f"MoE:         {info['experts']} experts + skip class, top-1, intermediate {info['moe_intermediate_size']}, "
          f"router hidden {info['router_hidden_size']}; vocab {info['vocab_size']}")
    print(f"parameters:  {params['total']:,} total ({params['embeddings']:,} embeddings, {params['experts']:,} in experts)")
    print(f"active:      {params['active_per_token']:,} per token "
          f"({params['active_per_token_without_embeddings']:,} without embeddings)")
    weights = info["weights"]
    print(f"weights:     {size(weights['bfloat16'])} in bf16; quantized (zaya-hf quantize) int8 "
          f"{size(weights['int8'])}, int4 group 64 {size(weights['int4_group64'])}")
    if "quantized" in weights:
        quantized = weights["quantized"]
        print(f"quantized:   {quantized['format']}: {size(quantized['memory_bytes'])} of weights in memory "
              f"({size(quantized['checkpoint_bytes'])} in the checkpoint)")
    print(f"cache ({cache['dtype']}): {cache['bytes_per_token']:,} B per token "
          f"({cache['bytes_per_token_per_layer']:,} B per layer) + {cache['fixed_bytes_per_sequence']:,} B "
          f"fixed per sequence; {cache['bytes_at_seq_len'] / 2**20:,.2f} MiB at {cache['seq_len']:,} tokens")
    return 0


def add_bench_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="decode / prefill speed against transformers' ZAYA on the same weights",
        description="Time greedy decoding and prefill of zaya_hf and of transformers' own ZAYA holding the same "
        "weights, alternately (warm-up, then --repeats timed runs, median). Prints one JSON line.",
    )
    add_model_arguments(parser)
    parser.add_argument("--bench-small", action="store_true",
                        help="the random-weight 'bench-small' config of benchmarks/bench_decode.py instead of --model")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 16], help="decode batch sizes")
    parser.add_argument("--prompt-tokens", type=positive_int, default=128)
    parser.add_argument("--new-tokens", type=positive_int, default=64)
    parser.add_argument("--prefill-tokens", type=positive_int, default=1024)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--no-reference", action="store_true", help="time zaya_hf only")
    parser.add_argument("--compile", action="store_true",
                        help="also time zaya_hf with a static cache and a compiled decode step")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..bench import build_bench_small, reference_twin, run_decode_benchmark

    if args.new_tokens < 2:
        raise CommandError("--new-tokens must be >= 2: decode speed is measured past the first token.")
    if args.bench_small:
        if args.model is not None:
            raise CommandError("--bench-small and --model are exclusive.")
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        ours = build_bench_small(args.seed).to(device, dtype).eval()
        name = "bench-small"
    else:
        ours, _ = load_model(args)
        device, dtype, name = ours.device, ours.dtype, args.model or "embedded default model"
    reference = None if args.no_reference else reference_twin(ours).to(device, dtype).eval()
    torch.manual_seed(args.seed)
    steps = len(args.batch_sizes) + 1
    with tqdm(total=steps, desc="bench", unit="measurement", leave=False) as bar:
        result = run_decode_benchmark(
            ours, reference, batch_sizes=args.batch_sizes, prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens, repeats=args.repeats,
            compile_decode=args.compile, on_measurement=lambda _: bar.update(),
        )
    print(json.dumps({"model": name, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                      "repeats": args.repeats, **result}))
    return 0
