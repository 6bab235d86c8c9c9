"""Bias balancing: the two update rules, the Trainer callback, checkpoint resume, and a skewed router brought back."""

import json

import pytest
import torch
from training_helpers import StrideCorpus, tiny_model, training_args
from transformers import Trainer

from zaya_hf.training import (
    BiasBalancer,
    BiasBalancingCallback,
    collect_router_loads,
    expert_load_imbalance,
    zaya_routers,
)


def record(model, counts: list[list[int]], margin_sums: list[float] | None = None) -> None:
    """Pretend training forwards routed `counts[layer][class]` tokens, whose decision margins add up to
    `margin_sums[layer]`."""
    margin_sums = margin_sums or [0.0] * len(counts)
    for router, row, margin_sum in zip(zaya_routers(model), counts, margin_sums):
        router.load_counts, router.margin_sum = torch.tensor(row), torch.tensor(margin_sum)


def test_pid_with_the_margin_gain_follows_the_formula():
    model = tiny_model()
    initial = torch.stack([r.balancing_biases for r in zaya_routers(model)]).clone()  # [2, 5]
    balancer = BiasBalancer(kp=0.3, ki=0.2, kd=0.1, adaptive_gain=False)
    target = torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0])
    steps = (
        ([[40, 20, 20, 20, 0], [10, 30, 30, 20, 10]], [2.0, 30.0]),  # 100 tokens: mean margins 0.02 and 0.3
        ([[25, 25, 25, 25, 0], [0, 50, 25, 25, 0]], [5.0, 10.0]),
    )
    integral, previous = torch.zeros(2, 5), None
    for counts, margin_sums in steps:
        record(model, counts, margin_sums)
        load = balancer.step(model)
        expected_load = torch.tensor(counts, dtype=torch.float) / 100
        torch.testing.assert_close(load, expected_load)
        margin = torch.tensor(margin_sums)[:, None] / 100
        error = target - expected_load
        integral += margin * error
        derivative = torch.zeros_like(error) if previous is None else error - previous
        previous = error
        expected = initial + margin * (0.3 * error + 0.1 * derivative) + 0.2 * integral
        biases = torch.stack([r.balancing_biases for r in zaya_routers(model)])
        torch.testing.assert_close(biases, expected)
        torch.testing.assert_close(biases.sum(-1), initial.sum(-1))  # one gain per layer, errors sum to 0: no drift
        assert all(r.load_counts is None for r in zaya_routers(model))  # consumed
    assert balancer.num_steps == 2


def test_adaptive_gain_grows_while_the_error_keeps_its_sign_and_shrinks_when_it_flips():
    model = tiny_model(num_hidden_layers=1, layer_types=["hybrid"])
    balancer = BiasBalancer()
    grow, shrink, smoothing = BiasBalancer.GAIN_GROWTH, BiasBalancer.GAIN_SHRINK, BiasBalancer.ERROR_SMOOTHING
    margin = 0.01  # 100 tokens, margins summing to 1
    record(model, [[70, 10, 10, 10, 0]], [1.0])  # errors -0.45, +0.15 x 3, 0
    balancer.step(model)
    torch.testing.assert_close(balancer.gain, torch.full((1, 5), margin))
    record(model, [[60, 10, 10, 20, 0]], [1.0])  # same signs
    balancer.step(model)
    torch.testing.assert_close(balancer.gain[0, :4], torch.full((4,), margin * grow))
    # Expert 3 overshoots (error +0.05 smoothed to +0.1, then -0.35): its smoothed error flips; the others keep theirs.
    record(model, [[20, 10, 10, 60, 0]], [1.0])
    balancer.step(model)
    assert smoothing * 0.1 + (1 - smoothing) * -0.35 < 0
    torch.testing.assert_close(balancer.gain[0, 3], torch.tensor(margin * grow * shrink))
    torch.testing.assert_close(balancer.gain[0, :3], torch.full((3,), margin * grow * grow))
    # The gain stays within MIN_GAIN_MARGINS and MAX_GAIN_MARGINS mean margins.
    for _ in range(30):
        record(model, [[0, 100, 0, 0, 0]], [1.0])
        balancer.step(model)
    torch.testing.assert_close(balancer.gain[0, 1], torch.tensor(margin * BiasBalancer.MAX_GAIN_MARGINS))


def test_layers_without_tokens_keep_their_biases_and_offsets_are_clamped():
    model = tiny_model()
    before = [r.balancing_biases.clone() for r in zaya_routers(model)]
    balancer = BiasBalancer(rule="sign", step_size=0.1, max_offset=0.05)
    record(model, [[100, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    balancer.step(model)
    first, second = (r.balancing_biases for r in zaya_routers(model))
    torch.testing.assert_close(first - before[0], torch.tensor([-0.05, 0.05, 0.05, 0.05, 0.0]))
    assert torch.equal(second, before[1])
    pid = BiasBalancer(max_offset=0.05)
    for _ in range(20):
        record(model, [[100, 0, 0, 0, 0], [100, 0, 0, 0, 0]], [100.0, 100.0])  # mean margin 1
        pid.step(model)
    assert pid.integral.abs().max() <= 0.05  # anti-windup: the integral stops at the clamp


def test_sign_rule_steps_by_a_decaying_step():
    model = tiny_model(num_hidden_layers=1, layer_types=["hybrid"])
    initial = zaya_routers(model)[0].balancing_biases.clone()
    balancer = BiasBalancer(rule="sign", step_size=0.01, decay_steps=2)
    for _ in range(3):
        record(model, [[70, 10, 10, 10, 0]], [5.0])  # the margins play no part
        balancer.step(model)
    moved = 0.01 * (1 + 1 / 1.5 + 1 / 2)  # u_t = 0.01 / (1 + t / 2), t = 0, 1, 2
    expected = initial + torch.tensor([-moved, moved, moved, moved, 0.0])
    torch.testing.assert_close(zaya_routers(model)[0].balancing_biases, expected)


def test_targets():
    assert BiasBalancer().target_for(5).tolist() == [0.25, 0.25, 0.25, 0.25, 0.0]
    torch.testing.assert_close(BiasBalancer(skip_load=0.2).target_for(5), torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2]))
    custom = BiasBalancer(target_load=[0.4, 0.2, 0.2, 0.1, 0.1])
    with pytest.raises(ValueError, match="router classes"):
        custom.target_for(17)
    with pytest.raises(ValueError, match="sum to 1"):
        BiasBalancer(target_load=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="not both"):
        BiasBalancer(target_load=[0.5, 0.5], skip_load=0.1)
    with pytest.raises(ValueError, match="non-negative"):
        BiasBalancer(ki=-1.0)
    with pytest.raises(ValueError, match="no ZAYA routers"):
        BiasBalancer().step(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="rule must be one of"):
        BiasBalancer(rule="aux-loss")
    with pytest.raises(ValueError, match=r"\['kp'\] apply to rule='pid' only"):
        BiasBalancer(rule="sign", kp=0.1)
    with pytest.raises(ValueError, match="apply to rule='sign' only"):
        BiasBalancer(step_size=0.01)


@pytest.mark.parametrize("rule", ["pid", "sign"])
def test_state_dict_round_trips_through_json(rule):
    model = tiny_model()
    balancer = BiasBalancer(kd=0.1, max_offset=0.5) if rule == "pid" else BiasBalancer(rule="sign", max_offset=0.5)
    for counts in ([[70, 10, 10, 10, 0]] * 2, [[40, 20, 20, 20, 0]] * 2):
        record(model, counts, [3.0, 4.0])
        balancer.step(model)
    stored = json.loads(json.dumps(BiasBalancingCallback(balancer).state()))
    restored = BiasBalancingCallback(**stored["args"])
    restored.balancer_state = stored["attributes"]["balancer_state"]
    for key, value in balancer.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(restored.balancer.state_dict()[key], value), key
        else:
            assert restored.balancer.state_dict()[key] == value
    assert restored.balancer.config() == balancer.config()
    with pytest.raises(ValueError, match="rule="):
        BiasBalancer(rule="sign" if rule == "pid" else "pid").load_state_dict(balancer.state_dict())


def skewed_model(seed: int) -> torch.nn.Module:
    """A router with token-dependent choices (weights of std 0.5) pushed towards expert 0 in every layer."""
    model = tiny_model(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp.gate." in name and param.ndim == 2:
                param.normal_(0.0, 0.5)
        for router in zaya_routers(model):
            router.router_mlp.out_proj.weight[0] += 0.25
    return model


@torch.no_grad()
def worst_imbalance(model) -> float:
    """max/mean expert load of the most imbalanced layer on 2048 held-out tokens."""
    model.train()
    collect_router_loads(model)
    model(StrideCorpus(64, seed=1).input_ids)
    return expert_load_imbalance(collect_router_loads(model)).max().item()


@pytest.mark.parametrize("balanced", [False, True])
def test_balancer_brings_a_skewed_router_into_balance(tmp_path, balanced):
    model = skewed_model(seed=1)
    initial_biases = [r.balancing_biases.clone() for r in zaya_routers(model)]
    assert worst_imbalance(model) > 2.0
    callbacks = [BiasBalancingCallback()] if balanced else []
    args = training_args(tmp_path, max_steps=200, per_device_train_batch_size=16, learning_rate=1e-3)
    trainer = Trainer(model, args, train_dataset=StrideCorpus(4096), callbacks=callbacks)
    trainer.train()
    # The optimizer never holds the biases (a buffer), so only the balancer can move them.
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(r.balancing_biases) for r in zaya_routers(model)}
    biases = [r.balancing_biases for r in zaya_routers(model)]
    if balanced:
        assert worst_imbalance(model) < 1.2
        assert biases[0][0] < initial_biases[0][0]  # expert 0 was disfavoured
    else:
        assert worst_imbalance(model) > 2.0
        assert all(torch.equal(a, b) for a, b in zip(biases, initial_biases))


@pytest.mark.parametrize("restore_flag", [False, True])
def test_resume_from_checkpoint_continues_the_controller(tmp_path, restore_flag):
    """Resuming restores the controller in place; with `restore_callback_states_from_checkpoint=True` Trainer
    rebuilds the callback from its stored state instead, with the same result."""

    def trainer(output_dir, max_steps):
        args = training_args(
            output_dir,
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=4,
            restore_callback_states_from_checkpoint=restore_flag,
        )
        callback = BiasBalancingCallback(BiasBalancer(kd=0.05))
        return Trainer(skewed_model(seed=0), args, train_dataset=StrideCorpus(256), callbacks=[callback]), callback

    straight, straight_callback = trainer(tmp_path / "straight", max_steps=8)
    straight.train()

    first_half, _ = trainer(tmp_path / "resumed", max_steps=4)
    first_half.train()
    stored = json.loads((tmp_path / "resumed" / "checkpoint-4" / "trainer_state.json").read_text())
    assert stored["stateful_callbacks"]["BiasBalancingCallback"]["attributes"]["balancer_state"]["num_steps"] == 4

    resumed, passed_callback = trainer(tmp_path / "resumed", max_steps=8)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-4"))
    [resumed_callback] = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, BiasBalancingCallback)]
    assert (resumed_callback is passed_callback) != restore_flag
    assert resumed_callback.balancer.num_steps == 8  # restored at step 4, then stepped 4 times
    for key, value in straight_callback.balancer.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(resumed_callback.balancer.state_dict()[key], value, msg=key)
    for ours, theirs in zip(zaya_routers(resumed.model), zaya_routers(straight.model)):
        torch.testing.assert_close(ours.balancing_biases, theirs.balancing_biases)


@torch.no_grad()
def test_generation_in_training_mode_leaves_the_balancer_counts_as_they_were():
    """An RL trainer generates its rollouts in training mode: generation has no mask for the padding of rows that
    already finished, and the loss forward counts the same tokens with their mask, so generate() must not count."""
    model = tiny_model().train()
    ids = StrideCorpus(2, seed=3).input_ids[:, :8]
    collect_router_loads(model)
    model(ids)  # a training-mode forward counts
    counted = collect_router_loads(model, reset=False).clone()
    assert counted.sum() == len(zaya_routers(model)) * ids.numel()
    model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(collect_router_loads(model), counted)
