"""ZAYA1-8B-sized speed of zaya_hf and of transformers' own ZAYA, each in its own process, against the bound that the
machine's read bandwidth sets.

`run_real_size_benchmark` streams a random ZAYA1-8B-shaped checkpoint to disk (`bench.checkpoint`; a prefix of the
stack where memory is short), starts one worker process per implementation (`python -m zaya_hf.bench.real_size
--worker ...`: each loads the checkpoint as a user would, `from_pretrained(..., dtype=torch.bfloat16)`), and has
them take turns on every measurement, so that both see the same load. A decode step must read its weights (the
attention, router and norms of every layer, the experts its tokens chose, the tied head) and its KV cache; the
bytes of that over the bandwidth a plain read reaches (fp32 `sum` over 1 GiB, measured in the same run) is the
step's bound, and `fraction_of_bound` is the bound over the measured step.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import CompileConfig

from ..configuration_zaya import ZayaConfig
from .checkpoint import is_random_checkpoint, write_random_checkpoint, zaya1_8b_config

IMPLEMENTATIONS = ("zaya_hf", "transformers")


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of the fastest of `repeats` fp32 sums over `gib` GiB (far beyond any cache)."""
    buffer = torch.ones(int(gib * 2**30) // 4)
    buffer.sum()  # first touch: page faults
    best = min(_timed(buffer.sum) for _ in range(repeats))
    return buffer.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(config: ZayaConfig, dtype_bytes: int = 2) -> dict:
    """Bytes of the weights a decode step reads, by kind: `dense` (all layers' attention, router, norms, and the final
    norm), `expert` (one expert of one layer) and `head` (the tied embedding as the LM head)."""
    from ..modeling_zaya import ZayaForCausalLM

    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    dense = expert = 0
    for name, tensor in model.named_parameters():
        if ".mlp.experts." in name:
            expert += tensor.numel() // config.num_experts
        elif "embed_tokens" not in name and "lm_head" not in name:
            dense += tensor.numel()
    head = config.vocab_size * config.hidden_size
    return {"dense": dense * dtype_bytes, "expert": expert * dtype_bytes // config.num_hidden_layers, "head": head * dtype_bytes}


def decode_step_bytes(config: ZayaConfig, batch: int, experts_read: float, cached_tokens: int) -> float:
    """Bytes one decode step must read: the dense weights, `experts_read` experts summed over the layers, the head,
    and each layer's keys and values of `cached_tokens` tokens per sequence (bf16)."""
    weights = weight_bytes(config)
    kv = config.num_hidden_layers * batch * cached_tokens * 2 * config.num_key_value_heads * config.head_dim * 2
    return weights["dense"] + experts_read * weights["expert"] + weights["head"] + kv


# ---------------------------------------------------------------------------------------------------------------
# The worker: one implementation, loaded once, answering one JSON command per line.


class _StepTimer:
    """A logits processor that only records when generate() reaches it: once per decode step."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


class _ExpertRecorder:
    """Per forward of the model, the distinct experts each layer's tokens chose, and per layer the tokens each expert
    got over all forwards (the skip class, which zaya_hf passes as weight 0 and transformers as index E, left out)."""

    def __init__(self, model, num_experts: int):
        self.num_experts = num_experts
        self.forwards: list[list[int]] = []
        self.tokens_per_expert: list[torch.Tensor] = []  # per layer [E]
        self.active = False
        model.register_forward_pre_hook(self.new_forward)
        for module in model.modules():
            if type(module).__name__.endswith("Experts"):
                module.register_forward_pre_hook(self.record)

    def start(self) -> None:
        self.forwards, self.tokens_per_expert, self.active = [], [], True

    def new_forward(self, module, args) -> None:
        if self.active and not torch.compiler.is_compiling():
            self.forwards.append([])

    def record(self, module, args) -> None:  # compiled steps are not recorded: the counts are data-dependent
        if self.active and not torch.compiler.is_compiling():
            _, index, weights = args[:3]
            chosen = index[:, 0][(weights[:, 0] != 0) & (index[:, 0] < self.num_experts)]
            self.forwards[-1].append(int(chosen.unique().numel()))
            layer = len(self.forwards[-1]) - 1
            if layer == len(self.tokens_per_expert):
                self.tokens_per_expert.append(torch.zeros(self.num_experts, dtype=torch.long))
            self.tokens_per_expert[layer] += torch.bincount(chosen, minlength=self.num_experts)

    def usage(self) -> dict:
        """The spread of the recorded tokens over the experts: per layer, the share of the most used expert and the
        experts that got any token."""
        counts = torch.stack(self.tokens_per_expert).float()  # [layers, E]
        top_share = (counts.max(-1).values / counts.sum(-1).clamp(min=1)).tolist()
        return {"top_expert_share_per_layer": [round(share, 3) for share in top_share],
                "experts_used_per_layer": (counts > 0).sum(-1).tolist()}


# zaya_hf's experts run its opt-in "zaya_by_expert" implementation (fp32 GEMMs per expert where the CPU has no
# native bf16 kernels); transformers' ZAYA runs its default, grouped_mm.
ZAYA_HF_EXPERTS_IMPLEMENTATION = "zaya_by_expert"


# How zaya_hf runs: "eager" (plain generate()), "prepacked" (`zaya_hf.ops.prepack_for_cpu_inference`, inference
# only) or "compiled" (generate() with a static cache and a `compile_config`: the decode step is one Inductor graph).
# The compiled step keeps the default experts implementation (grouped_mm), whose compiled one-token path reads the
# chosen expert in place; transformers' ZAYA has no compiled decode (its generate() skips the compile_config).
ZAYA_HF_VARIANTS = ("eager", "prepacked", "compiled")


def experts_implementation_of(variant: str) -> str:
    return {"prepacked": "zaya_prepacked", "compiled": "grouped_mm"}.get(variant, ZAYA_HF_EXPERTS_IMPLEMENTATION)


def _load(implementation: str, checkpoint: str, variant: str = "eager"):
    if implementation == "zaya_hf":
        from zaya_hf import ZayaForCausalLM
        from zaya_hf.ops import prepack_for_cpu_inference

        experts = "grouped_mm" if variant == "compiled" else ZAYA_HF_EXPERTS_IMPLEMENTATION  # prepacking swaps its own
        model = ZayaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, experts_implementation=experts).eval()
        return prepack_for_cpu_inference(model) if variant == "prepacked" else model
    from transformers.models.zaya.modeling_zaya import ZayaForCausalLM

    return ZayaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.no_grad()
def _decode(model, recorder, batch: int, prompt_tokens: int, new_tokens: int, seed: int, compiled: bool) -> dict:
    vocab = model.config.vocab_size
    prompt = torch.randint(1, vocab, (batch, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    compile_seconds = None
    if compiled:
        options.update(cache_implementation="static", compile_config=CompileConfig(fullgraph=True, dynamic=False))
        start = time.perf_counter()
        model.generate(prompt, **options)  # the first call with these shapes compiles the step
        compile_seconds = time.perf_counter() - start
    timer = _StepTimer()
    recorder.start()
    out = model.generate(prompt, logits_processor=[timer], **options)
    recorder.active = False
    steps = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]  # the first stamp follows the prefill
    return {
        "step_seconds": steps,
        "first_call_seconds": compile_seconds,
        "tokens": out[:, prompt_tokens:].tolist(),
        "distinct_experts": recorder.forwards[1:],  # per decode step, per layer
        "expert_usage": recorder.usage(),  # prefill and decode tokens together
    }


@torch.no_grad()
def _prefill(model, recorder, tokens: int, seed: int) -> dict:
    ids = torch.randint(1, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    recorder.start()
    start = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - start
    recorder.active = False
    return {"seconds": seconds, "expert_usage": recorder.usage()}


def worker(implementation: str, checkpoint: str, threads: int, variant: str = "eager") -> None:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = _load(implementation, checkpoint, variant)
    compiled = implementation == "zaya_hf" and variant == "compiled"
    reply = {"load_seconds": time.perf_counter() - start, "peak_rss_bytes_after_load": _peak_rss_bytes(),
             "threads": torch.get_num_threads()}
    recorder = _ExpertRecorder(model, model.config.num_experts)
    print(json.dumps(reply), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "decode":
            reply = _decode(model, recorder, command["batch"], command["prompt_tokens"], command["new_tokens"],
                            command["seed"], compiled)
        elif command["op"] == "prefill":
            reply = _prefill(model, recorder, command["tokens"], command["seed"])
        else:
            reply = {}
        reply["peak_rss_bytes"] = _peak_rss_bytes()
        print(json.dumps(reply), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The parent: builds the checkpoint, runs both workers in turns, and reports.


class Worker:
    """One implementation in its own process (`worker`), asked one command at a time."""

    def __init__(self, implementation: str, checkpoint: Path, threads: int, variant: str = "eager"):
        self.implementation = implementation
        command = [sys.executable, "-m", "zaya_hf.bench.real_size", "--worker", implementation,
                   "--checkpoint", str(checkpoint), "--threads", str(threads), "--variant", variant]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.loaded = self.read()

    def read(self) -> dict:
        for line in self.process.stdout:  # libraries may print too: the replies are the JSON objects
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"The {self.implementation} worker exited with status {self.process.wait()}.")

    def ask(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def checkpoint_for(folder: Path, layers: int) -> Path:
    """`folder` holding the random checkpoint with `layers` layers, written there first if it is not."""
    if is_random_checkpoint(folder, layers):
        return folder
    return write_random_checkpoint(folder, zaya1_8b_config(layers))


def warm_page_cache(folder: Path) -> None:
    """Read every file once, so that both implementations load from memory and neither pays the disk."""
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as file:
            while file.read(1 << 24):
                pass


def _median(values: list[float]) -> float:
    return statistics.median(values)


def run_real_size_benchmark(
    folder: Path,
    layers: int = 8,
    threads: int | None = None,
    batch_sizes: tuple[int, ...] = (1, 16),
    prompt_tokens: int = 64,
    new_tokens: int = 12,
    repeats: int = 3,
    prefill_tokens: tuple[int, ...] = (512, 4096),
    prefill_repeats: int = 1,
    variant: str = "eager",
    log=lambda message: print(message, file=sys.stderr, flush=True),
) -> dict:
    """The measurements of the module doc, as one dict; `variant`: how zaya_hf runs (`ZAYA_HF_VARIANTS`)."""
    if variant not in ZAYA_HF_VARIANTS:
        raise ValueError(f"variant must be one of {ZAYA_HF_VARIANTS}, got {variant!r}.")
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    config = zaya1_8b_config(layers)
    folder = checkpoint_for(Path(folder), layers)
    warm_page_cache(folder)
    result: dict = {"config": "ZAYA1-8B", "layers": layers, "of_layers": 40, "dtype": "bfloat16", "device": "cpu",
                    "threads": threads, "zaya_hf_variant": variant, "zaya_hf_prepacked": variant == "prepacked",
                    "zaya_hf_experts_implementation": experts_implementation_of(variant)}
    bandwidths, loads = [read_bandwidth()], [os.getloadavg()[0]]
    log(f"read bandwidth {bandwidths[-1] / 1e9:.2f} GB/s; loading the workers")
    workers = {name: Worker(name, folder, threads, variant if name == "zaya_hf" else "eager") for name in IMPLEMENTATIONS}
    for name, worker in workers.items():
        result[f"{name}_load_seconds"] = round(worker.loaded["load_seconds"], 2)
        result[f"{name}_peak_rss_bytes_after_load"] = worker.loaded["peak_rss_bytes_after_load"]
    medians: dict[int, dict[str, float]] = {}  # median decode step seconds per batch size and implementation
    try:
        for batch in batch_sizes:
            steps = {name: [] for name in workers}
            replies = {}
            for repeat in range(repeats):
                order = list(workers) if repeat % 2 == 0 else list(workers)[::-1]
                for name in order:
                    replies[name] = workers[name].ask(op="decode", batch=batch, prompt_tokens=prompt_tokens,
                                                      new_tokens=new_tokens, seed=batch)
                    steps[name] += replies[name]["step_seconds"]
                    log(f"decode bs{batch} {name}: median step {_median(replies[name]['step_seconds']):.3f} s")
            # the experts a step reads, from an eager run (a compiled step's routing is not recorded): zaya_hf's,
            # else transformers' of the same prompts (the same tokens where greedy_tokens_identical)
            routed = replies["transformers" if variant == "compiled" else "zaya_hf"]
            distinct = [count for step in routed["distinct_experts"] for count in step]
            experts_read = sum(statistics.mean(layer) for layer in zip(*routed["distinct_experts"]))
            step_bytes = decode_step_bytes(config, batch, experts_read, prompt_tokens + new_tokens // 2)
            result[f"decode_bs{batch}_step_bytes"] = int(step_bytes)
            result[f"decode_bs{batch}_distinct_experts_per_layer_mean"] = round(statistics.mean(distinct), 2)
            result[f"decode_bs{batch}_distinct_experts_per_layer_min_max"] = [min(distinct), max(distinct)]
            result[f"decode_bs{batch}_expert_usage"] = routed["expert_usage"]
            if variant == "compiled":
                result[f"zaya_hf_decode_bs{batch}_compile_seconds"] = round(replies["zaya_hf"]["first_call_seconds"], 1)
            result[f"decode_bs{batch}_greedy_tokens_identical"] = replies["zaya_hf"]["tokens"] == replies["transformers"]["tokens"]
            medians[batch] = {name: _median(steps[name]) for name in workers}
            for name, step in medians[batch].items():
                result[f"{name}_decode_tok_s_bs{batch}"] = round(batch / step, 3)
            result[f"decode_ratio_bs{batch}"] = round(medians[batch]["transformers"] / medians[batch]["zaya_hf"], 2)
            bandwidths.append(read_bandwidth())
            loads.append(os.getloadavg()[0])
        for tokens in prefill_tokens:
            seconds, replies = {name: [] for name in workers}, {}
            for repeat in range(prefill_repeats):
                order = list(workers) if repeat % 2 == 0 else list(workers)[::-1]
                for name in order:
                    replies[name] = workers[name].ask(op="prefill", tokens=tokens, seed=tokens)
                    seconds[name].append(replies[name]["seconds"])
                    log(f"prefill {tokens} {name}: {seconds[name][-1]:.1f} s")
            result[f"prefill_{tokens}_expert_usage"] = replies["zaya_hf"]["expert_usage"]
            for name in workers:
                result[f"{name}_prefill_tok_s_{tokens}"] = round(tokens / _median(seconds[name]), 1)
            result[f"prefill_ratio_{tokens}"] = round(_median(seconds["transformers"]) / _median(seconds["zaya_hf"]), 2)
        for name, worker in workers.items():
            result[f"{name}_peak_rss_bytes"] = worker.ask(op="rss")["peak_rss_bytes"]
    finally:
        for worker in workers.values():
            worker.close()
    bandwidths.append(read_bandwidth())
    loads.append(os.getloadavg()[0])
    result["load_average_1min"] = loads  # at each bandwidth measurement: start, after each batch size, end
    result["read_bandwidth_GBps"] = [round(b / 1e9, 2) for b in bandwidths]
    result["bound_bandwidth_GBps"] = round(max(bandwidths) / 1e9, 2)
    for batch, steps in medians.items():  # the bound at the best bandwidth seen in the run: the strictest
        bound = result[f"decode_bs{batch}_step_bytes"] / max(bandwidths)
        result[f"decode_bs{batch}_bound_tok_s"] = round(batch / bound, 3)
        for name, step in steps.items():
            result[f"{name}_fraction_of_bound_bs{batch}"] = round(bound / step, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--variant", choices=ZAYA_HF_VARIANTS, default="eager", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is None:
        raise SystemExit("Run benchmarks/bench_real_size.py; this module's command line is its worker process.")
    worker(args.worker, args.checkpoint, args.threads, args.variant)


if __name__ == "__main__":
    main()
