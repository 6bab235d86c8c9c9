"""Resident memory of ZAYA1-8B (its config, random weights) loaded quantized with `from_pretrained(quantization_config=...)`.

The bf16 checkpoint is written once, one decoder layer per shard (never a whole model in memory, ~17 GB of disk);
each quantization then loads it in a fresh process, streaming (transformers reads on-the-fly-quantized checkpoints
one tensor at a time), runs one decode step, and reports its resident set after loading (`VmRSS`, of which
`RssAnon` is the process's own memory and `RssFile` mapped file pages), its peak (`VmHWM`, which also counts the
pages of the memory-mapped shards while they are read) and the peak of its own memory while loading (`RssAnon`
sampled every 50 ms). Prints JSON lines.

    python benchmarks/bench_quant_memory.py --checkpoint /tmp/zaya1-8b-random [--formats int8 int4 ...]
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

FORMATS = {
    "int8": dict(bits=8, group_size=None),
    "int8+embedding": dict(bits=8, group_size=None, quantize_embedding=True),
    "int4": dict(bits=4, group_size=64),
    "int4+embedding": dict(bits=4, group_size=64, quantize_embedding=True),
    "int4-g128+embedding": dict(bits=4, group_size=128, quantize_embedding=True),
}


def write_random_checkpoint(path: Path) -> None:
    """ZAYA1-8B's config with random weights (std 0.02 matrices, the model's own init elsewhere), one shard per
    decoder layer plus one for the rest."""
    from safetensors.torch import save_file

    from zaya_hf import ZayaConfig
    from zaya_hf.quantization.convert import meta_model

    config = ZayaConfig()
    model = meta_model(config)
    shards: dict[str, dict[str, tuple]] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(layer, {})[name] = (tuple(tensor.shape), tensor.dtype)
    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for index, (layer, tensors) in enumerate(shards.items()):
        shard = {}
        for name, (shape, dtype) in tensors.items():
            if name.endswith("balancing_biases"):
                value = torch.zeros(shape, dtype=torch.float32)
                value[-1] = -1.0
            elif len(shape) >= 2 and "conv" not in name:
                value = torch.empty(shape, dtype=torch.bfloat16)
                for row in range(0, shape[0]):  # row by row: no fp32 copy of a whole expert stack
                    value[row] = torch.randn(shape[1:], generator=generator).mul_(0.02)
            elif name.endswith(("scale", "norm.weight", "layernorm.weight", "temp")) or "conv" in name:
                value = torch.ones(shape, dtype=torch.bfloat16) if "conv" not in name else \
                    torch.randn(shape, generator=generator).mul_(0.1).to(torch.bfloat16)
            else:
                value = torch.zeros(shape, dtype=torch.bfloat16)
            shard[name] = value
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(path)


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakSampler(threading.Thread):
    """The highest value of a /proc/self/status field, sampled every 50 ms until `stop()`."""

    def __init__(self, field: str):
        super().__init__(daemon=True)
        self.field, self.peak_kib, self.done = field, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak_kib = max(self.peak_kib, status_kib(self.field))

    def stop(self) -> float:
        self.done.set()
        self.join()
        return self.peak_kib / 2**20


def measure(checkpoint: str, format_name: str) -> dict:
    """In this process: load quantized, one decode step, memory figures (GiB)."""
    torch.set_num_threads(1)
    from zaya_hf import ZayaForCausalLM
    from zaya_hf.quantization import ZayaQuantizationConfig
    from zaya_hf.quantization.convert import weight_footprint

    qconfig = ZayaQuantizationConfig(**FORMATS[format_name])
    sampler = PeakSampler("RssAnon")
    sampler.start()
    start = time.perf_counter()
    model = ZayaForCausalLM.from_pretrained(checkpoint, quantization_config=qconfig, dtype=torch.bfloat16).eval()
    load_seconds = time.perf_counter() - start
    peak_anon = sampler.stop()
    after_load = {field: status_kib(field) / 2**20 for field in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
    with torch.no_grad():
        model(torch.tensor([[2, 100, 200]]))
    return {
        "format": format_name, "load_seconds": round(load_seconds, 1),
        **{f"{field}_after_load_GiB": round(value, 2) for field, value in after_load.items()},
        "sampled_peak_RssAnon_during_load_GiB": round(peak_anon, 2),
        "VmRSS_after_forward_GiB": round(status_kib("VmRSS") / 2**20, 2),
        "VmHWM_GiB": round(status_kib("VmHWM") / 2**20, 2),
        "predicted_weight_GiB": round(weight_footprint(model.config, qconfig)["memory_bytes"] / 2**30, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="folder of the random bf16 checkpoint (written if absent)")
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    parser.add_argument("--measure", choices=list(FORMATS), help="measure one format in this process (no child)")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.checkpoint, args.measure)))
        return
    checkpoint = Path(args.checkpoint)
    command = " ".join(["python", *sys.argv])
    if not checkpoint.exists():
        start = time.perf_counter()
        write_random_checkpoint(checkpoint)
        print(json.dumps({"wrote": str(checkpoint), "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    for format_name in args.formats:
        child = subprocess.run([sys.executable, __file__, "--checkpoint", str(checkpoint), "--measure", format_name],
                               capture_output=True, text=True)
        if child.returncode:
            print(json.dumps({"command": command, "format": format_name, "error": child.stderr[-2000:]}), flush=True)
        else:
            record = json.loads(child.stdout.strip().splitlines()[-1])
            print(json.dumps({"command": command, **record, "load_average_1min": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
