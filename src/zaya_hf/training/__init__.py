"""Training ZAYA with Trainer, PEFT, TRL and accelerate: bias balancing of the routers and LoRA presets."""

from .balancing import (
    BiasBalancer,
    BiasBalancingCallback,
    LoadImbalanceLogger,
    collect_router_loads,
    expert_load_imbalance,
    zaya_routers,
)
from .lora import LORA_PRESETS, LORA_TARGET_MODULES, LORA_TARGET_PARAMETERS, lora_config

__all__ = [
    "LORA_PRESETS",
    "LORA_TARGET_MODULES",
    "LORA_TARGET_PARAMETERS",
    "BiasBalancer",
    "BiasBalancingCallback",
    "LoadImbalanceLogger",
    "collect_router_loads",
    "expert_load_imbalance",
    "lora_config",
    "zaya_routers",
]
