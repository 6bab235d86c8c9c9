"""Legacy <-> current checkpoint conversion: exact round trips, the documented legacy names, the published 8B configs,
and bad input (each a clear error, the input untouched, no output left behind)."""

import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch
from conftest import randomize, tiny_config
from reference_data import ZAYA1_8B_CONFIG, ZAYA1_8B_LEGACY_CONFIG, zaya1_8b_tensor_shapes
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zaya_hf import ZayaConfig, ZayaForCausalLM
from zaya_hf.checkpoints import (
    CheckpointError,
    CorruptCheckpointError,
    MissingTensorsError,
    UnexpectedTensorsError,
    UnknownLayoutError,
    WrongShapeError,
    convert_checkpoint,
    current_config_to_legacy,
    detect_layout,
    expected_tensor_shapes,
    legacy_config_to_current,
    verify_checkpoint,
)
from zaya_hf.checkpoints.convert import main as convert_main

ROOT = Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, whatever its sharding."""
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def comparable(config: ZayaConfig) -> dict:
    """The config's content; a conversion ships no code, so it drops the `auto_map` of a save_pretrained folder."""
    return {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version", "auto_map")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model saved in the current layout, and its legacy form written through the reverse mapping."""
    root = tmp_path_factory.mktemp("tiny")
    model = randomize(ZayaForCausalLM(tiny_config()), seed=3).eval()
    model.save_pretrained(root / "current")
    convert_checkpoint(root / "current", root / "legacy", to="legacy", max_shard_size="40KB", progress=False)
    return model, root / "current", root / "legacy"


@pytest.fixture
def legacy_copy(tiny, tmp_path):
    """A private copy of the tiny legacy checkpoint, free to corrupt."""
    shutil.copytree(tiny[2], tmp_path / "legacy")
    return tmp_path / "legacy"


@torch.no_grad()
def test_legacy_checkpoint_converts_to_identical_logits(tiny, tmp_path):
    model, _, legacy = tiny
    assert detect_layout(legacy) == "legacy" and len(list(legacy.glob("model-*.safetensors"))) > 1
    report = convert_checkpoint(legacy, tmp_path / "converted", max_shard_size="64KB", progress=False)
    assert report.layout == "current" and report.forward_checked and report.num_shards > 1
    assert json.loads((tmp_path / "converted" / INDEX).read_text())["metadata"]["total_size"] > 0

    converted = ZayaForCausalLM.from_pretrained(tmp_path / "converted").eval()
    ids = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(converted(ids).logits, model(ids).logits)
    greedy = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(converted.generate(ids, **greedy), model.generate(ids, **greedy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_current_legacy_current_round_trip_is_bit_identical(tmp_path, dtype):
    randomize(ZayaForCausalLM(tiny_config()), seed=4).to(dtype).save_pretrained(tmp_path / "start")
    convert_checkpoint(tmp_path / "start", tmp_path / "legacy", to="legacy", progress=False)
    convert_checkpoint(tmp_path / "legacy", tmp_path / "back", progress=False)

    start, back = load_folder(tmp_path / "start"), load_folder(tmp_path / "back")
    assert start.keys() == back.keys()
    for name, tensor in start.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert start["model.layers.0.mlp.gate.balancing_biases"].dtype == torch.float32
    assert comparable(ZayaConfig.from_pretrained(tmp_path / "back")) == comparable(ZayaConfig.from_pretrained(tmp_path / "start"))


# (legacy name, current name, expert index) per ZAYA_ARCHITECTURE.md "Legacy layout", for 4 layers (8 half-layers).
DOCUMENTED_NAMES = [
    ("model.embed_tokens.weight", "model.embed_tokens.weight", None),
    ("model.final_norm.weight", "model.norm.weight", None),
    ("model.layers.0.res_scale.hidden_states_scale", "model.input_hidden_states_scale", None),
    ("model.layers.0.res_scale.hidden_states_bias", "model.input_hidden_states_bias", None),
    ("model.layers.2.input_norm.weight", "model.layers.1.input_layernorm.weight", None),
    ("model.layers.3.input_norm.weight", "model.layers.1.post_attention_layernorm.weight", None),
    ("model.layers.3.res_scale.residual_scale", "model.layers.1.post_attention_residual_scale.residual_scale", None),
    ("model.layers.4.res_scale.residual_bias", "model.layers.1.post_mlp_residual_scale.residual_bias", None),
    ("model.layers.2.res_scale.hidden_states_scale", "model.layers.0.post_mlp_residual_scale.hidden_states_scale", None),
    ("model.res_scale.hidden_states_bias", "model.layers.3.post_mlp_residual_scale.hidden_states_bias", None),
    ("model.layers.0.self_attn.qkv.linear_q.weight", "model.layers.0.self_attn.qkv_proj.q_proj.weight", None),
    ("model.layers.2.self_attn.qkv.linear_k.weight", "model.layers.1.self_attn.qkv_proj.k_proj.weight", None),
    ("model.layers.4.self_attn.qkv.val_proj1.weight", "model.layers.2.self_attn.qkv_proj.v_proj_current.weight", None),
    ("model.layers.2.self_attn.qkv.val_proj2.weight", "model.layers.1.self_attn.qkv_proj.v_proj_delayed.weight", None),
    ("model.layers.6.self_attn.qkv.conv_qk.0.bias", "model.layers.3.self_attn.qkv_proj.conv_qk_depthwise.bias", None),
    ("model.layers.6.self_attn.qkv.conv_qk.1.weight", "model.layers.3.self_attn.qkv_proj.conv_qk_grouped.weight", None),
    ("model.layers.4.self_attn.qkv.temp", "model.layers.2.self_attn.qk_norm.temp", None),
    ("model.layers.4.self_attn.o_proj.weight", "model.layers.2.self_attn.o_proj.weight", None),
    ("model.layers.5.zaya_block.router.rmsnorm_eda.weight", "model.layers.2.mlp.gate.router_mlp.norm.weight", None),
    ("model.layers.5.zaya_block.router.router_mlp.0.bias", "model.layers.2.mlp.gate.router_mlp.fc1.bias", None),
    ("model.layers.5.zaya_block.router.router_mlp.2.weight", "model.layers.2.mlp.gate.router_mlp.fc2.weight", None),
    ("model.layers.5.zaya_block.router.router_mlp.4.weight", "model.layers.2.mlp.gate.router_mlp.out_proj.weight", None),
    ("model.layers.1.zaya_block.router.down_proj.weight", "model.layers.0.mlp.gate.down_proj.weight", None),
    ("model.layers.7.zaya_block.router.router_states_scale", "model.layers.3.mlp.gate.router_states_scale", None),
    ("model.layers.3.zaya_block.router.balancing_biases", "model.layers.1.mlp.gate.balancing_biases", None),
    ("model.layers.7.zaya_block.experts.local_experts.2.linear_fc1.weight", "model.layers.3.mlp.experts.gate_up_proj", 2),
    ("model.layers.1.zaya_block.experts.local_experts.3.linear_fc2.weight", "model.layers.0.mlp.experts.down_proj", 3),
]


def test_legacy_tensors_carry_the_documented_names(tiny):
    model, _, legacy_folder = tiny
    legacy, current = load_folder(legacy_folder), model.state_dict()
    for legacy_name, current_name, expert in DOCUMENTED_NAMES:
        expected = current[current_name] if expert is None else current[current_name][expert]
        assert torch.equal(legacy[legacy_name], expected), legacy_name
    # Half-layer 0 holds only the input scaling; the first MoE half-layer has no router state to scale.
    assert "model.layers.0.res_scale.residual_scale" not in legacy
    assert "model.layers.1.zaya_block.router.router_states_scale" not in legacy
    config = tiny_config()
    num_current = len(current) - 1  # the tied head is not stored
    assert len(legacy) == num_current - 2 * config.num_hidden_layers + 2 * config.num_hidden_layers * config.num_experts
    legacy_config = json.loads((legacy_folder / "config.json").read_text())
    assert legacy_config["num_hidden_layers"] == 8 and legacy_config["ffn_hidden_size"] == 64
    assert legacy_config["layer_types"] == config.layer_types  # not expressible in the legacy schema: carried along


@pytest.fixture
def published():
    legacy = json.loads(ZAYA1_8B_LEGACY_CONFIG.read_text())
    return legacy, ZayaConfig.from_json_file(ZAYA1_8B_CONFIG)


def test_published_legacy_config_converts_to_the_published_current_config(published):
    legacy, current = published
    assert legacy_config_to_current(legacy).to_diff_dict() == current.to_diff_dict()
    back = current_config_to_legacy(current)
    hints = ("mamba_cache_dtype", "activation_func_fp8_input_store", "bias_activation_fusion")
    assert {k: back[k] for k in legacy if k not in hints} == {k: v for k, v in legacy.items() if k not in hints}


def test_published_legacy_8b_layout(published):
    legacy, _ = published
    config = legacy_config_to_current(legacy)
    current_shapes = expected_tensor_shapes(config, "current")
    assert current_shapes == zaya1_8b_tensor_shapes()
    legacy_shapes = expected_tensor_shapes(config, "legacy")
    assert len(legacy_shapes) == 1283 - 2 * 40 + 2 * 40 * 16
    assert legacy_shapes["model.layers.79.zaya_block.experts.local_experts.15.linear_fc1.weight"] == (4096, 2048)
    assert legacy_shapes["model.layers.1.zaya_block.router.router_mlp.4.weight"] == (17, 256)
    assert legacy_shapes["model.layers.78.self_attn.qkv.conv_qk.1.weight"] == (1280, 128, 2)
    assert legacy_shapes["model.res_scale.residual_scale"] == (2048,)
    assert "model.layers.1.zaya_block.router.router_states_scale" not in legacy_shapes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_converted_balancing_biases_are_fp32_in_any_load_dtype(legacy_copy, tmp_path, dtype):
    # Published legacy checkpoints store the balancing biases in bf16.
    for shard in legacy_copy.glob("model-*.safetensors"):
        tensors = load_file(shard)
        tensors = {k: v.bfloat16() if k.endswith("balancing_biases") else v for k, v in tensors.items()}
        save_file(tensors, shard, metadata={"format": "pt"})
    convert_checkpoint(legacy_copy, tmp_path / "converted", progress=False)
    stored = load_folder(tmp_path / "converted")["model.layers.2.mlp.gate.balancing_biases"]
    assert stored.dtype == torch.float32
    loaded = ZayaForCausalLM.from_pretrained(tmp_path / "converted", dtype=dtype)
    assert loaded.dtype == dtype
    assert loaded.model.layers[2].mlp.gate.balancing_biases.dtype == torch.float32
    assert torch.equal(loaded.model.layers[2].mlp.gate.balancing_biases, stored)


def _shard_of(folder: Path, name: str) -> Path:
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][name]


def _edit_shard(folder: Path, name: str, edit) -> None:
    """Apply `edit` to the tensors of the shard holding `name`, keeping the index in step."""
    shard = _shard_of(folder, name)
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name} | dict.fromkeys(tensors, shard.name)
    (folder / INDEX).write_text(json.dumps(index))


EXPERT = "model.layers.3.zaya_block.experts.local_experts.1.linear_fc1.weight"


def _truncate(folder: Path) -> None:
    shard = _shard_of(folder, EXPERT)
    shard.write_bytes(shard.read_bytes()[:-100])


def _drop_index_entry(folder: Path) -> None:
    index = json.loads((folder / INDEX).read_text())
    del index["weight_map"][EXPERT]
    (folder / INDEX).write_text(json.dumps(index))


def _unknown_tensor_names(folder: Path) -> None:
    """Another model's naming: `h.{i}.w`."""
    index = json.loads((folder / INDEX).read_text())
    renamed = {name: f"h.{i}.w" for i, name in enumerate(index["weight_map"])}
    for shard in folder.glob("model-*.safetensors"):
        save_file({renamed[k]: v for k, v in load_file(shard).items()}, shard)
    index["weight_map"] = {renamed[k]: v for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))


def _config_edit(remove: tuple[str, ...] = (), **changes):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config = {k: v for k, v in config.items() if k not in remove}
        (folder / "config.json").write_text(json.dumps({**config, **changes}))

    return edit


BAD_INPUTS = {
    "truncated shard": (_truncate, CorruptCheckpointError, r"truncated or corrupt"),
    "missing index entry": (_drop_index_entry, CorruptCheckpointError, r"no entry for 1 tensor.*local_experts\.1\.linear_fc1"),
    "missing tensor": (
        lambda f: _edit_shard(f, EXPERT, lambda t: t.pop(EXPERT)),
        MissingTensorsError,
        r"lacks 1 tensor.*local_experts\.1\.linear_fc1",
    ),
    "wrong shape": (
        lambda f: _edit_shard(f, EXPERT, lambda t: t.__setitem__(EXPERT, torch.zeros(64, 63))),
        WrongShapeError,
        r"local_experts\.1\.linear_fc1\.weight \(found \(64, 63\), expected \(64, 64\)\)",
    ),
    "unconvertible extra tensor": (
        lambda f: _edit_shard(f, EXPERT, lambda t: t.__setitem__("model.layers.3.zaya_block.router.extra", torch.ones(2))),
        UnexpectedTensorsError,
        r"no place for: model\.layers\.3\.zaya_block\.router\.extra",
    ),
    "another model type": (_config_edit(model_type="llama"), UnknownLayoutError, r"model_type 'llama', not 'zaya'"),
    "unknown tensor names": (_unknown_tensor_names, UnknownLayoutError, r"neither the current nor the legacy"),
    "legacy tensors, current config": (
        _config_edit(("ffn_hidden_size", "zaya_mlp_expansion", "norm_epsilon"), moe_intermediate_size=32),
        UnknownLayoutError,
        r"config\.json follows the current schema but the tensors the legacy layout",
    ),
    "other architecture": (_config_edit(activation_func="gelu"), UnknownLayoutError, r"activation_func='gelu'"),
    "invalid config": (_config_edit(moe_router_topk=2), CheckpointError, r"not a valid ZAYA configuration.*must be 1"),
    "no weights": (lambda f: [p.unlink() for p in f.glob("model*")], UnknownLayoutError, r"Only safetensors"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_stays_untouched(legacy_copy, tmp_path, case):
    corrupt, error, message = BAD_INPUTS[case]
    corrupt(legacy_copy)
    before = snapshot(legacy_copy)
    with pytest.raises(error, match=message):
        convert_checkpoint(legacy_copy, tmp_path / "out", progress=False)
    assert snapshot(legacy_copy) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy"]  # no output, no staging folder left


def test_refuses_to_overwrite_input_or_a_non_empty_output(tiny, tmp_path):
    _, current, legacy = tiny
    before = snapshot(legacy)
    with pytest.raises(CheckpointError, match="overlaps the input"):
        convert_checkpoint(legacy, legacy, progress=False)
    with pytest.raises(CheckpointError, match="overlaps the input"):
        convert_checkpoint(legacy, legacy / "converted", progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        convert_checkpoint(legacy, tmp_path / "taken", progress=False)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="already in the current layout"):
        convert_checkpoint(current, tmp_path / "same", progress=False)
    assert snapshot(legacy) == before
    (tmp_path / "empty").mkdir()  # an empty output folder is fine
    assert convert_checkpoint(legacy, tmp_path / "empty", forward_check=False, progress=False).layout == "current"


def test_verify_reports_on_a_folder(tiny):
    model, current, legacy = tiny
    stored = len(model.state_dict()) - 1  # the tied head is not stored
    report = verify_checkpoint(current)
    assert (report.layout, report.num_tensors, report.num_shards) == ("current", stored, 1)
    assert verify_checkpoint(legacy).num_tensors == stored - 2 * 4 + 2 * 4 * 4  # 4 layers, 4 experts
    assert "every expected tensor present once" in str(report)


def test_command_line(tiny, tmp_path, capsys, monkeypatch):
    _, _, legacy = tiny
    assert convert_main([str(legacy), str(tmp_path / "a"), "--no-progress"]) == 0
    assert "current layout" in capsys.readouterr().out
    assert convert_main([str(legacy), str(tmp_path / "a"), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert ": error: " in error and "not an empty folder" in error
    # The script in conversion/ is the same entry point.
    monkeypatch.setattr("sys.argv", ["convert_legacy_checkpoint.py", str(tmp_path / "a"), str(tmp_path / "b"), "--to", "legacy"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "conversion" / "convert_legacy_checkpoint.py"), run_name="__main__")
    assert exit_info.value.code == 0 and detect_layout(tmp_path / "b") == "legacy"
    with safe_open(tmp_path / "b" / "model-00001-of-00001.safetensors", "pt") as shard:
        assert "model.final_norm.weight" in shard.keys()
