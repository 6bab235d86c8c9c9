"""QLoRA on a 4-bit ZAYA: the presets (experts included) train over the frozen quantized base, and merging
re-quantizes exactly dequantize(base) + delta."""

import pytest
import torch
from transformers import AutoTokenizer

import zaya_hf
from zaya_hf import ZayaForCausalLM
from zaya_hf.quantization import QuantizedExperts, QuantizedLinear, ZayaQuantizationConfig
from zaya_hf.quantization import formats
from zaya_hf.quantization.qlora import QuantizedLoraExperts, QuantizedLoraLinear, get_qlora_model
from zaya_hf.training import lora_config


def test_qlora_trains_every_preset_on_a_4bit_base_and_merges_by_requantizing(tmp_path):
    path = zaya_hf.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["Compute 3+4. The answer is \\boxed{7}.", "Compute 12*7. The answer is \\boxed{84}."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    model = ZayaForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                            quantization_config=ZayaQuantizationConfig(bits=4, group_size=32))
    with torch.no_grad():
        base_logits = model(**batch).logits.float()
    base_integers = model.model.layers[0].mlp.experts.gate_up_proj.clone()
    peft_model = get_qlora_model(model, lora_config(("attention", "experts", "router"), r=4, alpha=8))
    layer = peft_model.base_model.model.model.layers[0]
    assert isinstance(layer.mlp.experts, QuantizedLoraExperts)
    assert isinstance(layer.self_attn.qkv_proj.v_proj_current, QuantizedLoraLinear)
    assert all("lora_" in name for name, p in peft_model.named_parameters() if p.requires_grad)

    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    peft_model.train()
    losses = []
    for _ in range(8):
        loss = peft_model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    experts = layer.mlp.experts
    assert experts.lora_gate_up_B["default"].abs().sum() > 0  # the experts' adapters trained
    assert torch.equal(experts.base_layer.gate_up_proj, base_integers)  # the base did not

    # Merging: each weight becomes quantize(dequantize(base) + delta), in the base's format.
    base = experts.base_layer
    expected = base.dequantized("gate_up_proj", torch.float32)
    for expert in range(base.num_experts):
        expected[expert] += experts.delta("gate_up_proj", "default", expert).detach().float()
    expected_q, expected_scale = formats.quantize(expected, base.spec, torch.bfloat16)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(**batch).logits.float()
    with pytest.raises(NotImplementedError, match="cannot be unmerged"):
        peft_model.merge_adapter()
        peft_model.unmerge_adapter()
    merged = peft_model.merge_and_unload()
    merged_experts = merged.model.layers[0].mlp.experts
    assert isinstance(merged_experts, QuantizedExperts) and isinstance(merged.lm_head, QuantizedLinear)
    q, scale = merged_experts.quantized("gate_up_proj")
    assert torch.equal(q, expected_q) and torch.equal(scale, expected_scale)
    with torch.no_grad():
        merged_logits = merged(**batch).logits.float()
    # Re-quantizing the merged weights rounds them to the base's grid, so the merged model is not the adapted one
    # exactly, but it keeps the adaptation: a merge that lost the deltas or added them twice would be as far from the
    # adapted logits as the base is (measured on the shipped model: 1.0-1.5 against 6.3-7.4).
    assert (merged_logits - adapted).abs().mean() < 0.5 * (adapted - base_logits).abs().mean()
    merged.save_pretrained(tmp_path)
    reloaded = ZayaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits.float(), merged_logits)
