"""The bias balancer's rules on skewed frozen routers: the figures of README "Pre- and mid-training with bias balancing".

A 3-layer tiny ZAYA (4 experts, hidden 64, router hidden 16) whose router logit row of expert 0 is boosted so that
it wins most tokens, every weight frozen: only the balancer moves anything. Each step routes a fresh batch of 16 x 32
random tokens in training mode and steps the balancer; at steps 100, 200 and 300 every layer's max/mean expert load
is measured on 8192 held-out random tokens (256 x 32; 1.0 = perfect; tokens of a sequence route alike, so a
smaller sample alone puts several percent on a perfectly balanced router). Three router families, each with `--seeds` seeds:

- sharp: router weights of std 0.5 (token-dependent, confident choices), row 0 of the logits + 0.25;
- flat: the model's own init (std 0.02: probabilities within ~1e-4 of each other, as in a fresh model), row 0 + 0.25;
- shifted: every weight, scale and bias perturbed (weights std 0.1, balancing biases std 0.05, the skip class
  included), row 0 + 0.5.

Rules: "pid" (the default: adaptive gain), "pid-margin" (`adaptive_gain=False`: the gain is the layer's mean decision
margin, the rule of earlier versions) and "sign" (DeepSeek-V3's sign update, default step 1e-3 decaying over 100
steps). Writes one JSON object with every measurement and prints a summary table.

    python benchmarks/bench_balancer.py [--seeds 6] [--steps 300] [--output benchmarks/results/bench_balancer.json]
"""

import argparse
import json
import time

import torch

from zaya_hf import ZayaConfig, ZayaForCausalLM
from zaya_hf.training import BiasBalancer, collect_router_loads, expert_load_imbalance, zaya_routers

RULES = {
    "pid": {},
    "pid-margin": {"adaptive_gain": False},
    "sign": {"rule": "sign"},
}
FAMILIES = ("sharp", "flat", "shifted")
VOCAB = 101


@torch.no_grad()
def skewed_router_model(family: str, seed: int) -> ZayaForCausalLM:
    torch.manual_seed(seed)
    config = ZayaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=4, moe_intermediate_size=32, router_hidden_size=16,
        layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=6, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    model = ZayaForCausalLM(config)
    boost = 0.25
    if family == "sharp":
        for name, param in model.named_parameters():
            if ".mlp.gate." in name and param.ndim == 2:
                param.normal_(0.0, 0.5)
    elif family == "shifted":
        boost = 0.5
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            if any(key in name for key in ("scale", "norm", "temp")):
                param.copy_(1.0 + 0.3 * noise)
            else:
                param.copy_((0.2 if "bias" in name else 0.1) * noise)
        for router in zaya_routers(model):
            router.balancing_biases.normal_(0.0, 0.05)
    for router in zaya_routers(model):
        router.router_mlp.out_proj.weight[0] += boost
    return model.requires_grad_(False).train()


@torch.no_grad()
def run(family: str, seed: int, balancer: BiasBalancer, steps: int, measure_at: tuple[int, ...]) -> dict[int, list]:
    """Per-layer held-out max/mean at the steps of `measure_at`."""
    model = skewed_router_model(family, seed)
    batches = torch.Generator().manual_seed(seed + 100)
    held_out = torch.randint(3, VOCAB, (256, 32), generator=torch.Generator().manual_seed(999))
    imbalance = {}
    for step in range(1, steps + 1):
        model(torch.randint(3, VOCAB, (16, 32), generator=batches))
        balancer.step(model)
        if step in measure_at:
            collect_router_loads(model)
            model(held_out)
            imbalance[step] = [round(x, 4) for x in expert_load_imbalance(collect_router_loads(model)).tolist()]
    return imbalance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output", default="benchmarks/results/bench_balancer.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    measure_at = tuple(sorted({args.steps // 3, 2 * args.steps // 3, args.steps}))

    runs, start = [], time.time()
    for family in FAMILIES:
        for seed in range(args.seeds):
            for rule, kwargs in RULES.items():
                imbalance = run(family, seed, BiasBalancer(**kwargs), args.steps, measure_at)
                runs.append({"family": family, "seed": seed, "rule": rule, "max_over_mean": imbalance})
                print(json.dumps(runs[-1]), flush=True)

    summary = {}
    for rule in RULES:
        for family in FAMILIES:
            final = [max(r["max_over_mean"][args.steps]) for r in runs if r["rule"] == rule and r["family"] == family]
            summary[f"{rule}/{family}"] = {
                "worst_layer_worst_seed": max(final),
                "worst_layer_median_seed": sorted(final)[len(final) // 2],
                "seeds_at_or_below_1.1": sum(x <= 1.1 for x in final),
            }
    result = {
        "command": f"python benchmarks/bench_balancer.py --seeds {args.seeds} --steps {args.steps}",
        "torch": torch.__version__,
        "seconds": round(time.time() - start, 1),
        "summary": summary,
        "runs": runs,
    }
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'rule/family':<22} worst layer at step {args.steps}: worst seed, median seed, seeds <= 1.1")
    for key, row in summary.items():
        print(f"{key:<22} {row['worst_layer_worst_seed']:.3f} {row['worst_layer_median_seed']:.3f} "
              f"{row['seeds_at_or_below_1.1']}/{args.seeds}")


if __name__ == "__main__":
    main()
