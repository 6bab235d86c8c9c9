"""A ZAYA1-8B-shaped checkpoint with random weights, written by streaming: one layer in memory at a time."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..configuration_zaya import ZayaConfig
from ..modeling_zaya import ZayaForCausalLM

# Tensors initialised to a constant, by the end of their name; every other one is N(0, 0.02) in bf16.
_ONES = ("norm.weight", "_scale", ".temp")
_ZEROS = ("bias",)


def zaya1_8b_config(layers: int = 40) -> ZayaConfig:
    """ZAYA1-8B's config (ZayaConfig's defaults are the published ones) with its first `layers` layers."""
    return ZayaConfig(num_hidden_layers=layers, dtype="bfloat16")


def _random_tensor(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("balancing_biases"):  # kept in fp32 by the model; small spread so that every expert is chosen
        biases = torch.randn(shape, generator=generator) * 0.01
        biases[-1] = -1.0
        return biases
    if name.endswith(_ONES):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(_ZEROS):
        return torch.zeros(shape, dtype=torch.bfloat16)
    tensor = torch.empty(shape, dtype=torch.bfloat16)
    for chunk in tensor.view(-1).split(1 << 24):  # fp32 draws 64 MiB at a time
        chunk.copy_(torch.randn(chunk.shape, generator=generator) * 0.02)
    return tensor


def write_random_checkpoint(folder: str | Path, config: ZayaConfig, seed: int = 0) -> Path:
    """Sharded bf16 safetensors (one shard per layer, one for the rest) + config.json, loadable by zaya_hf and
    transformers alike. The shapes and names come from a model built on the meta device, so nothing big is held."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in ZayaForCausalLM(config).state_dict().items()}
    shapes.pop("lm_head.weight")  # tied to the embedding
    shards: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        shard = f"layer{int(parts[2]):03d}" if parts[1] == "layers" else "rest"
        shards.setdefault(shard, []).append(name)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for number, (shard, names) in enumerate(sorted(shards.items())):
        filename = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: _random_tensor(name, shapes[name], generator) for name in names}, folder / filename,
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.architectures = ["ZayaForCausalLM"]
    config.to_json_file(folder / "config.json")  # plain model_type "zaya": no remote code
    return folder


__all__ = ["write_random_checkpoint", "zaya1_8b_config"]
