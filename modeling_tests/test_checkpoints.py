"""Checkpoint compatibility: Auto classes, transformers' ZAYA both ways, the 8B tensor layout, bad checkpoints."""

from pathlib import Path

import pytest
import torch
from conftest import make_pair, tiny_config
from reference_data import ZAYA1_8B_CONFIG, zaya1_8b_tensor_shapes
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM
from transformers.models.zaya.modeling_zaya import ZayaForCausalLM as ReferenceForCausalLM

import zaya_hf
from zaya_hf import MismatchedWeightsError, MissingWeightsError, ZayaConfig, ZayaForCausalLM, ZayaModel


@torch.no_grad()
def test_auto_class_loads_a_folder_written_by_transformers(tmp_path):
    ours, reference = make_pair(seed=1)
    reference.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is zaya_hf.ZayaForCausalLM
    assert type(AutoModel.from_pretrained(tmp_path)) is ZayaModel
    ids = torch.randint(3, 101, (2, 8))
    assert (loaded(ids).logits - reference(ids).logits).abs().max().item() <= 1e-5


@torch.no_grad()
def test_transformers_loads_a_folder_written_by_us(tmp_path):
    ours, _ = make_pair(seed=2)
    ours.save_pretrained(tmp_path)
    reference, info = ReferenceForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(3, 101, (2, 8))
    assert (ours(ids).logits - reference.eval()(ids).logits).abs().max().item() <= 1e-5


def test_meta_construction_of_8b_has_the_published_tensors():
    expected = zaya1_8b_tensor_shapes()
    config = ZayaConfig.from_json_file(ZAYA1_8B_CONFIG)
    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in model._tied_weights_keys}
    assert len(expected) == 1283
    assert state == expected


def _corrupt_checkpoint(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_an_error_not_a_random_init(tmp_path):
    ours, _ = make_pair()
    ours.save_pretrained(tmp_path)
    _corrupt_checkpoint(tmp_path, lambda t: t.pop("model.layers.2.mlp.experts.down_proj"))
    with pytest.raises(MissingWeightsError, match=r"model\.layers\.2\.mlp\.experts\.down_proj"):
        ZayaForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(MissingWeightsError):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    model = ZayaForCausalLM.from_pretrained(tmp_path, allow_missing_weights=True)  # on purpose only
    assert model.model.layers[2].mlp.experts.down_proj.shape == (4, 64, 32)


def test_wrong_shaped_tensor_names_the_tensor_and_shapes(tmp_path):
    ours, _ = make_pair()
    ours.save_pretrained(tmp_path)
    _corrupt_checkpoint(tmp_path, lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.weight", torch.zeros(64, 32)))
    with pytest.raises(MismatchedWeightsError, match=r"o_proj\.weight \(checkpoint \(64, 32\), model \(64, 64\)\)"):
        ZayaForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_loading_in_any_dtype_keeps_balancing_biases_fp32(tmp_path, dtype):
    ours, _ = make_pair()
    ours.save_pretrained(tmp_path)
    loaded = ZayaForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert loaded.dtype == dtype
    for layer, original in zip(loaded.model.layers, ours.model.layers):
        assert layer.mlp.gate.balancing_biases.dtype == torch.float32
        assert torch.equal(layer.mlp.gate.balancing_biases, original.mlp.gate.balancing_biases)
    # Non-persistent rotary tables are rebuilt after the meta-device load (in the model dtype, as the reference).
    fresh = ZayaForCausalLM(tiny_config())
    assert torch.allclose(loaded.model.rotary_emb.hybrid_inv_freq.float(), fresh.model.rotary_emb.hybrid_inv_freq, rtol=1e-2)
    assert loaded.to(torch.float16).model.layers[0].mlp.gate.balancing_biases.dtype == torch.float32


def test_tied_head_survives_save_and_load(tmp_path):
    ours, _ = make_pair()
    ours.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = ZayaForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
