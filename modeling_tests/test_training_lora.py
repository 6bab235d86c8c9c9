"""LoRA presets: exactly the intended modules, training, save / reload, merge, and the fused experts."""

import pytest
import torch
from training_helpers import StrideCorpus, mean_loss, tiny_model, training_args
from transformers import Trainer

from zaya_hf.training import LORA_TARGET_MODULES, lora_config

peft = pytest.importorskip("peft")

PRESETS = [("attention",), ("experts",), ("router",), ("attention", "experts", "router")]


def adapted_modules(model) -> set[str]:
    """Names (relative to the base model) of the Linears and expert parameters that carry a LoRA pair."""
    names = set()
    for name, _ in model.named_parameters():
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0].replace("base_model.model.", "")
            names.add(module.replace(".base_layer", ""))
    return names


def test_presets_target_exactly_the_intended_modules():
    model = peft.get_peft_model(tiny_model(), lora_config(("attention", "router")))
    expected = {
        f"model.layers.{layer}.{path}"
        for layer in range(2)
        for preset in ("attention", "router")
        for path in LORA_TARGET_MODULES[preset]
    }
    assert adapted_modules(model) == expected
    assert len(expected) == 2 * (5 + 4)  # v_proj_current / v_proj_delayed in, the CCA convs and experts out
    assert not any("conv_qk" in name or "experts" in name for name in adapted_modules(model))


def test_experts_preset_wraps_both_fused_parameters_with_one_pair_per_expert():
    model = peft.get_peft_model(tiny_model(), lora_config("experts", r=4))
    lora = {name: p.shape for name, p in model.named_parameters() if "lora_" in name}
    assert len(lora) == 2 * 2 * 2  # 2 layers x (gate_up, down) x (A, B)
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert {experts.parameter_name, experts.base_layer.parameter_name} == {"gate_up_proj", "down_proj"}
    # E=4 experts x r=4: A maps the expert input, B gives the expert output ([E, out, in] layout, no transpose).
    shapes = {(wrapper.parameter_name, wrapper.lora_A["default"].weight.shape, wrapper.lora_B["default"].weight.shape)
              for wrapper in (experts, experts.base_layer)}
    assert shapes == {("gate_up_proj", (16, 32), (48, 16)), ("down_proj", (16, 24), (32, 16))}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mlp"):
        lora_config("mlp")
    with pytest.raises(ValueError, match="dropout"):
        lora_config(("attention", "experts"), dropout=0.1)
    assert lora_config("attention", dropout=0.1).lora_dropout == 0.1
    with pytest.raises(ValueError, match="target_modules"):
        lora_config("attention", target_modules=["q_proj"])


NEW_TASK = dict(strides=(4, 7))  # the fine-tuning task: strides the base model never saw


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory):
    """A base model pre-trained on strides {1, 2, 3, 5}, as LoRA would start from."""
    model = tiny_model()
    args = training_args(tmp_path_factory.mktemp("base"), max_steps=150)
    Trainer(model, args, train_dataset=StrideCorpus(2048)).train()
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def base_model(weights):
    model = tiny_model()
    model.load_state_dict(weights)
    return model


@pytest.mark.parametrize("targets", PRESETS, ids=["+".join(t) for t in PRESETS])
def test_preset_trains_saves_reloads_and_merges(tmp_path, base_weights, targets):
    held_out = StrideCorpus(16, seed=1, **NEW_TASK).input_ids
    model = peft.get_peft_model(base_model(base_weights), lora_config(targets, r=4, alpha=8))
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert lora_before and all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    before = mean_loss(model, held_out)
    args = training_args(tmp_path / "run", max_steps=60, learning_rate=5e-3)
    Trainer(model, args, train_dataset=StrideCorpus(512, **NEW_TASK)).train()
    after = mean_loss(model, held_out)
    # The router alone can only re-pick and re-weight experts, so it moves the loss least (about 3% here).
    assert after < (0.99 if targets == ("router",) else 0.8) * before, (before, after)
    trained = dict(model.named_parameters())
    changed = {n for n in lora_before if not torch.equal(lora_before[n], trained[n])}
    assert changed == set(lora_before)  # every adapter, the fused experts' included, was trained

    model.eval()
    with torch.no_grad():
        adapted_logits = model(held_out).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(base_model(base_weights), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(held_out).logits, adapted_logits, atol=1e-6, rtol=1e-6)
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        assert not torch.allclose(base_model(base_weights).eval()(held_out).logits, adapted_logits, atol=1e-3)
        torch.testing.assert_close(merged(held_out).logits, adapted_logits, atol=1e-5, rtol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    model = peft.get_peft_model(tiny_model(), lora_config(r=4)).train()
    ids = StrideCorpus(4, seq_len=16).input_ids
    with torch.no_grad():  # non-zero B so that every adapter gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.base_model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and any("experts" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
