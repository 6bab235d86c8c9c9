"""TRL's SFTTrainer on ZAYA: chat data, assistant-only loss through ZAYA_TRAINING_CHAT_TEMPLATE, a LoRA preset and
the bias balancer; trains, saves and reloads the adapter."""

import pytest
import torch
from transformers import AutoTokenizer

import zaya_hf
from zaya_hf import ZayaConfig, ZayaForCausalLM
from zaya_hf.training import BiasBalancingCallback, lora_config, zaya_routers
from zaya_hf.training.sft import ZAYA_TRAINING_CHAT_TEMPLATE, tiny_reasoner_chats

trl = pytest.importorskip("trl", reason="TRL is an optional extra (zaya-hf[trl]); CI installs it with [dev]")
peft = pytest.importorskip("peft", reason="PEFT is an optional extra (zaya-hf[peft]); CI installs it with [dev]")


def chat_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(zaya_hf.default_model_path())
    tokenizer.chat_template = ZAYA_TRAINING_CHAT_TEMPLATE
    return tokenizer


def fresh_model(tokenizer) -> ZayaForCausalLM:
    torch.manual_seed(0)
    config = ZayaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, num_experts=4, moe_intermediate_size=24, router_hidden_size=16,
        layer_types=["hybrid", "hybrid_sliding"], sliding_window=16, initializer_range=0.1,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return ZayaForCausalLM(config)


def test_training_template_renders_the_shipped_template():
    shipped = AutoTokenizer.from_pretrained(zaya_hf.default_model_path())
    chat = tiny_reasoner_chats(3, seed=0, aggregation_fraction=1.0, tokenizer=shipped)[2]["messages"]
    for prompt in (True, False):
        assert chat_tokenizer().apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt) == (
            shipped.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
        )


def test_sft_trainer_trains_saves_and_reloads_a_lora_adapter(tmp_path):
    from datasets import Dataset
    from peft import PeftModel
    from trl import SFTConfig, SFTTrainer

    tokenizer = chat_tokenizer()
    rows = tiny_reasoner_chats(48, seed=0, aggregation_fraction=0.0)
    model = fresh_model(tokenizer)
    initial_biases = [router.balancing_biases.clone() for router in zaya_routers(model)]
    args = SFTConfig(
        str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        lr_scheduler_type="constant", assistant_only_loss=True, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, seed=0,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=lora_config(("attention", "experts", "router"), r=4, alpha=8),
        callbacks=[BiasBalancingCallback()],
    )
    batch = next(iter(trainer.get_train_dataloader()))
    answers = {row["messages"][1]["content"] + tokenizer.eos_token for row in rows}  # the answer and its EOS
    for labels in batch["labels"]:
        assert tokenizer.decode(labels[labels != -100]) in answers
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert any(not torch.equal(a, r.balancing_biases) for a, r in zip(initial_biases, zaya_routers(model)))

    trainer.model.save_pretrained(tmp_path / "adapter")
    base = fresh_model(tokenizer)
    with torch.no_grad():
        for router, trained in zip(zaya_routers(base), zaya_routers(trainer.model)):  # the biases live in the base
            router.balancing_biases.copy_(trained.balancing_biases)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    trained_params = dict(trainer.model.named_parameters())
    for name, param in reloaded.named_parameters():
        assert torch.equal(param, trained_params[name]), name
    labelled = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        assert reloaded(**labelled).loss < fresh_model(tokenizer).eval()(**labelled).loss - 0.3
