"""Speed of the fused Triton kernels (zaya_hf.ops) against the model's torch forwards, on one CUDA or ROCm GPU.

Per kernel at ZAYA1-8B layer sizes (hidden 2048, 8 query / 2 kv heads of 128, 16 experts of 2048, router 256,
bf16): its result against the model's torch forward (relative difference, router choices that agree), its speed,
then the whole model (ZAYA1-8B sizes, `--layers` of the 40 layers, random weights): prefill latency and
greedy decode throughput with kernel_backend="torch" vs "triton". Prints one JSON line.

    python benchmarks/bench_kernels.py                 # needs a GPU
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --smoke   # tiny shapes on CPU: checks the script only
"""

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

from zaya_hf import ZayaConfig, ZayaForCausalLM
from zaya_hf.modeling_zaya import ZayaExperts, ZayaRouter, apply_rotary_pos_emb

try:
    from zaya_hf.ops import triton_kernels as kernels
    from zaya_hf.ops.triton import TritonExperts, TritonRouter
except ImportError:
    kernels = None


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of `fn()` after two warm-up calls (which also compile and autotune)."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return sorted(times)[len(times) // 2]


def compare(torch_fn: Callable[[], object], triton_fn: Callable[[], object], device: torch.device, repeats: int):
    torch_ms, triton_ms = time_ms(torch_fn, device, repeats), time_ms(triton_fn, device, repeats)
    return {
        "torch_ms": round(torch_ms, 4), "triton_ms": round(triton_ms, 4), "speedup": round(torch_ms / triton_ms, 3)
    }


def build_model(config: ZayaConfig, device: torch.device, dtype: torch.dtype, backend: str) -> ZayaForCausalLM:
    torch.manual_seed(0)
    config.kernel_backend = backend
    with torch.device(device):  # initialise on the GPU: an 8B-sized embedding is slow to fill on the CPU
        return ZayaForCausalLM(config).to(dtype).eval()


def layer_operations(model: ZayaForCausalLM, batch: int, seq_len: int) -> dict[str, tuple[Callable, Callable]]:
    """(model's torch forward, fused kernel) callables of each fused operation, on random inputs for one layer."""
    config, (device, dtype) = model.config, (model.device, model.dtype)
    layer = model.model.layers[1]  # a layer that carries the router state
    attention, router, experts = layer.self_attn, layer.mlp.gate, layer.mlp.experts
    projection = attention.qkv_proj
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, device=device, generator=gen).to(dtype)

    hidden = randn(batch, seq_len, config.hidden_size)
    rotary_dim = int(config.head_dim * config.rope_parameters["hybrid"]["partial_rotary_factor"])
    angles = randn(batch, seq_len, rotary_dim, dtype=torch.float32)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    depthwise, grouped = projection.conv_qk_depthwise, projection.conv_qk_grouped

    def cca_torch():
        query, key, _ = projection(hidden)
        query, key = attention.qk_norm(query, key)
        return apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)

    def cca_triton():
        return kernels.cca_qk_mix(projection.q_proj(hidden), projection.k_proj(hidden), None, depthwise.weight,
                                  depthwise.bias, grouped.weight, grouped.bias, attention.qk_norm.temp, cos, sin)

    scaling, norm = layer.post_attention_residual_scale, layer.post_attention_layernorm
    residual = randn(batch, seq_len, config.hidden_size, dtype=torch.float32)
    router_args = (hidden, randn(batch, seq_len, config.router_hidden_size))
    _, weights, index, _ = ZayaRouter.forward(router, *router_args)
    expert_args = (hidden.reshape(-1, config.hidden_size), index, weights)
    return {
        "cca_qk_mix": (cca_torch, cca_triton),
        "residual_merge_rmsnorm": (
            lambda: norm(scaling(hidden, residual).to(dtype)),
            partial(kernels.residual_merge_rmsnorm, hidden, residual, *scaling.parameters(), norm.weight,
                    norm.variance_epsilon),
        ),
        "router": (partial(ZayaRouter.forward, router, *router_args), partial(TritonRouter.forward, router, *router_args)),
        "moe_top1": (partial(ZayaExperts.forward, experts, *expert_args),
                     partial(TritonExperts.forward, experts, *expert_args)),
    }


# What each kernel's result is compared on: the pairs of tensors (model's forward, kernel) that must agree.
COMPARED = {
    "cca_qk_mix": lambda ours, fused: [(ours[0].transpose(1, 2), fused[0]), (ours[1].transpose(1, 2), fused[1])],
    "residual_merge_rmsnorm": lambda ours, fused: [(ours, fused[1])],  # fused: (new residual, its norm)
    "router": lambda ours, fused: [(ours[0], fused[0]), (ours[1], fused[1]), (ours[3], fused[3])],
    "moe_top1": lambda ours, fused: [(ours, fused)],
}
# Largest difference allowed, relative to the largest magnitude of the model's result (bf16 keeps 8 bits).
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def check_kernels(config: ZayaConfig, tokens: int, decode_batch: int, device, dtype) -> dict:
    """Each fused operation's result against the model's torch forward on the same inputs, for a prefill and a decode
    step: the largest difference relative to the result's scale, and the router's top-1 choices that agree."""
    model = build_model(config, device, dtype, "torch")
    results = {}
    with torch.no_grad():
        for regime, batch, seq_len in (("prefill", 1, tokens), ("decode", decode_batch, 1)):
            for name, (torch_fn, triton_fn) in layer_operations(model, batch, seq_len).items():
                ours, fused = torch_fn(), triton_fn()
                relative = max(
                    ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp(min=1e-6)).item()
                    for a, b in COMPARED[name](ours, fused)
                )
                check = {"max_relative_diff": relative, "ok": relative <= TOLERANCE[dtype]}
                if name == "router":
                    check["top1_agreement"] = (ours[2] == fused[2]).float().mean().item()
                    check["ok"] = check["ok"] and check["top1_agreement"] >= 0.99
                results[f"{name}_{regime}"] = check
    return results


def bench_kernels(config: ZayaConfig, tokens: int, decode_batch: int, device, dtype, repeats: int) -> dict:
    """Each fused operation vs the torch code that kernel_backend="torch" runs, for a prefill and a decode step."""
    model = build_model(config, device, dtype, "torch")
    results = {}
    with torch.no_grad():
        for regime, batch, seq_len in (("prefill", 1, tokens), ("decode", decode_batch, 1)):
            for name, (torch_fn, triton_fn) in layer_operations(model, batch, seq_len).items():
                results[f"{name}_{regime}"] = compare(torch_fn, triton_fn, device, repeats)
    return results


def bench_model(config: ZayaConfig, tokens: int, decode_batch: int, new_tokens: int, device, dtype, repeats: int):
    """Prefill latency and greedy decoding throughput of the whole model with each backend."""
    models = {backend: build_model(config, device, dtype, backend) for backend in ("torch", "triton")}
    gen = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (1, tokens), device=device, generator=gen)
    decode_prompt = torch.randint(3, config.vocab_size, (decode_batch, min(tokens, 128)), device=device, generator=gen)
    results, logits = {}, {}
    with torch.no_grad():
        for backend, model in models.items():  # the same weights: both built from seed 0
            logits[backend] = model(prompt, use_cache=False).logits[:, -1].float()
            prefill = partial(model, prompt, use_cache=False)
            results[f"prefill_{backend}_ms"] = round(time_ms(prefill, device, repeats), 3)
            generate = lambda: model.generate(  # noqa: E731
                decode_prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
            seconds = time_ms(generate, device, max(1, repeats // 5)) / 1e3
            results[f"decode_{backend}_tokens_per_s"] = round(decode_batch * new_tokens / seconds, 1)
    results["prefill_speedup"] = round(results["prefill_torch_ms"] / results["prefill_triton_ms"], 3)
    results["decode_speedup"] = round(results["decode_triton_tokens_per_s"] / results["decode_torch_tokens_per_s"], 3)
    results["max_abs_logit_diff"] = (logits["torch"] - logits["triton"]).abs().max().item()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="prefill tokens")
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row in the decode benchmark")
    parser.add_argument("--layers", type=int, default=4, help="layers of the whole-model benchmark (ZAYA1-8B: 40)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1 (no timings)")
    args = parser.parse_args()

    if kernels is None:
        sys.exit("bench_kernels.py needs triton: pip install 'zaya-hf[triton]'.")
    if args.smoke:
        if not kernels.INTERPRET:
            sys.exit("--smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1.")
        device, dtype = torch.device("cpu"), torch.float32
        sizes = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                     moe_intermediate_size=32, router_hidden_size=16, vocab_size=101, eos_token_id=2)
        args.tokens, args.decode_batch, args.new_tokens, args.layers, args.repeats = 8, 2, 2, 2, 1
    else:
        if not torch.cuda.is_available() or kernels.INTERPRET:
            sys.exit(
                "bench_kernels.py measures GPU speed and needs a CUDA or ROCm GPU (with TRITON_INTERPRET unset); "
                "none is available here. Use --smoke with TRITON_INTERPRET=1 to check the script on CPU."
            )
        device, dtype, sizes = torch.device("cuda"), torch.bfloat16, {}  # ZAYA1-8B sizes are the config defaults
    torch.manual_seed(0)
    config = ZayaConfig(num_hidden_layers=2, **sizes)
    correctness = check_kernels(config, args.tokens, args.decode_batch, device, dtype)
    per_kernel = bench_kernels(config, args.tokens, args.decode_batch, device, dtype, args.repeats)
    config = ZayaConfig(num_hidden_layers=args.layers, **sizes)
    whole_model = bench_model(config, args.tokens, args.decode_batch, args.new_tokens, device, dtype, args.repeats)
    print(json.dumps({
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter smoke run)",
        "torch": torch.__version__,
        "hip": torch.version.hip,
        "cuda": torch.version.cuda,
        "triton": __import__("triton").__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": args.tokens,
        "decode_batch": args.decode_batch,
        "layers": args.layers,
        "kernels_correct": all(check["ok"] for check in correctness.values()),
        "correctness": correctness,
        "kernels": per_kernel,
        "model": whole_model,
    }))


if __name__ == "__main__":
    main()
