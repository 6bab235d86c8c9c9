import json

import pytest
from reference_data import ZAYA1_8B_CONFIG
from transformers import AutoConfig

import zaya_hf
from zaya_hf import ZayaConfig


def test_published_config_loads_unchanged(tmp_path):
    config = ZayaConfig.from_json_file(ZAYA1_8B_CONFIG)
    published = json.loads(ZAYA1_8B_CONFIG.read_text())
    assert config.model_type == "zaya"
    for key in ("hidden_size", "num_hidden_layers", "num_experts", "head_dim", "vocab_size", "router_hidden_size",
                "moe_intermediate_size", "num_key_value_heads", "cca_time0", "cca_time1", "eos_token_id"):
        assert getattr(config, key) == published[key], key
    # The stray top-level "rope_type" inside rope_parameters is dropped; the per-layer-type dicts are kept.
    assert set(config.rope_parameters) == {"hybrid", "hybrid_sliding"}
    assert config.rope_parameters["hybrid"]["rope_theta"] == 5_000_000
    assert config.rope_parameters["hybrid_sliding"]["partial_rotary_factor"] == 0.5
    assert config.tie_word_embeddings is True
    # What we write reads back identically, with AutoConfig resolving to our class.
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert type(reloaded) is ZayaConfig
    assert reloaded.to_diff_dict() == config.to_diff_dict()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "zaya"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_experts_per_tok": 2}, "num_experts_per_tok must be 1"),
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "must be a positive multiple of num_key_value_heads"),
        ({"num_hidden_layers": 2, "layer_types": ["hybrid", "hybrid_sliding"]}, "sliding_window must be a positive"),
        ({"num_hidden_layers": 2, "layer_types": ["hybrid", "mamba"]}, "layer type"),
        ({"num_hidden_layers": 3, "layer_types": ["hybrid", "hybrid"]}, "layer_types has 2 entries"),
        ({"num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 3}, "must be even"),
    ],
)
def test_invalid_configs_fail_with_a_precise_message(overrides, message):
    with pytest.raises(Exception, match=message):
        ZayaConfig(**overrides)


def test_registration_is_idempotent_and_overrides_builtin():
    zaya_hf.register_auto_classes()
    zaya_hf.register_auto_classes()
    assert type(AutoConfig.for_model("zaya")) is ZayaConfig
