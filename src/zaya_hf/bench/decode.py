"""Decode / prefill speed and cache size of zaya_hf against transformers' own ZAYA, measured in one process.

Both models hold the same weights and run alternately: a warm-up, then `repeats` timed repetitions of each
measurement; the median is reported. Greedy outputs are compared token for token.
"""

import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from transformers import CompileConfig

from ..cache_zaya import ZayaCache
from ..configuration_zaya import ZayaConfig
from ..modeling_zaya import ZayaForCausalLM

BENCH_SMALL = dict(
    vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
    head_dim=64, num_experts=16, moe_intermediate_size=512, router_hidden_size=64, eos_token_id=None,
    bos_token_id=None, pad_token_id=0,
)


def build_bench_small(seed: int = 0) -> ZayaForCausalLM:
    """The "bench-small" model with random weights; routers nudged away from init so every expert gets traffic."""
    torch.manual_seed(seed)
    model = ZayaForCausalLM(ZayaConfig(**BENCH_SMALL))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "balancing_biases"):
                module.balancing_biases.normal_(0.0, 0.01)
    return model


def reference_twin(model: ZayaForCausalLM):
    """transformers' own `ZayaForCausalLM` holding the same weights as `model` (strict load: same tensor names)."""
    from transformers.models.zaya.configuration_zaya import ZayaConfig as ReferenceConfig
    from transformers.models.zaya.modeling_zaya import ZayaForCausalLM as ReferenceForCausalLM

    reference = ReferenceForCausalLM(ReferenceConfig(**model.config.to_diff_dict()))
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def generate_fn(model, prompt: torch.Tensor, new_tokens: int, **kwargs) -> Callable:
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
def run_decode_benchmark(
    ours: ZayaForCausalLM,
    reference=None,
    *,
    batch_sizes: Sequence[int] = (1, 16),
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    prefill_tokens: int = 1024,
    repeats: int = 3,
    compile_decode: bool = False,
    on_measurement: Callable[[str], None] | None = None,
) -> dict:
    """Decode tokens/s per batch size, prefill tokens/s, bf16 cache bytes (per token per layer, and the fixed
    per-sequence state); with `reference`, the same speeds for transformers' ZAYA, the ratios and whether greedy
    tokens are identical; with `compile_decode`, zaya_hf also with a static cache and a compiled decode step
    ("zaya_hf_compiled"). Both models must be on one device. Leaves `ours` in bf16 (the cache is measured last)."""
    device = ours.device
    variants = [("zaya_hf", ours, {})] + ([] if reference is None else [("transformers", reference, {})])
    if compile_decode:
        compile_config = CompileConfig(fullgraph=True, dynamic=False)  # zaya_hf compiles on CPU when given one
        variants.append(("zaya_hf_compiled", ours, {"cache_implementation": "static", "compile_config": compile_config}))
    vocab = ours.config.vocab_size
    result: dict = {"torch_threads": torch.get_num_threads(), "load_average_1min_at_start": os.getloadavg()[0]}
    identical = {name: True for name, _, _ in variants if name != "transformers"}  # greedy tokens == the reference's
    for batch in batch_sizes:
        prompt = torch.randint(1, vocab, (batch, prompt_tokens), device=device)
        fns = {}
        for name, model, kwargs in variants:
            fns[f"{name}_full"] = generate_fn(model, prompt, new_tokens, **kwargs)
            fns[f"{name}_prefill"] = generate_fn(model, prompt, 1, **kwargs)
        times = median_times(fns, device, repeats)
        for name, _, _ in variants:
            decode_seconds = times[f"{name}_full"] - times[f"{name}_prefill"]
            result[f"{name}_decode_tok_s_bs{batch}"] = round(batch * (new_tokens - 1) / decode_seconds, 1)
        if reference is not None:
            for name in ("zaya_hf", "zaya_hf_compiled")[: 1 + compile_decode]:
                ratio_name = "decode_ratio" if name == "zaya_hf" else "compiled_decode_ratio"
                result[f"{ratio_name}_bs{batch}"] = round(
                    result[f"{name}_decode_tok_s_bs{batch}"] / result[f"transformers_decode_tok_s_bs{batch}"], 2
                )
            expected = fns["transformers_full"]()
            for name in identical:
                identical[name] &= torch.equal(fns[f"{name}_full"](), expected)
        if on_measurement is not None:
            on_measurement(f"decode bs{batch}")

    long_prompt = torch.randint(1, vocab, (1, prefill_tokens), device=device)
    prefill_fns = {"zaya_hf": lambda: ours(long_prompt, cache=ZayaCache(ours.config), use_cache=True)}
    if reference is not None:
        prefill_fns["transformers"] = lambda: reference(long_prompt, use_cache=True)
    times = median_times(prefill_fns, device, repeats)
    for name, seconds in times.items():
        result[f"{name}_prefill_tok_s_{prefill_tokens}"] = round(prefill_tokens / seconds, 1)
    if reference is not None:
        result[f"prefill_ratio_{prefill_tokens}"] = round(times["transformers"] / times["zaya_hf"], 2)
        result["greedy_tokens_identical"] = identical["zaya_hf"]
        if compile_decode:
            result["compiled_greedy_tokens_identical"] = identical["zaya_hf_compiled"]
    if on_measurement is not None:
        on_measurement(f"prefill {prefill_tokens}")

    result["load_average_1min_at_end"] = os.getloadavg()[0]  # other processes on the CPU skew both sides
    result.update(measure_cache_bytes(ours))
    return result


@torch.no_grad()
def measure_cache_bytes(model: ZayaForCausalLM) -> dict:
    """KV bytes per token per layer and the fixed per-sequence CCA state, read off real `ZayaCache` objects in bf16.
    Casts `model` to bf16 in place: run it last."""
    model = model.to(torch.bfloat16)
    # Two lengths below any sliding window, so that every layer's cache still grows between them.
    short = 64 if "hybrid_sliding" not in model.config.layer_types else max(1, (model.config.sliding_window - 1) // 2)
    held = {}
    for length in (short, 2 * short):
        cache = ZayaCache(model.config)
        model(torch.randint(1, model.config.vocab_size, (1, length), device=model.device), cache=cache, use_cache=True)
        held[length] = cache.nbytes
    layers = model.config.num_hidden_layers
    per_token_per_layer = (held[2 * short] - held[short]) / short / layers
    return {
        "cache_bf16_kv_bytes_per_token_per_layer": per_token_per_layer,
        "cache_bf16_fixed_bytes_per_sequence_per_layer": (held[short] - short * per_token_per_layer * layers) / layers,
    }


__all__ = ["BENCH_SMALL", "build_bench_small", "reference_twin", "run_decode_benchmark"]
