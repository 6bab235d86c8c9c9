"""LoRA presets for ZAYA that hit exactly the intended modules.

ZAYA's names defeat the usual LoRA target lists: a Llama-style `["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
"up_proj", "down_proj"]` adapts the *router's* `gate.down_proj`, misses the CCA value projections `v_proj_current` /
`v_proj_delayed`, and cannot reach the experts, which are fused 3-D parameters rather than Linears; `"all-linear"`
includes every router Linear. The presets below name module paths (matched as dotted suffixes, so `mlp.gate.down_proj`
never matches anything but the router's) and reach the experts through PEFT's `target_parameters`.
"""

from collections.abc import Iterable
from typing import Any

# Module paths inside a decoder layer, per preset. The CCA convolutions are left out: LoRA on a grouped Conv1d fails.
LORA_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "attention": (
        "self_attn.qkv_proj.q_proj",
        "self_attn.qkv_proj.k_proj",
        "self_attn.qkv_proj.v_proj_current",
        "self_attn.qkv_proj.v_proj_delayed",
        "self_attn.o_proj",
    ),
    "router": (
        "mlp.gate.down_proj",
        "mlp.gate.router_mlp.fc1",
        "mlp.gate.router_mlp.fc2",
        "mlp.gate.router_mlp.out_proj",
    ),
}
# The fused experts, [E, 2I, d] and [E, d, I]: PEFT gives each expert its own low-rank pair.
LORA_TARGET_PARAMETERS: dict[str, tuple[str, ...]] = {
    "experts": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
}
LORA_PRESETS = (*LORA_TARGET_MODULES, *LORA_TARGET_PARAMETERS)


def lora_config(
    targets: str | Iterable[str] = ("attention", "experts", "router"),
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    **kwargs: Any,
):
    """A `peft.LoraConfig` for ZAYA adapting the chosen parts: any of `"attention"` (CCA q/k/v_current/v_delayed
    and o_proj), `"experts"` (the fused expert weights, via `target_parameters`) and `"router"` (the router MLP).

    `kwargs` go to `LoraConfig` (e.g. `use_rslora=True`, `layers_to_transform=[...]`); `task_type` defaults to
    `"CAUSAL_LM"`. PEFT cannot apply dropout on a targeted parameter, so `dropout` must be 0 with `"experts"`.
    """
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError("lora_config needs PEFT: pip install 'zaya-hf[peft]'") from error

    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = sorted(set(targets) - set(LORA_PRESETS))
    if unknown or not targets:
        raise ValueError(f"Unknown or no LoRA targets {unknown or list(targets)}; choose from {list(LORA_PRESETS)}.")
    clashing = sorted({"target_modules", "target_parameters"} & kwargs.keys())
    if clashing:
        raise ValueError(f"lora_config sets {clashing} from `targets`; build a peft.LoraConfig directly to choose them.")
    target_modules = [path for preset in targets for path in LORA_TARGET_MODULES.get(preset, ())]
    target_parameters = [path for preset in targets for path in LORA_TARGET_PARAMETERS.get(preset, ())]
    if target_parameters and dropout:
        raise ValueError(
            f"dropout={dropout} cannot be applied to the fused experts (PEFT wraps them as parameters); "
            "use dropout=0.0 or leave 'experts' out of targets."
        )
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        target_parameters=target_parameters or None,
        **kwargs,
    )


__all__ = ["LORA_PRESETS", "LORA_TARGET_MODULES", "LORA_TARGET_PARAMETERS", "lora_config"]
