"""A ZAYA1-8B-shaped checkpoint with random weights, written by streaming: one layer in memory at a time."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..configuration_zaya import ZayaConfig
from ..modeling_zaya import ZayaForCausalLM, ZayaRouter

# Tensors initialised to a constant, by the end of their name; every other one is normal in bf16 (`_random_tensor`).
_ONES = ("norm.weight", "_scale", ".temp")
_ZEROS = ("bias",)

# Written into the index's metadata: names how the weights were drawn, so that a folder written by another version of
# this writer (routers at std 0.02, which send nearly every token to one expert) is not reused as if it were this one.
RANDOM_INIT = "normal-0.02;router-1/sqrt(fan_in)"


def zaya1_8b_config(layers: int = 40) -> ZayaConfig:
    """ZAYA1-8B's config (ZayaConfig's defaults are the published ones) with its first `layers` layers."""
    return ZayaConfig(num_hidden_layers=layers, dtype="bfloat16")


def _random_tensor(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("balancing_biases"):  # fp32, as the model keeps them: neutral, the skip class disfavoured
        return ZayaRouter.default_balancing_biases(shape[0] - 1)
    if name.endswith(_ONES):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(_ZEROS):
        return torch.zeros(shape, dtype=torch.bfloat16)
    # Router products at std 1/sqrt(fan_in) keep the router logits O(1), so tokens spread over the experts as in a
    # trained model; at std 0.02 every logit is ~0 and nearly every token of a layer picks the same expert.
    std = shape[-1] ** -0.5 if ".mlp.gate." in name else 0.02
    tensor = torch.empty(shape, dtype=torch.bfloat16)
    for chunk in tensor.view(-1).split(1 << 24):  # fp32 draws 64 MiB at a time
        chunk.copy_(torch.randn(chunk.shape, generator=generator) * std)
    return tensor


def is_random_checkpoint(folder: str | Path, layers: int) -> bool:
    """Whether `folder` holds a checkpoint of this writer with `layers` layers."""
    folder = Path(folder)
    config_file, index_file = folder / "config.json", folder / "model.safetensors.index.json"
    if not (config_file.exists() and index_file.exists()):
        return False
    metadata = json.loads(index_file.read_text()).get("metadata", {})
    return json.loads(config_file.read_text())["num_hidden_layers"] == layers and metadata.get("random_init") == RANDOM_INIT


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
    index = {"metadata": {"random_init": RANDOM_INIT}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config.architectures = ["ZayaForCausalLM"]
    config.to_json_file(folder / "config.json")  # plain model_type "zaya": no remote code
    return folder


__all__ = ["RANDOM_INIT", "is_random_checkpoint", "write_random_checkpoint", "zaya1_8b_config"]
