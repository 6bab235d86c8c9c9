# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""Streaming checkpoint quantization (`zaya-hf quantize`) and weight footprints (`zaya-hf info`).

`quantize_checkpoint` reads a bf16 checkpoint one tensor at a time and writes the quantized one shard by shard, so
neither model is ever whole in memory; it checks every shape first and writes into a temporary folder that only
becomes `output` once complete, so a failure leaves nothing behind.
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..configuration_zaya import ZayaConfig
from ..modeling_zaya import ZayaExperts, ZayaForCausalLM
from . import formats
from .config import ZayaQuantizationConfig
from .quantizer import check_targets, quantization_targets

SHARD_BYTES = 1 << 30  # output shards of about 1 GiB: the one being written is all that is held in memory


def meta_model(config: ZayaConfig) -> ZayaForCausalLM:
    with torch.device("meta"):
        return ZayaForCausalLM(config)


def quantized_tensor_names(model: ZayaForCausalLM, qconfig: ZayaQuantizationConfig) -> dict[str, list[str]]:
    """{checkpoint tensor: [quantized tensors written from it]} for `model` (a meta model of the checkpoint's config).
    A tied head stays tied to a quantized embedding (no tensor of its own); with the embedding left in bf16 it is
    written from the embedding."""
    config = model.config
    targets = quantization_targets(model, qconfig)
    check_targets(targets, qconfig)
    names: dict[str, list[str]] = {}
    for name, module in targets.items():
        weights = ("gate_up_proj", "down_proj") if isinstance(module, ZayaExperts) else ("weight",)
        for weight in weights:
            names.setdefault(f"{name}.{weight}", []).append(f"{name}.{weight}")
    if config.tie_word_embeddings and "lm_head" in targets:
        names.pop("lm_head.weight")
        if not qconfig.quantize_embedding:
            names.setdefault("model.embed_tokens.weight", []).append("lm_head.weight")
    return names


def checkpoint_files(source: Path) -> list[Path]:
    index = source / "model.safetensors.index.json"
    if index.is_file():
        return [source / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = source / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{source}: no model.safetensors nor model.safetensors.index.json.")


def quantize_checkpoint(source: str | Path, output: str | Path, qconfig: ZayaQuantizationConfig,
                        shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the checkpoint folder `source` quantized with `qconfig` into the new folder `output`; returns a
    summary (tensors quantized, bytes before and after)."""
    source, output = Path(source), Path(output)
    if output.exists():
        raise FileExistsError(f"{output} exists: the quantized checkpoint goes into a new folder (nothing is overwritten).")
    config = ZayaConfig.from_pretrained(source)
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{source} is already quantized ({config.quantization_config}).")
    targets = quantized_tensor_names(meta_model(config), qconfig)
    files = checkpoint_files(source)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        summary = write_quantized_shards(files, staging, targets, qconfig, shard_bytes)
        missing = sorted(set(targets) - summary.pop("seen"))
        if missing:
            raise KeyError(f"{source} lacks tensor(s) the config says it has: {', '.join(missing[:8])}.")
        config.quantization_config = qconfig.to_dict()
        if "lm_head.weight" in {name for names in targets.values() for name in names}:
            config.tie_word_embeddings = False  # the quantized head is a tensor of its own
        config.save_pretrained(staging)
        for extra in source.iterdir():
            if extra.is_file() and extra.name != "config.json" and not extra.name.startswith("model.safetensors") \
                    and not extra.name.endswith(".safetensors"):
                shutil.copy2(extra, staging / extra.name)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def write_quantized_shards(files: list[Path], staging: Path, targets: dict[str, list[str]],
                           qconfig: ZayaQuantizationConfig, shard_bytes: int) -> dict:
    spec = qconfig.spec
    shard: dict[str, torch.Tensor] = {}
    shard_names: list[list[str]] = []
    seen: set[str] = set()
    totals = {"tensors_quantized": 0, "bytes_in": 0, "bytes_out": 0}

    def flush() -> None:
        if shard:
            save_file(shard, staging / f"shard-{len(shard_names):05d}.safetensors", metadata={"format": "pt"})
            shard_names.append(list(shard))
            shard.clear()

    for path in files:
        with safe_open(path, framework="pt") as checkpoint:
            for key in checkpoint.keys():
                tensor = checkpoint.get_tensor(key)
                seen.add(key)
                totals["bytes_in"] += tensor.nbytes
                outputs = {key: tensor}  # replaced by its quantized tensors if it is quantized itself
                for name in targets.get(key, []):
                    spec.check(name, tuple(tensor.shape))
                    q, scale = formats.quantize(tensor, spec, tensor.dtype)
                    outputs[name] = formats.pack_int32(q, spec.bits)
                    outputs[f"{name}_scale"] = scale
                    outputs[f"{name}_shape"] = torch.tensor(tensor.shape, dtype=torch.int64)
                    totals["tensors_quantized"] += 1
                for name, value in outputs.items():
                    shard[name] = value.contiguous()
                    totals["bytes_out"] += value.nbytes
                if sum(t.nbytes for t in shard.values()) >= shard_bytes:
                    flush()
    flush()
    total = len(shard_names)
    weight_map = {}
    for index, names in enumerate(shard_names):
        final = "model.safetensors" if total == 1 else f"model-{index + 1:05d}-of-{total:05d}.safetensors"
        (staging / f"shard-{index:05d}.safetensors").rename(staging / final)
        weight_map.update(dict.fromkeys(names, final))
    if total > 1:
        index_file = {"metadata": {"total_size": totals["bytes_out"]}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
    return {**totals, "seen": seen}


def weight_footprint(config: ZayaConfig, qconfig: ZayaQuantizationConfig | None,
                     dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes of the weights of a model of `config` (in a `dtype_bytes` dtype) quantized with `qconfig` (None:
    not quantized): as held in memory (int4's kernel layout keeps a zero beside every scale and pads the rows to its
    block) and as stored. A tied head counts once: it is the embedding's table (bf16 or quantized) or, beside a bf16
    embedding, a quantized tensor of its own."""
    model = meta_model(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    written = quantized_tensor_names(model, qconfig) if qconfig is not None else {}  # {source: [quantized]}
    quantized = {name for names in written.values() for name in names}
    memory = stored = 0
    for name, shape in shapes.items():
        tied_head = name == "lm_head.weight" and config.tie_word_embeddings
        if name not in quantized and not tied_head:
            size = torch.Size(shape).numel() * (4 if name.endswith("balancing_biases") else dtype_bytes)  # fp32
            memory, stored = memory + size, stored + size
    for source, names in written.items():
        spec, shape = qconfig.spec, shapes[source]
        integers = torch.Size(shape).numel() * spec.bits // 8
        scales = torch.Size(spec.scale_shape(shape)).numel() * dtype_bytes
        stored += len(names) * (integers + scales)
        held_integers, _, held_scales = spec.stored(shape, kernel_layout=True)  # int4: rows padded to the block
        held = torch.Size(held_integers).numel() + torch.Size(held_scales).numel() * dtype_bytes
        memory += len(names) * held
    return {"memory_bytes": memory, "checkpoint_bytes": stored}


__all__ = ["quantize_checkpoint", "quantized_tensor_names", "weight_footprint"]
