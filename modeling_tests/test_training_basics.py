"""Loss, num_items_in_batch and gradient checkpointing on the core model."""

import torch
from conftest import make_pair


def test_loss_matches_manual_cross_entropy_and_honours_num_items_in_batch(pair):
    ours, _ = pair
    ids = torch.randint(3, 101, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    out = ours(ids, labels=labels)
    shift_logits, shift_labels = out.logits[:, :-1].reshape(-1, 101), labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    summed = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    assert torch.allclose(ours(ids, labels=labels, num_items_in_batch=40).loss, summed / 40, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(pair):
    ours, _ = pair
    ids = torch.randint(3, 101, (2, 9))

    def grads():
        ours.zero_grad()
        ours(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    ours.train()
    plain = grads()
    calls = []
    ours.model.layers[0].mlp.register_forward_hook(lambda *args: calls.append(1))
    ours.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert len(calls) == 2  # the layer really was recomputed in backward
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name
    # The balancing biases are a buffer, never a trainable parameter.
    assert not any("balancing_biases" in n for n, _ in ours.named_parameters())


def test_aux_loss_is_added_only_when_asked(pair):
    ours, _ = pair
    ids = torch.randint(3, 101, (2, 9))
    plain = ours(ids, labels=ids).loss
    ours.config.router_aux_loss_coef = 0.5
    out = ours(ids, labels=ids, output_router_logits=True)
    assert torch.allclose(out.loss, plain + 0.5 * out.aux_loss, atol=1e-6)
