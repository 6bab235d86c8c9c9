"""Tiny training setups shared by the training tests (and the DDP worker script)."""

import torch
from conftest import tiny_config
from torch.utils.data import Dataset
from transformers import TrainingArguments

from zaya_hf import ZayaConfig, ZayaForCausalLM


def train_config(**overrides) -> ZayaConfig:
    """Two layers, tiny widths; non-square experts (gate_up [E, 48, 32], down [E, 32, 24]) so that a transposed
    LoRA delta could not pass unnoticed."""
    dims = dict(
        hidden_size=32,
        num_hidden_layers=2,
        moe_intermediate_size=24,
        layer_types=["hybrid", "hybrid_sliding"],
        sliding_window=8,
    )
    return tiny_config(**{**dims, **overrides})


def tiny_model(seed: int = 0, **overrides) -> ZayaForCausalLM:
    torch.manual_seed(seed)
    return ZayaForCausalLM(train_config(**overrides))


class StrideCorpus(Dataset):
    """Rows `3 + (start + stride * t) mod (vocab - 3)` with a random start and a random stride from `strides`: a
    bigram model gets the loss from ln(vocab) to about ln(len(strides)); the conv / attention can pin the stride
    from two tokens."""

    def __init__(
        self, num_rows: int, seq_len: int = 32, vocab_size: int = 101, seed: int = 0, strides=(1, 2, 3, 5)
    ):
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab_size - 3, (num_rows, 1), generator=gen)
        stride = torch.tensor(strides)[torch.randint(0, len(strides), (num_rows, 1), generator=gen)]
        self.input_ids = 3 + (start + stride * torch.arange(seq_len)) % (vocab_size - 3)  # [N, S]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.input_ids[index]}


def training_args(output_dir, **overrides) -> TrainingArguments:
    """Quiet CPU TrainingArguments: constant LR, no saving, no reporting, no progress bars."""
    defaults = dict(
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(str(output_dir), **{**defaults, **overrides})


@torch.no_grad()
def mean_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    loss = model(input_ids=input_ids, labels=input_ids).loss.item()
    model.train(was_training)
    return loss
