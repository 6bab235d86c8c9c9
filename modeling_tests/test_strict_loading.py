"""Strict loading: a checkpoint the model cannot use as it is fails in `from_pretrained`, `verify_checkpoint` and
`convert_checkpoint` alike, with the same exception class naming the tensor, field or file (issue 19's loading table)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import zaya_hf
from zaya_hf import ZayaForCausalLM
from zaya_hf.checkpoints import convert_checkpoint, verify_checkpoint

SOURCE = Path(zaya_hf.default_model_path())  # the embedded model: 4 layers, vocab 512, 3.8 MB
EXPERTS = "model.layers.1.mlp.experts.down_proj"  # not in layer 0: verify's forward slice would not see it


def checkpoint(tmp_path: Path, tensors=None, config=None) -> Path:
    """A copy of the embedded model with `tensors(dict)` / `config(dict)` applied to its weights / config.json."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(SOURCE, folder)
    if tensors is not None:
        state = load_file(folder / "model.safetensors")
        tensors(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        values = json.loads((folder / "config.json").read_text())
        config(values)
        (folder / "config.json").write_text(json.dumps(values))
    return folder


def _poison(name: str, value: float):
    def edit(state):
        state[name] = state[name].clone()
        state[name].view(-1)[3] = value

    return edit


def _errors():
    from zaya_hf.checkpoints import errors

    return errors


BAD_WEIGHTS = {
    "extra tensor": (
        lambda state: state.__setitem__("model.layers.0.extra", torch.ones(3)),
        "UnexpectedWeightsError",
        r"model\.layers\.0\.extra",
    ),
    "int64 tensor": (
        lambda state: state.__setitem__(EXPERTS, state[EXPERTS].to(torch.int64)),
        "InvalidWeightsError",
        r"model\.layers\.1\.mlp\.experts\.down_proj is stored as int64 in .*model\.safetensors",
    ),
    "NaN": (
        _poison(EXPERTS, float("nan")),
        "InvalidWeightsError",
        r"model\.layers\.1\.mlp\.experts\.down_proj holds 1 NaN/inf value\(s\) in ",
    ),
    "inf in layer 0": (
        _poison("model.layers.0.self_attn.o_proj.weight", float("inf")),
        "InvalidWeightsError",
        r"model\.layers\.0\.self_attn\.o_proj\.weight holds 1 NaN/inf value\(s\) in ",
    ),
}


@pytest.mark.parametrize("case", BAD_WEIGHTS, ids=list(BAD_WEIGHTS))
def test_bad_weights_fail_to_load_verify_and_convert_naming_the_tensor(tmp_path, case):
    edit, error_name, message = BAD_WEIGHTS[case]
    error = getattr(_errors(), error_name)
    folder = checkpoint(tmp_path, tensors=edit)
    with pytest.raises(error, match=message):
        ZayaForCausalLM.from_pretrained(folder)
    with pytest.raises(error, match=message):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(error, match=message):
        verify_checkpoint(folder)
    with pytest.raises(error, match=message) as raised:
        convert_checkpoint(folder, tmp_path / "new" / "deep" / "out", to="legacy", progress=False)
    assert ".partial-" not in str(raised.value)  # the input is named, not a deleted staging folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no output, no parent folders left


def test_values_are_read_on_request_only_by_verify(tmp_path):
    folder = checkpoint(tmp_path, tensors=_poison(EXPERTS, float("nan")))
    assert verify_checkpoint(folder, values=False).forward_checked  # headers and layer 0 only: layer 1 unread
    with pytest.raises(_errors().InvalidWeightsError, match=r"down_proj holds 1 NaN/inf value\(s\) in .*model\.safetensors"):
        verify_checkpoint(folder)


BAD_CONFIGS = {
    "zero layers": (lambda c: c.update(num_hidden_layers=0, layer_types=[]), r"num_hidden_layers must be >= 1, got 0"),
    "no vocab_size": (lambda c: c.pop("vocab_size"), r"lacks vocab_size: .*never taken from ZAYA1-8B's defaults"),
    "no hidden_size": (lambda c: c.pop("hidden_size"), r"lacks hidden_size"),
    "negative vocab_size": (lambda c: c.update(vocab_size=-5), r"vocab_size must be >= 1, got -5"),
    "negative max_position_embeddings": (
        lambda c: c.update(max_position_embeddings=-1),
        r"max_position_embeddings must be >= 1, got -1",
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=list(BAD_CONFIGS))
def test_bad_configs_fail_naming_the_field(tmp_path, case):
    edit, message = BAD_CONFIGS[case]
    error = _errors().InvalidConfigError
    folder = checkpoint(tmp_path, config=edit)
    with pytest.raises(error, match=message):
        ZayaForCausalLM.from_pretrained(folder)
    with pytest.raises(error, match=message):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(error, match=rf"{folder / 'config.json'} is not a valid ZAYA configuration: .*{message}"):
        verify_checkpoint(folder)


def test_a_truncated_safetensors_file_is_named(tmp_path):
    folder = checkpoint(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    for dtype in (None, "auto"):
        with pytest.raises(_errors().CorruptCheckpointError, match=rf"{weights} is truncated or corrupt"):
            ZayaForCausalLM.from_pretrained(folder, dtype=dtype)


def test_output_loading_info_reports_what_strict_loading_refuses(tmp_path):
    def edit(state):
        state.pop(EXPERTS)
        state["model.layers.0.extra"] = torch.ones(3)

    folder = checkpoint(tmp_path, tensors=edit)
    with pytest.raises(_errors().MissingWeightsError, match=r"lacks 1 tensor.*down_proj.*1 unexpected one.*extra"):
        ZayaForCausalLM.from_pretrained(folder)
    model, info = ZayaForCausalLM.from_pretrained(folder, output_loading_info=True)  # transformers' reporting path
    assert set(info["missing_keys"]) == {EXPERTS} and set(info["unexpected_keys"]) == {"model.layers.0.extra"}
    assert model.get_parameter(EXPERTS).shape == (4, 128, 256)


def test_one_error_hierarchy():
    from zaya_hf import checkpoints, modeling_zaya

    errors = _errors()
    # The names of zaya_hf.checkpoints are the model's classes: the same failure, wherever it is found.
    assert errors.MissingTensorsError is modeling_zaya.MissingWeightsError is zaya_hf.MissingWeightsError
    assert errors.WrongShapeError is modeling_zaya.MismatchedWeightsError is zaya_hf.MismatchedWeightsError
    assert errors.UnexpectedTensorsError is modeling_zaya.UnexpectedWeightsError
    assert errors.CorruptCheckpointError is modeling_zaya.CorruptCheckpointError
    names = ["CheckpointError", "InvalidConfigError", "CorruptCheckpointError", "MissingWeightsError",
             "UnexpectedWeightsError", "MismatchedWeightsError", "InvalidWeightsError", "UnknownLayoutError",
             "VerificationError", "MissingTensorsError", "UnexpectedTensorsError", "WrongShapeError"]
    for name in names:
        cls = getattr(errors, name)
        assert issubclass(cls, modeling_zaya.CheckpointError) and issubclass(cls, ValueError), name
        assert getattr(checkpoints, name) is cls
