"""Quantized ZAYA against bf16 on the same weights: accuracy (KL, greedy agreement) and decode speed.

Every model is written once in bf16 and loaded back both ways through `from_pretrained` (bf16, and
`quantization_config=ZayaQuantizationConfig(...)`: int8 per channel, int4 group 64), so the quantized models are
exactly what users get. Prints one JSON line per measurement.

    python benchmarks/bench_quant.py accuracy                    # embedded model and bench-small, 64 prompts each
    python benchmarks/bench_quant.py speed --model bench-small [--compile]
    python benchmarks/bench_quant.py speed --model stack [--compile]   # 4 layers at ZAYA1-8B's sizes, vocab 32000

accuracy: the bf16 model's greedy continuation (32 tokens) of each prompt is scored teacher-forced by both models:
mean per-token KL(bf16 || quantized) over those tokens and the fraction where both argmaxes agree; plus the fraction
of prompts whose free-running greedy continuation is identical. speed: decode tokens/s (generate with and without
the decode steps, median of `--repeats`, the models alternating), eager and with a compiled static-cache step.
"""

import argparse
import json
import os
import sys
import tempfile

import torch
from transformers import CompileConfig

from zaya_hf import ZayaConfig, ZayaForCausalLM, default_model_path
from zaya_hf.bench import build_bench_small
from zaya_hf.bench.decode import generate_fn, median_times
from zaya_hf.bench.record import machine
from zaya_hf.quantization import ZayaQuantizationConfig

COMMAND = " ".join(["python", *sys.argv])
FORMATS = {"int8": dict(bits=8, group_size=None), "int4": dict(bits=4, group_size=64)}
# Four decoder layers of ZAYA1-8B (hidden 2048, 16 experts of intermediate 2048, 8 / 2 heads of 128); a 32k vocab
# so that the layers, not the LM head, dominate a step.
STACK = dict(num_hidden_layers=4, layer_types=["hybrid"] * 4, vocab_size=32000, pad_token_id=0, bos_token_id=None,
             eos_token_id=None)


def load_all(path: str) -> dict[str, ZayaForCausalLM]:
    models = {"bf16": ZayaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()}
    for name, kwargs in FORMATS.items():
        models[name] = ZayaForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, quantization_config=ZayaQuantizationConfig(**kwargs)
        ).eval()
    return models


def build_stack(seed: int = 0) -> ZayaForCausalLM:
    """Random ZAYA1-8B-sized layers, built in bf16; router output layers spread (std 0.5) so that routing depends
    on the token, not on the init (checked by `expert_usage`)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = ZayaForCausalLM(ZayaConfig(**STACK))
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.router_mlp.out_proj.weight.normal_(0.0, 0.5)
    return model


@torch.no_grad()
def expert_usage(model: ZayaForCausalLM, inputs: list[torch.Tensor]) -> dict:
    """Share of the tokens each router class (E experts + skip) gets over all layers and `inputs`: min / max over
    the experts."""
    counts = torch.zeros(model.config.num_experts + 1)
    for input_ids in inputs:
        logits = model(input_ids, output_router_logits=True).router_logits
        for layer, layer_logits in zip(model.model.layers, logits):
            choice = (layer_logits.float().softmax(-1) + layer.mlp.gate.balancing_biases).argmax(-1)
            counts += torch.bincount(choice, minlength=counts.numel()).float()
    shares = counts / counts.sum()
    return {"expert_share_min": round(shares[:-1].min().item(), 4), "expert_share_max": round(shares[:-1].max().item(), 4),
            "skip_share": round(shares[-1].item(), 4), "uniform_share": round(1 / model.config.num_experts, 4)}


def embedded_prompts(count: int) -> tuple[list[torch.Tensor], str]:
    from transformers import AutoTokenizer

    from zaya_hf.generation_zaya import encode_chat, question_messages
    from zaya_hf.tiny_reasoner.task import held_out_problems

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    prompts = [torch.tensor([encode_chat(tokenizer, question_messages(p.question))]) for p in held_out_problems(count)]
    return prompts, "held-out questions of the embedded model's task, chat-encoded"


@torch.no_grad()
def accuracy(models: dict[str, ZayaForCausalLM], prompts: list[torch.Tensor], new_tokens: int) -> dict:
    reference = models["bf16"]
    result = {}
    continuations = [reference.generate(p, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                     for p in prompts]
    for name, model in models.items():
        if name == "bf16":
            continue
        kl_sum = agree = tokens = identical = 0
        for prompt, sequence in zip(prompts, continuations):
            scored = slice(prompt.shape[1] - 1, sequence.shape[1] - 1)  # positions predicting the new tokens
            expected = reference(sequence).logits[0, scored].float().log_softmax(-1)
            got = model(sequence).logits[0, scored].float().log_softmax(-1)
            kl_sum += torch.nn.functional.kl_div(got, expected, log_target=True, reduction="sum").item()
            agree += (got.argmax(-1) == expected.argmax(-1)).sum().item()
            tokens += expected.shape[0]
            own = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            identical += torch.equal(own, sequence)
        result[name] = {"mean_token_kl": kl_sum / tokens, "greedy_token_agreement": agree / tokens,
                        "identical_greedy_continuations": identical / len(prompts), "scored_tokens": tokens}
    return result


def run_accuracy(args) -> None:
    if "embedded" in args.models:
        embedded = load_all(default_model_path())
        prompts, description = embedded_prompts(args.prompts)
        print(json.dumps({"command": COMMAND, "model": "embedded", "prompts": len(prompts),
                          "prompt_source": description, "new_tokens": args.new_tokens,
                          **expert_usage(embedded["bf16"], prompts),
                          **accuracy(embedded, prompts, args.new_tokens)}), flush=True)
        del embedded
    if "bench-small" in args.models:
        with tempfile.TemporaryDirectory() as folder:
            build_bench_small(args.seed).to(torch.bfloat16).save_pretrained(folder)
            small = load_all(folder)
        generator = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(1, small["bf16"].config.vocab_size, (1, 16), generator=generator)
                   for _ in range(args.prompts)]
        print(json.dumps({"command": COMMAND, "model": "bench-small", "prompts": len(prompts),
                          "prompt_source": "random tokens (16)", "new_tokens": args.new_tokens,
                          **expert_usage(small["bf16"], prompts),
                          **accuracy(small, prompts, args.new_tokens)}), flush=True)


@torch.no_grad()
def run_speed(args) -> None:
    with tempfile.TemporaryDirectory() as folder:
        source = build_bench_small(args.seed) if args.model == "bench-small" else build_stack(args.seed)
        source.to(torch.bfloat16).save_pretrained(folder)
        del source
        models = load_all(folder)
    vocab = models["bf16"].config.vocab_size
    compile_kwargs = {"cache_implementation": "static", "compile_config": CompileConfig(fullgraph=True, dynamic=False)}
    result = {"command": COMMAND, "machine": machine(), "model": args.model, "torch_threads": torch.get_num_threads(), "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "load_average_1min_at_start": os.getloadavg()[0]}
    probe = torch.randint(1, vocab, (16, args.prompt_tokens), generator=torch.Generator().manual_seed(args.seed))
    result.update(expert_usage(models["bf16"], [probe]))
    for batch in args.batch_sizes:
        prompt = probe[:batch]
        variants = {name: (model, {}) for name, model in models.items()}
        if args.compile:
            variants.update({f"{name}_compiled": (model, compile_kwargs) for name, model in models.items()})
        fns = {}
        for name, (model, kwargs) in variants.items():
            fns[f"{name}_full"] = generate_fn(model, prompt, args.new_tokens, **kwargs)
            fns[f"{name}_prefill"] = generate_fn(model, prompt, 1, **kwargs)
        times = median_times(fns, torch.device("cpu"), args.repeats)
        for name in variants:
            seconds = times[f"{name}_full"] - times[f"{name}_prefill"]
            result[f"{name}_decode_tok_s_bs{batch}"] = round(batch * (args.new_tokens - 1) / seconds, 2)
        for name in variants:
            base = "bf16_compiled" if name.endswith("_compiled") else "bf16"
            if name != base:
                result[f"{name}_ratio_bs{batch}"] = round(
                    result[f"{name}_decode_tok_s_bs{batch}"] / result[f"{base}_decode_tok_s_bs{batch}"], 2)
        if args.compile:
            for name in models:
                result[f"{name}_compiled_greedy_equals_eager_bs{batch}"] = torch.equal(
                    fns[f"{name}_full"](), fns[f"{name}_compiled_full"]())
        print(json.dumps({"batch": batch, **{k: v for k, v in result.items() if k.endswith(f"bs{batch}")}}),
              flush=True)
    result["load_average_1min_at_end"] = os.getloadavg()[0]
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    accuracy_parser = commands.add_parser("accuracy")
    accuracy_parser.add_argument("--prompts", type=int, default=64)
    accuracy_parser.add_argument("--new-tokens", type=int, default=32)
    accuracy_parser.add_argument("--models", nargs="+", choices=["embedded", "bench-small"],
                                 default=["embedded", "bench-small"])
    speed = commands.add_parser("speed")
    speed.add_argument("--model", choices=["bench-small", "stack"], default="bench-small")
    speed.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    speed.add_argument("--prompt-tokens", type=int, default=64)
    speed.add_argument("--new-tokens", type=int, default=32)
    speed.add_argument("--repeats", type=int, default=3)
    speed.add_argument("--compile", action="store_true")
    for sub in (accuracy_parser, speed):
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    (run_accuracy if args.command == "accuracy" else run_speed)(args)


if __name__ == "__main__":
    main()
