"""Long-context decode at ZAYA1-8B's layer size: what a one-token step costs with 8K and 32K tokens cached, zaya_hf
against transformers' own ZAYA, and what the cache holds on full and sliding-window layers.

A step at T cached tokens must read each full layer's T keys and values (bf16: 2 * K * D * 2 bytes per token); on
top of the step at 0 cached tokens, that is its attention cost, and the read bandwidth (fp32 `sum` over 1 GiB, on the
same threads) bounds it. Both models hold the same random weights (ZAYA1-8B's layers, `--layers` of them, a small
vocabulary: the head is not timed) and run the decoder stack alone, in turns. Each cache is prefilled with
`--prompt-tokens` real tokens (every CCA state set as in generation), then given T random keys/values per layer,
then timed over `--steps` one-token steps. zaya_hf runs on the `ZayaCache` its `generate()` uses (room reserved up to
the call's length, as `generate()` does), transformers on its `DynamicCache`; both with "sdpa" attention (zaya_hf's
CPU steps pack the query heads per KV head, transformers' ask torch for `enable_gqa` when there is no mask). A second config with every layer
`hybrid_sliding` (window `--sliding-window`) shows zaya_hf's cache and step staying at the window's size
(zaya_hf only: it checks zaya_hf's cache, not a comparison). Prints one JSON line (and writes it to `--output`).

    python benchmarks/bench_long_context.py [--layers 2] [--context 0 8192 32768] [--threads 2] [--output ...]
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from zaya_hf import ZayaCache, ZayaForCausalLM
from zaya_hf.bench import reference_twin
from zaya_hf.bench.checkpoint import _random_tensor, zaya1_8b_config
from zaya_hf.bench.real_size import _ExpertRecorder, read_bandwidth
from zaya_hf.bench.record import emit


def random_model(config, seed: int) -> ZayaForCausalLM:
    """ZAYA1-8B-shaped random weights drawn as the real-size benchmark's checkpoint draws them (routers spread)."""
    model = ZayaForCausalLM(config).to(torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name != "lm_head.weight":  # tied to the embedding
                tensor.copy_(_random_tensor(name, tensor.shape, generator))
    return model


def cache_bytes(cache) -> int:
    """Bytes the cache holds: zaya_hf's `nbytes` (its reserved room included), else every layer's tensors."""
    if isinstance(cache, ZayaCache):
        return cache.nbytes
    held = []
    for layer in cache.layers:
        held += [layer.keys, layer.values, *getattr(layer, "conv_states", []), *getattr(layer, "recurrent_states", [])]
    return sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor))


@torch.no_grad()
def filled_cache(model, kind: str, context: int, prompt_tokens: int, steps: int, seed: int):
    """A cache after `prompt_tokens` real tokens and `context` random keys/values per layer."""
    config = model.config
    if kind == "zaya_hf":
        cache = ZayaCache(config)
        cache.set_max_length(prompt_tokens + context + steps)  # as generate() reserves for its call
    else:
        cache = DynamicCache(config=config)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, config.vocab_size, (1, prompt_tokens), generator=generator)
    model.model(prompt, cache=cache, use_cache=True)
    shape = (1, config.num_key_value_heads, 4096, config.head_dim)  # in chunks, as a chunked prefill writes them
    for start in range(0, context, shape[2]):
        length = min(shape[2], context - start)
        for layer in range(config.num_hidden_layers):
            keys = torch.randn(shape, generator=generator).to(torch.bfloat16)[:, :, :length]
            cache.update(keys, torch.randn_like(keys), layer)
    return cache


@torch.no_grad()
def step_seconds(model, cache, position: int, steps: int, seed: int) -> list[float]:
    """Seconds of each of `steps` one-token steps of the decoder stack, from `position` on."""
    generator = torch.Generator().manual_seed(seed)
    seconds = []
    for step in range(steps):
        token = torch.randint(1, model.config.vocab_size, (1, 1), generator=generator)
        positions = torch.tensor([[position + step]])
        start = time.perf_counter()
        model.model(token, cache=cache, position_ids=positions, use_cache=True)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--context", type=int, nargs="+", default=[0, 8192, 32768])
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sliding-window", type=int, default=4096)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if 0 not in args.context:
        raise SystemExit("--context must include 0: the attention cost is the step's time above that at 0 tokens.")

    config = zaya1_8b_config(args.layers)
    config.vocab_size = args.vocab_size
    ours = random_model(config, args.seed)
    models = {"zaya_hf": ours, "transformers": reference_twin(ours).to(torch.bfloat16).eval()}
    recorder = _ExpertRecorder(ours.model, config.num_experts)  # the stack alone is run
    kv_bytes_per_token = 2 * config.num_key_value_heads * config.head_dim * 2  # keys and values, bf16, one layer
    result = {"config": "ZAYA1-8B layers", "layers": args.layers, "dtype": "bfloat16", "batch": 1,
              "threads": torch.get_num_threads(), "steps": args.steps, "repeats": args.repeats,
              "load_average_1min": [os.getloadavg()[0]], "read_bandwidth_GBps": [round(read_bandwidth() / 1e9, 2)]}

    medians: dict[str, dict[int, float]] = {name: {} for name in models}
    for context in args.context:
        samples = {name: [] for name in models}
        held = {}
        recorder.start()  # the decode steps' experts, zaya_hf's model only (the same weights in both)
        for repeat in range(args.repeats):
            order = list(models) if repeat % 2 == 0 else list(models)[::-1]
            for name in order:
                cache = filled_cache(models[name], name, context, args.prompt_tokens, args.steps, args.seed + repeat)
                recorder.active = name == "zaya_hf"
                samples[name] += step_seconds(models[name], cache, args.prompt_tokens + context, args.steps, args.seed)
                recorder.active = False
                held[name] = cache_bytes(cache)
                del cache
        for name in models:
            medians[name][context] = statistics.median(samples[name])
            result[f"{name}_step_ms_{context}"] = round(1e3 * medians[name][context], 2)
            result[f"{name}_cache_bytes_{context}"] = held[name]
        result[f"step_ratio_{context}"] = round(medians["transformers"][context] / medians["zaya_hf"][context], 2)
        result[f"expert_usage_{context}"] = recorder.usage()
    result["read_bandwidth_GBps"].append(round(read_bandwidth() / 1e9, 2))
    result["load_average_1min"].append(os.getloadavg()[0])

    # Attention cost per full layer and per 1K cached tokens, against the bound of reading their keys and values.
    bandwidth = max(result["read_bandwidth_GBps"]) * 1e9
    for context in args.context:
        if context == 0:
            continue
        bound = context * kv_bytes_per_token * args.layers / bandwidth
        for name in models:
            extra = medians[name][context] - medians[name][0]
            result[f"{name}_attention_ms_per_layer_per_1k_tokens_{context}"] = round(1e3 * extra / args.layers / (context / 1024), 3)
            result[f"{name}_fraction_of_kv_bound_{context}"] = round(bound / extra, 3) if extra > 0 else None
    result["kv_bytes_per_token_per_layer"] = kv_bytes_per_token

    # Sliding-window layers (zaya_hf only): the cache and the step stop growing at the window.
    sliding = zaya1_8b_config(args.layers)
    sliding.vocab_size, sliding.sliding_window = args.vocab_size, args.sliding_window
    sliding.layer_types = ["hybrid_sliding"] * args.layers
    windowed = random_model(sliding, args.seed)
    for context in args.context:
        seconds = []
        for repeat in range(args.repeats):
            cache = filled_cache(windowed, "zaya_hf", context, args.prompt_tokens, args.steps, args.seed + repeat)
            seconds += step_seconds(windowed, cache, args.prompt_tokens + context, args.steps, args.seed)
        result[f"sliding_{args.sliding_window}_step_ms_{context}"] = round(1e3 * statistics.median(seconds), 2)
        result[f"sliding_{args.sliding_window}_cache_bytes_{context}"] = cache.nbytes
    emit(result, "benchmarks/bench_long_context.py", args, args.output)


if __name__ == "__main__":
    main()
