"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for ZAYA with the bias balancer, and its sharded checkpoints.

On GPUs, accelerate applies the same sharding from `examples/accelerate_fsdp2.yaml` and Trainer runs the balancer
through `BiasBalancingCallback`. On CPU, accelerate 1.15 never enables FSDP (its `AcceleratorState` turns FSDP on
only for accelerator device types, so a CPU launch trains with DDP, or with one process under `--cpu`); these
helpers are the supported way there, and what the FSDP tests run on gloo.
"""

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from .balancing import BiasBalancer


def shard_zaya(model: nn.Module, param_dtype: torch.dtype | None = torch.bfloat16, **fully_shard_kwargs: Any) -> nn.Module:
    """`fully_shard` every decoder layer, then the rest of the model (embeddings, final norm, LM head), as
    accelerate's `TRANSFORMER_BASED_WRAP` with `ZayaDecoderLayer` does. Weights stay fp32 (the optimizer's master
    copy); `param_dtype` is the compute dtype of the forward and backward, gradients are reduced in fp32. The
    routers' `balancing_biases` are buffers: FSDP neither shards nor casts them, so every rank keeps a full fp32
    copy that the balancer updates identically (it all-reduces the loads)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if "mp_policy" not in fully_shard_kwargs:
        fully_shard_kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # By name, through the class hierarchy: a remote-code model's class is another module's, and the CPU fast path
    # swaps in a subclass (`zaya_hf.ops.cpu.CPUDecoderLayer`).
    layers = [module for module in model.modules()
              if any(cls.__name__ == "ZayaDecoderLayer" for cls in type(module).__mro__)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no ZayaDecoderLayer to shard.")
    for layer in layers:
        fully_shard(layer, **fully_shard_kwargs)
    return fully_shard(model, **fully_shard_kwargs)


class TrainingState(Stateful):
    """Weights and optimizer state as one `torch.distributed.checkpoint` item: each rank writes and reads only its
    shards."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


BALANCER_FILE = "balancer.pt"


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 balancer: BiasBalancer | None = None) -> None:
    """Write a sharded checkpoint (a `torch.distributed.checkpoint` folder) on every rank; the balancer's state,
    identical on every rank, goes to `balancer.pt` in it, written by rank 0."""
    dcp.save({"training": TrainingState(model, optimizer)}, checkpoint_id=str(path))
    if balancer is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        torch.save(balancer.state_dict(), Path(path) / BALANCER_FILE)
    if dist.is_initialized():
        dist.barrier()


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 balancer: BiasBalancer | None = None) -> None:
    """Restore, in place and on every rank, what `save_sharded` wrote (the world size may differ)."""
    dcp.load({"training": TrainingState(model, optimizer)}, checkpoint_id=str(path))
    if balancer is not None:
        balancer.load_state_dict(torch.load(Path(path) / BALANCER_FILE, weights_only=True))


__all__ = ["TrainingState", "load_sharded", "save_sharded", "shard_zaya"]
