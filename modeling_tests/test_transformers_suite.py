"""transformers' own `ModelTesterMixin` and `ConfigTester` run against zaya_hf's classes.

The mixins come from the sdist of the installed transformers version (transformers_test_mixins.py says how; the
first run downloads it with pip, later runs use the cache). `ZAYA_SUITE_TARGET=native` runs the identical suite
against transformers' own ZAYA, so that the two can be compared on the same transformers version:

    python -m pytest modeling_tests/test_transformers_suite.py                          # zaya_hf
    ZAYA_SUITE_TARGET=native python -m pytest modeling_tests/test_transformers_suite.py  # transformers' ZAYA
"""

import unittest

import pytest
import torch
import transformers_test_mixins
from suite_target import TARGET, TARGET_PACKAGES, ZayaConfig, ZayaForCausalLM, ZayaModel, target_auto_classes
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

try:
    test_modeling_common, test_configuration_common = transformers_test_mixins.load()
except transformers_test_mixins.MixinsUnavailable as error:
    pytest.skip(f"transformers' test mixins are unavailable: {error}", allow_module_level=True)

ModelTesterMixin = test_modeling_common.ModelTesterMixin
ConfigTester = test_configuration_common.ConfigTester
ids_tensor = test_modeling_common.ids_tensor


class ZayaModelTester:
    """The tiny ZAYA that the mixin's tests build, and their inputs. Every attribute the mixin reads is set here."""

    def __init__(self, parent: unittest.TestCase):
        self.parent = parent
        self.config_class = ZayaConfig
        self.base_model_class = ZayaModel
        self.causal_lm_class = ZayaForCausalLM
        self.batch_size = 13
        self.seq_length = 7
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.num_key_value_heads = 2
        self.head_dim = 8
        self.num_experts = 4
        self.num_experts_per_tok = 1
        self.moe_intermediate_size = 16
        self.router_hidden_size = 8
        self.layer_types = ["hybrid", "hybrid_sliding"]
        self.sliding_window = 4  # below seq_length, so that the sliding layer masks something
        self.max_position_embeddings = 64  # the RoPE-scaling tests run 1.5 times as many positions
        self.pad_token_id = 0
        self.bos_token_id = 1
        self.eos_token_id = 2

    def config_kwargs(self) -> dict:
        names = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "num_experts", "num_experts_per_tok", "moe_intermediate_size", "router_hidden_size", "layer_types",
            "sliding_window", "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
        )
        return {name: getattr(self, name) for name in names}

    def get_config(self):
        return self.config_class(**self.config_kwargs())

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        # Right padding of varied lengths: row i keeps seq_length - i tokens (at least 1).
        lengths = (self.seq_length - torch.arange(self.batch_size)).clamp(min=1)
        attention_mask = (torch.arange(self.seq_length)[None, :] < lengths[:, None]).long()
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.usefixtures(target_auto_classes.__name__)
class ZayaTransformersSuiteTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (ZayaModel, ZayaForCausalLM)
    # Top-1 routing: a tiny batch leaves some experts (and the skip class's path) unused, so without gradient.
    test_all_params_have_gradient = False

    def setUp(self):
        self.model_tester = ZayaModelTester(self)
        self.config_tester = ConfigTester(self, config_class=ZayaConfig, **self.model_tester.config_kwargs())

    def test_suite_runs_the_target_classes(self):
        """Guards the comparison: every class under test, and what the Auto classes resolve, is the target's."""
        package = TARGET_PACKAGES[TARGET]
        for cls in (ZayaConfig, ZayaModel, ZayaForCausalLM, *self.all_model_classes):
            self.assertTrue(cls.__module__.startswith(package + "."), f"{cls} is not from {package}")
        config = self.model_tester.get_config()
        self.assertIs(type(config), ZayaConfig)
        self.assertIs(AutoConfig.for_model("zaya").__class__, ZayaConfig)
        self.assertIs(type(AutoModel.from_config(config)), ZayaModel)
        self.assertIs(type(AutoModelForCausalLM.from_config(config)), ZayaForCausalLM)

    @unittest.skip(
        "It checks that the test class derives from transformers' GenerationTesterMixin, which the sdist does not "
        "carry (a placeholder stands in); the generation checks are in test_generation_suite.py."
    )
    def test_generation_tester_mixin_inheritance(self):
        pass

    def test_config(self):
        self.config_tester.run_common_tests()

    # The mixin's test runs the *unscaled* model on 1.5 x max_position_embeddings tokens, which zaya_hf refuses with
    # the default RoPE (README "Strict by default"). (transformers' ZAYA runs it and fails it: its key temperature
    # starts at 0, so its outputs do not depend on positions at all.) What the test is about, the frequencies of each
    # scaled RoPE type, is checked by test_model_rope_scaling_frequencies and test_conventions.py.
    if TARGET == "zaya_hf":
        for _name in [name for name in dir(ModelTesterMixin) if name.startswith("test_model_rope_scaling_from_config_")]:
            locals()[_name] = unittest.skip(
                "runs the unscaled model past max_position_embeddings, which zaya_hf refuses with the default RoPE"
            )(lambda self: None)
        del _name

    def test_model(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = ZayaModel(config).eval()
        with torch.no_grad():
            hidden = model(**inputs).last_hidden_state
        tester = self.model_tester
        self.assertEqual(hidden.shape, (tester.batch_size, tester.seq_length, tester.hidden_size))
