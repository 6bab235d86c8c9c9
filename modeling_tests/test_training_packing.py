"""Padding-free (packed) SFT batches give the padded batches' loss: TRL's collator with `padding_free=True` packs the
rows of a batch into one sequence with `position_ids` restarting at 0; the model must keep the rows apart."""

import pytest
import torch

from zaya_hf.training.sft import tiny_reasoner_chats

trl = pytest.importorskip("trl", reason="TRL is an optional extra (zaya-hf[trl]); CI installs it with [dev]")


def test_packed_and_padded_batches_give_the_same_loss():
    from test_training_sft import chat_tokenizer, fresh_model
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = chat_tokenizer()
    rows = []
    for chat in tiny_reasoner_chats(4, seed=0, aggregation_fraction=0.0):
        encoded = tokenizer.apply_chat_template(chat["messages"], return_dict=True, return_assistant_tokens_mask=True)
        rows.append({"input_ids": encoded["input_ids"], "assistant_masks": encoded["assistant_masks"]})
    assert len({len(row["input_ids"]) for row in rows}) > 1  # rows of different lengths: the padded batch pads
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(rows)
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(rows)
    assert packed["input_ids"].shape[0] == 1 and "position_ids" in packed

    model = fresh_model(tokenizer).eval()
    with torch.no_grad():
        padded_loss = model(**padded).loss
        packed_loss = model(**packed).loss
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
