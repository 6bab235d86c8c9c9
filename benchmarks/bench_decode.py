"""Decode / prefill speed and cache size of zaya_hf against transformers' own ZAYA, measured in one process.

Both models get the same random weights ("bench-small" by default) and run alternately: a warm-up, then
`--repeats` timed repetitions of each measurement; the median is reported. Prints one JSON line.

    python benchmarks/bench_decode.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import time

import torch
from transformers import CompileConfig
from transformers.models.zaya.configuration_zaya import ZayaConfig as ReferenceConfig
from transformers.models.zaya.modeling_zaya import ZayaForCausalLM as ReferenceForCausalLM

from zaya_hf import ZayaCache, ZayaConfig, ZayaForCausalLM

BENCH_SMALL = dict(
    vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
    head_dim=64, num_experts=16, moe_intermediate_size=512, router_hidden_size=64, eos_token_id=None,
    bos_token_id=None, pad_token_id=0,
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def build_models(device: torch.device, dtype: torch.dtype, seed: int):
    config = ZayaConfig(**BENCH_SMALL)
    torch.manual_seed(seed)
    ours = ZayaForCausalLM(config)
    with torch.no_grad():  # move the routers away from init so that every expert gets traffic
        for module in ours.modules():
            if hasattr(module, "balancing_biases"):
                module.balancing_biases.normal_(0.0, 0.01)
    reference = ReferenceForCausalLM(ReferenceConfig(**config.to_diff_dict()))
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(device, dtype).eval(), reference.to(device, dtype).eval()


def generate_fn(model, prompt, new_tokens: int, **kwargs):
    def run():
        return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)

    return run


def median_times(fns: dict, device: torch.device, repeats: int) -> dict:
    """Warm every fn up once, then time them alternately `repeats` times; median seconds per fn."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn, device))
    return {name: statistics.median(values) for name, values in samples.items()}


@torch.no_grad()
def measure_cache_bytes(model, device: torch.device) -> dict:
    """KV bytes per token per layer and the fixed per-sequence CCA state, read off real `ZayaCache` objects in bf16."""
    model = model.to(torch.bfloat16)
    held = {}
    for length in (64, 128):
        cache = ZayaCache(model.config)
        model(torch.randint(1, model.config.vocab_size, (1, length), device=device), cache=cache, use_cache=True)
        held[length] = cache.nbytes
    layers = model.config.num_hidden_layers
    per_token_per_layer = (held[128] - held[64]) / 64 / layers
    return {
        "cache_bf16_kv_bytes_per_token_per_layer": per_token_per_layer,
        "cache_bf16_fixed_bytes_per_sequence_per_layer": (held[64] - 64 * per_token_per_layer * layers) / layers,
    }


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile", action="store_true", help="also time zaya_hf with a static cache and a compiled decode step"
    )
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA/ROCm device.")
    ours, reference = build_models(device, dtype, args.seed)
    vocab = ours.config.vocab_size

    result = {"config": "bench-small", "device": str(device), "dtype": args.dtype, "repeats": args.repeats,
              "torch_threads": torch.get_num_threads(), "load_average_1min_at_start": os.getloadavg()[0]}
    identical = True
    for batch in (1, 16):
        prompt = torch.randint(1, vocab, (batch, args.prompt_tokens), device=device)
        fns = {}
        variants = [("zaya_hf", ours, {}), ("transformers", reference, {})]
        if args.compile:
            compile_config = CompileConfig(fullgraph=True, dynamic=False)
            compile_config._compile_all_devices = True  # generate() compiles only on accelerators otherwise
            variants.append(("zaya_hf_compiled", ours, {"cache_implementation": "static", "compile_config": compile_config}))
        for name, model, kwargs in variants:
            fns[f"{name}_full"] = generate_fn(model, prompt, args.new_tokens, **kwargs)
            fns[f"{name}_prefill"] = generate_fn(model, prompt, 1, **kwargs)
        times = median_times(fns, device, args.repeats)
        for name, _, _ in variants:
            decode_seconds = times[f"{name}_full"] - times[f"{name}_prefill"]
            result[f"{name}_decode_tok_s_bs{batch}"] = round(batch * (args.new_tokens - 1) / decode_seconds, 1)
        for name, _, _ in variants[:1] + variants[2:]:
            ratio_name = "decode_ratio" if name == "zaya_hf" else "compiled_decode_ratio"
            result[f"{ratio_name}_bs{batch}"] = round(
                result[f"{name}_decode_tok_s_bs{batch}"] / result[f"transformers_decode_tok_s_bs{batch}"], 2
            )
        identical &= torch.equal(fns["zaya_hf_full"](), fns["transformers_full"]())

    long_prompt = torch.randint(1, vocab, (1, args.prefill_tokens), device=device)
    times = median_times(
        {
            "zaya_hf": lambda: ours(long_prompt, cache=ZayaCache(ours.config), use_cache=True),
            "transformers": lambda: reference(long_prompt, use_cache=True),
        },
        device,
        args.repeats,
    )
    result[f"zaya_hf_prefill_tok_s_{args.prefill_tokens}"] = round(args.prefill_tokens / times["zaya_hf"], 1)
    result[f"transformers_prefill_tok_s_{args.prefill_tokens}"] = round(args.prefill_tokens / times["transformers"], 1)
    result[f"prefill_ratio_{args.prefill_tokens}"] = round(times["transformers"] / times["zaya_hf"], 2)
    result["greedy_tokens_identical"] = identical

    result["load_average_1min_at_end"] = os.getloadavg()[0]  # other processes on the CPU skew both sides
    result.update(measure_cache_bytes(ours, device))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
