"""The two ZAYA1 checkpoint layouts and the exact correspondence between them (ZAYA_ARCHITECTURE.md, "Legacy layout").

* **current**: the layout of `Zyphra/ZAYA1-8B` and of transformers' ZAYA: 40 layers, each with attention and MoE,
  experts stacked into two 3-D tensors per layer.
* **legacy**: the Megatron-style layout of `ZAYA1-base`, `ZAYA1-reasoning-base`, `ZAYA1-8B-legacy`: 80 half-layers
  (even = attention, odd = MoE), one tensor per expert, residual scaling indexed by the half-layer that consumes it.

Every current tensor corresponds to one legacy tensor, except the stacked experts, which are the per-expert legacy
tensors stacked along dim 0 in expert order. The correspondence is a bijection, so conversions are lossless both ways.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub.errors import StrictDataclassError

from ..configuration_zaya import _DEFAULT_ROPE_PARAMETERS, ZayaConfig
from ..modeling_zaya import ZayaForCausalLM, _preview
from .errors import (
    InvalidConfigError,
    MismatchedWeightsError,
    MissingWeightsError,
    UnexpectedWeightsError,
    UnknownLayoutError,
)
from .files import CONFIG_FILE, CheckpointReader, read_json

Layout = Literal["current", "legacy"]
LAYOUTS: tuple[Layout, ...] = ("current", "legacy")

# Current name inside layer n -> legacy name inside half-layer 2n (attention) / 2n+1 (MoE). First match wins.
ATTENTION_HALF_RENAMES = (
    ("input_layernorm.", "input_norm."),
    ("self_attn.qkv_proj.q_proj.", "self_attn.qkv.linear_q."),
    ("self_attn.qkv_proj.k_proj.", "self_attn.qkv.linear_k."),
    ("self_attn.qkv_proj.v_proj_current.", "self_attn.qkv.val_proj1."),
    ("self_attn.qkv_proj.v_proj_delayed.", "self_attn.qkv.val_proj2."),
    ("self_attn.qkv_proj.conv_qk_depthwise.", "self_attn.qkv.conv_qk.0."),
    ("self_attn.qkv_proj.conv_qk_grouped.", "self_attn.qkv.conv_qk.1."),
    ("self_attn.qk_norm.temp", "self_attn.qkv.temp"),
    ("self_attn.o_proj.", "self_attn.o_proj."),
)
MOE_HALF_RENAMES = (
    ("post_attention_layernorm.", "input_norm."),
    ("post_attention_residual_scale.", "res_scale."),
    ("mlp.gate.router_mlp.norm.", "zaya_block.router.rmsnorm_eda."),
    ("mlp.gate.router_mlp.fc1.", "zaya_block.router.router_mlp.0."),
    ("mlp.gate.router_mlp.fc2.", "zaya_block.router.router_mlp.2."),
    ("mlp.gate.router_mlp.out_proj.", "zaya_block.router.router_mlp.4."),
    ("mlp.gate.", "zaya_block.router."),
)
# Stacked expert tensors -> the per-expert legacy tensor (in half-layer 2n+1, expert e).
EXPERT_RENAMES = {"mlp.experts.gate_up_proj": "linear_fc1.weight", "mlp.experts.down_proj": "linear_fc2.weight"}
# Outside the layers. Legacy half-layer 0 has only the hidden-states half of a residual scaling: the input scaling.
GLOBAL_RENAMES = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "lm_head.weight": "lm_head.weight",
    "model.norm.weight": "model.final_norm.weight",
    "model.input_hidden_states_scale": "model.layers.0.res_scale.hidden_states_scale",
    "model.input_hidden_states_bias": "model.layers.0.res_scale.hidden_states_bias",
}
POST_MLP_SCALE = "post_mlp_residual_scale."
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")

# Tensor-name markers of each layout, for detection.
LAYOUT_MARKERS: dict[Layout, tuple[str, ...]] = {
    "current": (".self_attn.qkv_proj.", ".mlp.gate.", ".mlp.experts.", "model.norm.weight", "model.input_hidden_states_"),
    "legacy": (".self_attn.qkv.", ".zaya_block.", ".input_norm.", "model.final_norm.weight", "model.res_scale."),
}


@dataclass(frozen=True)
class TensorGroup:
    """A current-layout tensor and the legacy tensor(s) holding the same values; several legacy tensors are the
    per-expert slices of the current one, in expert order."""

    current: str
    legacy: tuple[str, ...]

    def names(self, layout: Layout) -> tuple[str, ...]:
        return (self.current,) if layout == "current" else self.legacy


def legacy_names(current: str, config: ZayaConfig) -> tuple[str, ...]:
    """The legacy tensor name(s) of a current-layout tensor."""
    if current in GLOBAL_RENAMES:
        return (GLOBAL_RENAMES[current],)
    match = _LAYER_NAME.fullmatch(current)
    if match is None:
        raise KeyError(f"No legacy name is known for {current}.")
    layer, rest = int(match.group(1)), match.group(2)
    attention_half, moe_half = f"model.layers.{2 * layer}.", f"model.layers.{2 * layer + 1}."
    if rest.startswith(POST_MLP_SCALE):  # consumed by the next attention half-layer, or the final merge
        field = rest.removeprefix(POST_MLP_SCALE)
        last = layer == config.num_hidden_layers - 1
        return (f"model.res_scale.{field}" if last else f"model.layers.{2 * layer + 2}.res_scale.{field}",)
    if rest in EXPERT_RENAMES:
        return tuple(
            f"{moe_half}zaya_block.experts.local_experts.{expert}.{EXPERT_RENAMES[rest]}"
            for expert in range(config.num_experts)
        )
    for half, renames in ((attention_half, ATTENTION_HALF_RENAMES), (moe_half, MOE_HALF_RENAMES)):
        for current_prefix, legacy_prefix in renames:
            if rest.startswith(current_prefix):
                return (half + legacy_prefix + rest.removeprefix(current_prefix),)
    raise KeyError(f"No legacy name is known for {current}.")


def current_tensor_shapes(config: ZayaConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a current-layout checkpoint of `config` holds (a tied head is not stored)."""
    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    tied = set(model._tied_weights_keys) if config.tie_word_embeddings else set()
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items() if name not in tied}


def tensor_groups(config: ZayaConfig) -> list[TensorGroup]:
    """The current <-> legacy correspondence for `config`, in the current layout's order (layer by layer)."""
    return [TensorGroup(name, legacy_names(name, config)) for name in current_tensor_shapes(config)]


def expected_tensor_shapes(config: ZayaConfig, layout: Layout) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a `layout` checkpoint of `config` holds."""
    current = current_tensor_shapes(config)
    if layout == "current":
        return current
    expected = {}
    for group in tensor_groups(config):
        shape = current[group.current]
        part_shape = shape[1:] if len(group.legacy) > 1 else shape  # per-expert slices drop the expert dim
        expected.update(dict.fromkeys(group.legacy, part_shape))
    return expected


def check_tensors(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: Path) -> None:
    """Raise unless `shapes` holds exactly the `expected` tensors, each with its expected shape."""
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise MissingWeightsError(f"{where} lacks {len(missing)} tensor(s) the configuration requires: {_preview(missing)}.")
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise UnexpectedWeightsError(
            f"{where} holds {len(unexpected)} tensor(s) this layout has no place for: {_preview(unexpected)}."
        )
    wrong = [f"{name} (found {shapes[name]}, expected {shape})" for name, shape in expected.items() if shapes[name] != shape]
    if wrong:
        raise MismatchedWeightsError(
            f"{where} has {len(wrong)} tensor(s) of the wrong shape: {_preview(wrong)}. Check that config.json fits the weights."
        )


# ---------------------------------------------------------------------------------------------------------- configs

# Legacy fields whose value is fixed for ZAYA1 (the current schema has no field for them): any other value is a
# different architecture, which these layouts cannot hold.
LEGACY_FIXED_FIELDS = {
    "activation_func": "swiglu",
    "gated_linear_unit": True,
    "normalization": "RMSNorm",
    "cca": True,
    "add_bias_linear": False,
    "residual_in_fp32": True,
    "scale_residual_merge": True,
    "zaya_use_eda": True,
    "zaya_use_mod": True,
}
# Legacy runtime hints with no bearing on the weights.
LEGACY_HINT_FIELDS = ("activation_func_fp8_input_store", "bias_activation_fusion", "mamba_cache_dtype")
# Legacy-only fields; the right-hand side names the current field they become.
LEGACY_RENAMED_FIELDS = {
    "ffn_hidden_size": "moe_intermediate_size",  # legacy counts gate and up together: halved
    "zaya_mlp_expansion": "router_hidden_size",
    "norm_epsilon": "rms_norm_eps",
    "moe_router_topk": "num_experts_per_tok",
    "kv_channels": "head_dim",
    "num_query_groups": "num_key_value_heads",
    "rope_theta": "rope_parameters",
    "partial_rotary_factor": "rope_parameters",
    "rope_scaling": "rope_parameters",
}


def config_layout(config: dict) -> Layout:
    """Which schema a config.json dict follows. A current config may rely on defaults for everything."""
    legacy = sorted(key for key in ("ffn_hidden_size", "zaya_mlp_expansion", "norm_epsilon") if key in config)
    current = sorted(key for key in ("moe_intermediate_size", "router_hidden_size", "rms_norm_eps") if key in config)
    if legacy and current:
        raise UnknownLayoutError(f"config.json mixes legacy fields {legacy} with current fields {current}.")
    return "legacy" if legacy else "current"


def _rope_parameters(theta: float, partial_rotary_factor: float) -> dict:
    """The per-layer-type RoPE of a legacy config, which has one theta (of the full-attention layers) only."""
    sliding = _DEFAULT_ROPE_PARAMETERS["hybrid_sliding"]
    return {
        "hybrid": {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": partial_rotary_factor},
        "hybrid_sliding": {**sliding, "partial_rotary_factor": partial_rotary_factor},
    }


def legacy_config_to_current(legacy: dict) -> ZayaConfig:
    """The current-layout configuration of a legacy config.json dict.

    Fields the legacy schema lacks (`layer_types`, `cca_time0`, ...) may ride along in the legacy dict, as
    `current_config_to_legacy` writes them, and pass through unchanged.
    """
    unsupported = [f"{k}={legacy[k]!r} (ZAYA1: {v!r})" for k, v in LEGACY_FIXED_FIELDS.items() if legacy.get(k, v) != v]
    if unsupported:
        raise UnknownLayoutError(f"The legacy config describes another architecture: {', '.join(unsupported)}.")
    if legacy.get("rope_scaling") not in (None, False):
        raise UnknownLayoutError(f"The legacy config sets rope_scaling={legacy['rope_scaling']!r}, which ZAYA1 does not use.")
    for field in ("num_hidden_layers", "ffn_hidden_size", "zaya_mlp_expansion"):
        if field not in legacy:
            raise UnknownLayoutError(f"The legacy config has no {field!r}.")
    if legacy["num_hidden_layers"] % 2 or legacy["ffn_hidden_size"] % 2:
        raise UnknownLayoutError(
            "A legacy config counts half-layers and gate+up rows: num_hidden_layers "
            f"({legacy['num_hidden_layers']}) and ffn_hidden_size ({legacy['ffn_hidden_size']}) must be even."
        )
    current = {
        k: v for k, v in legacy.items() if k not in LEGACY_FIXED_FIELDS and k not in LEGACY_HINT_FIELDS
        and k not in LEGACY_RENAMED_FIELDS
    }
    current["num_hidden_layers"] = legacy["num_hidden_layers"] // 2
    current["moe_intermediate_size"] = legacy["ffn_hidden_size"] // 2
    current["router_hidden_size"] = legacy["zaya_mlp_expansion"]
    for legacy_field, current_field in (("norm_epsilon", "rms_norm_eps"), ("moe_router_topk", "num_experts_per_tok")):
        if legacy_field in legacy:
            current[current_field] = legacy[legacy_field]
    for legacy_field, current_field in (("kv_channels", "head_dim"), ("num_query_groups", "num_key_value_heads")):
        if legacy_field in legacy:
            value = current.setdefault(current_field, legacy[legacy_field])
            if value != legacy[legacy_field]:
                raise UnknownLayoutError(
                    f"The legacy config has {legacy_field}={legacy[legacy_field]} but {current_field}={value}."
                )
    if "rope_parameters" not in current and "rope_theta" in legacy:
        default_factor = _DEFAULT_ROPE_PARAMETERS["hybrid"]["partial_rotary_factor"]
        current["rope_parameters"] = _rope_parameters(legacy["rope_theta"], legacy.get("partial_rotary_factor", default_factor))
    elif "rope_theta" in legacy and current["rope_parameters"]["hybrid"]["rope_theta"] != legacy["rope_theta"]:
        raise UnknownLayoutError("The legacy config's rope_theta disagrees with its rope_parameters['hybrid'].")
    if legacy.get("activation_func") == "swiglu":
        current["hidden_act"] = "silu"
    if current.get("sliding_window") is not None and "layer_types" not in current:
        raise UnknownLayoutError(
            f"The legacy config sets sliding_window={current['sliding_window']} but not which layers slide "
            "(no layer_types); add layer_types to its config.json to convert it."
        )
    return ZayaConfig.from_dict(current)


def current_config_to_legacy(config: ZayaConfig) -> dict:
    """The legacy config.json dict of a current-layout configuration (the inverse of `legacy_config_to_current`)."""
    if config.hidden_act != "silu":
        raise UnknownLayoutError(f"The legacy layout only holds SwiGLU experts (hidden_act 'silu'), not {config.hidden_act!r}.")
    current = config.to_diff_dict()
    current.pop("transformers_version", None)
    hybrid_rope = config.rope_parameters["hybrid"]
    partial_rotary_factor = hybrid_rope.get("partial_rotary_factor", 1.0)
    legacy = {k: v for k, v in current.items() if k not in LEGACY_RENAMED_FIELDS.values() and k != "hidden_act"}
    legacy.update(LEGACY_FIXED_FIELDS)
    legacy.update(
        num_hidden_layers=2 * config.num_hidden_layers,
        ffn_hidden_size=2 * config.moe_intermediate_size,
        zaya_mlp_expansion=config.router_hidden_size,
        norm_epsilon=config.rms_norm_eps,
        moe_router_topk=config.num_experts_per_tok,
        kv_channels=config.head_dim,
        num_query_groups=config.num_key_value_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rope_theta=hybrid_rope["rope_theta"],
        partial_rotary_factor=partial_rotary_factor,
        rope_scaling=False,
    )
    # What the legacy schema cannot express travels as current fields, which `legacy_config_to_current` passes on.
    if config.rope_parameters != _rope_parameters(hybrid_rope["rope_theta"], partial_rotary_factor):
        legacy["rope_parameters"] = config.rope_parameters
    if set(config.layer_types) == {"hybrid"} and config.sliding_window is None:
        legacy.pop("layer_types", None)
    return legacy


def read_config(folder: Path, layout: Layout) -> ZayaConfig:
    """The current-layout configuration of a checkpoint folder in `layout`."""
    config = read_json(folder / CONFIG_FILE)
    try:
        return legacy_config_to_current(config) if layout == "legacy" else ZayaConfig.from_dict(config)
    except UnknownLayoutError:
        raise
    except (StrictDataclassError, ValueError, TypeError) as error:
        reason = " ".join(str(error).split())  # validation errors span several indented lines
        raise InvalidConfigError(f"{folder / CONFIG_FILE} is not a valid ZAYA configuration: {reason}") from None


def names_layout(names: list[str], where: Path) -> Layout:
    """Which layout a list of tensor names follows."""
    hits = {layout: [n for n in names if any(m in n for m in markers)] for layout, markers in LAYOUT_MARKERS.items()}
    if hits["current"] and hits["legacy"]:
        raise UnknownLayoutError(
            f"{where} mixes current-layout tensors ({_preview(hits['current'], 3)}) with legacy ones "
            f"({_preview(hits['legacy'], 3)})."
        )
    for layout in LAYOUTS:
        if hits[layout]:
            return layout
    raise UnknownLayoutError(
        f"The tensors of {where} ({_preview(sorted(names), 4)}) follow neither the current nor the legacy ZAYA layout."
    )


def detect_layout(folder: str | Path, names: list[str] | None = None) -> Layout:
    """`"current"` or `"legacy"`, from config.json and the tensor names (read from the headers if not given); an
    `UnknownLayoutError` names what does not fit when the folder is neither, or its config and tensors disagree."""
    folder = Path(folder)
    config = read_json(folder / CONFIG_FILE)
    if config.get("model_type") != "zaya":
        raise UnknownLayoutError(f"{folder / CONFIG_FILE} has model_type {config.get('model_type')!r}, not 'zaya'.")
    if names is None:
        with CheckpointReader(folder) as reader:
            names = reader.names
    by_config, by_names = config_layout(config), names_layout(names, folder)
    if by_config != by_names:
        raise UnknownLayoutError(f"{folder}: config.json follows the {by_config} schema but the tensors the {by_names} layout.")
    return by_names


def read_current_tensor(reader: CheckpointReader, group: TensorGroup, layout: Layout) -> torch.Tensor:
    """The current-layout tensor of `group`, read from a `layout` checkpoint (per-expert slices stacked on dim 0)."""
    parts = [reader.get(name) for name in group.names(layout)]
    return parts[0] if len(parts) == 1 else torch.stack(parts)  # E x [rows, cols] -> [E, rows, cols]
