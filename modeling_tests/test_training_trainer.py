"""Trainer on a tiny ZAYA: learning, num_items_in_batch under gradient accumulation, router load statistics."""

import pytest
import torch
from conftest import left_padded_batch, make_pair
from training_helpers import StrideCorpus, mean_loss, tiny_model, training_args
from transformers import Trainer

from zaya_hf.modeling_zaya import load_balancing_loss
from zaya_hf.training import collect_router_loads, zaya_routers


def test_trainer_loss_falls_by_more_than_half(tmp_path):
    model = tiny_model()
    held_out = StrideCorpus(32, seed=1).input_ids
    before = mean_loss(model, held_out)
    trainer = Trainer(model, training_args(tmp_path, max_steps=200), train_dataset=StrideCorpus(2048))
    trainer.train()
    after = mean_loss(model, held_out)
    assert after < 0.5 * before, (before, after)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1] < 0.5 * logged[0]


class MaskedLabels(torch.utils.data.Dataset):
    """Four rows whose labels keep very different numbers of tokens, so that averaging per micro-batch and
    averaging over the whole accumulated batch give different gradients."""

    def __init__(self):
        self.input_ids = StrideCorpus(4, seq_len=16).input_ids
        self.labels = self.input_ids.clone()
        for row, kept in enumerate((16, 2, 9, 4)):
            self.labels[row, kept:] = -100

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def test_gradient_accumulation_honours_num_items_in_batch(tmp_path):
    """One SGD step on 4 rows at once equals one step accumulated over 2 micro-batches of 2 rows."""
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = tiny_model()
        args = training_args(
            tmp_path / str(batch_size),
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=0.5,
            max_grad_norm=0.0,
        )
        seen = []
        model.register_forward_pre_hook(
            lambda module, args, kwargs, seen=seen: seen.append(kwargs.get("num_items_in_batch")), with_kwargs=True
        )
        Trainer(model, args, train_dataset=MaskedLabels()).train()
        assert [int(n) for n in seen] == [15 + 1 + 8 + 3] * accumulation  # label tokens after the shift
        results.append({name: p.detach().clone() for name, p in model.named_parameters()})
    initial = dict(tiny_model().named_parameters())
    assert any(not torch.equal(initial[name], results[0][name]) for name in initial)
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_router_loads_count_real_tokens_in_training_mode_only():
    model, _ = make_pair()
    ids, mask, rows = left_padded_batch()
    with torch.no_grad():
        model(ids, attention_mask=mask)  # eval mode: nothing recorded
        assert all(router.load_counts is None for router in model.modules() if hasattr(router, "load_counts"))

        model.train()
        model(ids, attention_mask=mask)
        padded_margins = [router.margin_sum.clone() for router in zaya_routers(model)]
        padded = collect_router_loads(model)  # [L, E+1]
        for row in rows:  # left padding is exactly equivalent to no padding: the same tokens, the same choices
            model(row[None])
        unpadded_margins = [router.margin_sum.clone() for router in zaya_routers(model)]
        unpadded = collect_router_loads(model)
    assert padded.shape == (4, 5) and padded.dtype == torch.long
    assert padded.sum(dim=-1).tolist() == [int(mask.sum())] * 4
    assert torch.equal(padded, unpadded)
    torch.testing.assert_close(padded_margins, unpadded_margins)
    assert all(margin > 0 for margin in padded_margins)
    assert collect_router_loads(model).sum() == 0  # reading resets


def test_gradient_checkpointing_gives_the_same_load_fractions():
    """Checkpointing recomputes each layer in backward, which records its tokens a second time: the counts double
    and the fractions the balancer uses stay the same."""
    model = tiny_model().train()
    ids = StrideCorpus(4, seq_len=16).input_ids

    def loads():
        model(ids, labels=ids).loss.backward()
        return collect_router_loads(model)

    plain = loads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = loads()
    assert torch.equal(checkpointed, 2 * plain)


def test_aux_loss_leaves_padding_out():
    model, _ = make_pair()
    ids, mask, rows = left_padded_batch()
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, output_router_logits=True)
        per_row = [model(row[None], output_router_logits=True).router_logits for row in rows]
    real_tokens_logits = tuple(torch.cat([logits[layer] for logits in per_row]) for layer in range(4))
    expected = load_balancing_loss(real_tokens_logits, model.config.num_experts)
    torch.testing.assert_close(padded.aux_loss, expected)
    unmasked = load_balancing_loss(padded.router_logits, model.config.num_experts)
    assert not torch.allclose(unmasked, expected)  # the padding really would have changed it


def test_router_loads_are_the_same_with_the_triton_kernels():
    pytest.importorskip("triton")
    model, _ = make_pair()
    model.train()
    ids, mask, _ = left_padded_batch()

    def recorded(backend):
        model.config.kernel_backend = backend
        with torch.no_grad():  # forward only: the fused router kernel runs (in the interpreter on CPU)
            model(ids, attention_mask=mask)
        margins = torch.stack([router.margin_sum for router in zaya_routers(model)])
        return collect_router_loads(model), margins

    torch_counts, torch_margins = recorded("torch")
    triton_counts, triton_margins = recorded("triton")
    assert torch.equal(triton_counts, torch_counts)
    torch.testing.assert_close(triton_margins, torch_margins, atol=1e-5, rtol=1e-4)
