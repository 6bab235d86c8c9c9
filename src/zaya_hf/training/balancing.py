"""PID bias balancing of the ZAYA routers: the controller on `balancing_biases` that ZAYA trains with.

Each `ZayaRouter` counts, in training mode, the tokens it sends to every router class (E experts + skip, padding
excluded) and sums their decision margins, on the device. `BiasBalancer.step(model)` turns what was recorded since
its last step into loads, all-reduces them across data-parallel ranks and moves every layer's biases towards the
target load.
"""

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState


def zaya_routers(model: nn.Module) -> list[nn.Module]:
    """The routers of a ZAYA model (through DDP / PEFT wrappers), in layer order."""
    routers = [m for m in model.modules() if hasattr(m, "balancing_biases") and hasattr(m, "load_counts")]
    if not routers:
        raise ValueError(
            f"{type(model).__name__} has no ZAYA routers that record their load (modules with `balancing_biases` "
            "and `load_counts`); bias balancing needs a zaya_hf model."
        )
    return routers


def collect_router_loads(model: nn.Module, reset: bool = True) -> torch.Tensor:
    """Tokens per router class recorded by training-mode forwards, as an int64 tensor [L, E+1] on the model's device.

    With `reset` the routers start counting afresh. Layers that recorded nothing give a row of zeros.
    """
    return _stacked_router_stats(zaya_routers(model), reset)[0]


def _stacked_router_stats(routers: list[nn.Module], reset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens per class [L, E+1] int64, sum of the tokens' decision margins [L] fp32) recorded by the routers."""
    counts, margin_sums = [], []
    for router in routers:
        if router.load_counts is None:
            counts.append(torch.zeros_like(router.balancing_biases, dtype=torch.long))
            margin_sums.append(torch.zeros_like(router.balancing_biases[0]))
        else:
            counts.append(router.load_counts)
            margin_sums.append(router.margin_sum)
        if reset:
            router.load_counts = router.margin_sum = None
    return torch.stack(counts), torch.stack(margin_sums)


def expert_load_imbalance(load: torch.Tensor) -> torch.Tensor:
    """max / mean of the load over the E real experts (the skip class, last, left out): 1.0 is perfect balance.

    `load` [..., E+1] may hold counts or fractions; the result has the leading shape.
    """
    experts = load[..., :-1].float()
    return experts.max(dim=-1).values / experts.mean(dim=-1)


class BiasBalancer:
    r"""PID controller that keeps every ZAYA layer's router load on target by moving its `balancing_biases`.

    Per layer and router class c (the E experts, then skip), with l_c the fraction of the tokens routed to c since
    the previous step and e_c = target_c - l_c the load error:

        bias_c = initial_c + m * (kp * e_c + kd * (e_c - previous e_c)) + ki * sum_steps(m * e_c)

    where `initial` are the biases found at the first step and m is the layer's mean decision margin over the
    step's tokens: best minus second-best biased router probability. Errors sum to zero over the classes (loads
    and targets both sum to 1), so the controller (without `max_offset`) never drifts the biases' mean.

    Why the margin: the biases add to the router *probabilities* before the top-1 choice (they never change the
    expert weighting), and a bias step re-routes the tokens whose margin is smaller than the step. How sharp the
    router is sets the scale: a freshly initialised router's probabilities sit within ~1e-4 of each other, a
    trained one's differ by ~0.1. A fixed step that suits one makes the other flip whole batches from expert to
    expert, or crawl. Measuring the controller output in margins (gain scheduling) lets the same gains work from
    the first step of pre-training to fine-tuning ZAYA1-8B. `scale_by_margin=False` gives the plain PID, with the
    gains on the probability scale.

    Args:
        kp, ki, kd: proportional, integral and derivative gains (dimensionless with `scale_by_margin`). The
            integral term does the balancing: with `ki=1` an expert that gets all the tokens of a layer moves its
            bias by about one margin per step, one off by a few percent by a few percent of a margin. The derivative
            term is off by default: per-step loads are noisy, and `kd` feeds that noise straight into the routing.
        target_load: the target fraction per class, E+1 non-negative values summing to 1 (skip last). Default:
            uniform over the experts with `skip_load` for the skip class.
        skip_load: fraction of tokens that should skip the MoE when `target_load` is not given. Default 0.0 keeps
            the published behaviour (ZAYA1-8B's skip class never wins); e.g. 0.1 asks the router to spend no
            expert compute on a tenth of the tokens.
        max_offset: optional bound on |bias - initial| per class; the integral is clamped with it (anti-windup).
        scale_by_margin: measure the controller output in decision margins (default) or in probabilities.
        process_group: the group the loads are all-reduced over when `torch.distributed` is initialised
            (default: the world).

    Call `step(model)` after each optimizer step (`BiasBalancingCallback` does it for `Trainer`): it applies the
    loads recorded by training-mode forwards since the previous step, in fp32 and outside autograd, and returns
    them as fractions [L, E+1].
    """

    def __init__(
        self,
        kp: float = 0.2,
        ki: float = 1.0,
        kd: float = 0.0,
        target_load: Sequence[float] | torch.Tensor | None = None,
        skip_load: float = 0.0,
        max_offset: float | None = None,
        scale_by_margin: bool = True,
        process_group: Any = None,
    ):
        if min(kp, ki, kd) < 0:
            raise ValueError(f"PID gains must be non-negative, got kp={kp}, ki={ki}, kd={kd}.")
        if target_load is not None and skip_load:
            raise ValueError("Pass either target_load (the skip class included) or skip_load, not both.")
        if not 0.0 <= skip_load < 1.0:
            raise ValueError(f"skip_load must be in [0, 1), got {skip_load}.")
        if max_offset is not None and max_offset <= 0:
            raise ValueError(f"max_offset must be positive, got {max_offset}.")
        self.kp, self.ki, self.kd = float(kp), float(ki), float(kd)
        self.skip_load = float(skip_load)
        self.max_offset = None if max_offset is None else float(max_offset)
        self.scale_by_margin = bool(scale_by_margin)
        self.process_group = process_group
        self.target_load = None if target_load is None else self._checked_target(torch.as_tensor(target_load))
        # Controller state, [L, E+1] fp32 each; created at the first step.
        self.initial_biases: torch.Tensor | None = None
        self.integral: torch.Tensor | None = None
        self.previous_error: torch.Tensor | None = None
        self.num_steps = 0
        self.last_load: torch.Tensor | None = None

    @staticmethod
    def _checked_target(target: torch.Tensor) -> torch.Tensor:
        target = target.detach().to(torch.float32).cpu()
        if target.ndim != 1 or target.numel() < 2:
            raise ValueError(f"target_load must be a 1-D sequence of E+1 fractions, got shape {tuple(target.shape)}.")
        if bool((target < 0).any()) or not math.isclose(float(target.sum()), 1.0, abs_tol=1e-4):
            raise ValueError(f"target_load must be non-negative and sum to 1, got {target.tolist()}.")
        return target

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable, process group left out)."""
        return {
            "kp": self.kp,
            "ki": self.ki,
            "kd": self.kd,
            "target_load": None if self.target_load is None else self.target_load.tolist(),
            "skip_load": self.skip_load,
            "max_offset": self.max_offset,
            "scale_by_margin": self.scale_by_margin,
        }

    def target_for(self, num_classes: int, device: torch.device | None = None) -> torch.Tensor:
        """The target load per class [E+1] for a model with `num_classes` = E+1 router classes (the default one built
        on `device`, so that a step copies nothing from the host)."""
        if self.target_load is None:
            num_experts = num_classes - 1
            target = torch.full((num_classes,), (1.0 - self.skip_load) / num_experts, device=device)
            target[-1] = self.skip_load
            return target
        if self.target_load.numel() != num_classes:
            raise ValueError(
                f"target_load has {self.target_load.numel()} entries but the model has {num_classes} router classes "
                f"({num_classes - 1} experts + skip)."
            )
        return self.target_load

    @torch.no_grad()
    def step(self, model: nn.Module) -> torch.Tensor:
        """Apply the loads recorded since the previous step to every layer's `balancing_biases`; returns the loads
        [L, E+1] (fractions; a layer that recorded no token gets zeros and keeps its biases)."""
        routers = zaya_routers(model)
        counts, margin_sums = _stacked_router_stats(routers, reset=True)  # [L, E+1], [L]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(counts, group=self.process_group)
            dist.all_reduce(margin_sums, group=self.process_group)
        tokens = counts.sum(dim=-1, keepdim=True)  # [L, 1]
        load = counts.float() / tokens.clamp_min(1)
        scale = margin_sums[:, None] / tokens.clamp_min(1) if self.scale_by_margin else 1.0
        active = tokens > 0  # stays on device: no host sync
        biases = torch.stack([router.balancing_biases for router in routers]).float()
        if self.initial_biases is None:
            self.initial_biases = biases.clone()
            self.integral = torch.zeros_like(biases)
        elif self.initial_biases.shape != biases.shape:
            raise ValueError(
                f"The balancer's state is for {tuple(self.initial_biases.shape)} (layers, classes) but the model "
                f"has {tuple(biases.shape)}."
            )
        self._to_device(biases.device)

        error = torch.where(active, self.target_for(biases.shape[-1], biases.device) - load, 0.0)
        self.integral += scale * error
        if self.max_offset is not None and self.ki > 0:
            self.integral.clamp_(-self.max_offset / self.ki, self.max_offset / self.ki)
        derivative = torch.zeros_like(error) if self.previous_error is None else error - self.previous_error
        # Inactive layers' offsets are discarded below (they keep their biases), whatever their derivative.
        offset = scale * (self.kp * error + self.kd * derivative) + self.ki * self.integral
        if self.max_offset is not None:
            offset = offset.clamp(-self.max_offset, self.max_offset)
        new_biases = torch.where(active, self.initial_biases + offset, biases)
        for router, row in zip(routers, new_biases):
            router.balancing_biases.copy_(row)
        self.previous_error = error if self.previous_error is None else torch.where(active, error, self.previous_error)
        self.num_steps += 1
        self.last_load = load
        return load

    def _to_device(self, device: torch.device) -> None:
        for name in ("initial_biases", "integral", "previous_error", "target_load"):
            value = getattr(self, name)
            if value is not None and value.device != device:
                setattr(self, name, value.to(device))

    def state_dict(self) -> dict[str, Any]:
        """The controller state (CPU tensors; None before the first step)."""

        def cpu(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value.detach().cpu().clone()

        return {
            "initial_biases": cpu(self.initial_biases),
            "integral": cpu(self.integral),
            "previous_error": cpu(self.previous_error),
            "num_steps": self.num_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned (tensors or nested lists, as stored in JSON)."""
        missing = {"initial_biases", "integral", "previous_error", "num_steps"} - state.keys()
        if missing:
            raise KeyError(f"BiasBalancer state lacks {sorted(missing)}.")

        def tensor(value: Any) -> torch.Tensor | None:
            return None if value is None else torch.as_tensor(value, dtype=torch.float32).clone()

        initial, integral, previous = (tensor(state[k]) for k in ("initial_biases", "integral", "previous_error"))
        shapes = {tuple(t.shape) for t in (initial, integral, previous) if t is not None}
        if len(shapes) > 1 or (initial is None) != (integral is None):
            raise ValueError(f"Inconsistent BiasBalancer state: tensor shapes {sorted(shapes)}.")
        self.initial_biases, self.integral, self.previous_error = initial, integral, previous
        self.num_steps = int(state["num_steps"])


class BiasBalancingCallback(TrainerCallback, ExportableState):
    """Runs a `BiasBalancer` after every optimizer step of a `Trainer`, and keeps its state in Trainer checkpoints.

    The controller state is stored with the other callback states in the checkpoint's `trainer_state.json` and
    restored in place when training resumes from that checkpoint, so `balancer` stays the object you passed.

    ```python
    trainer = Trainer(model, args, train_dataset=data, callbacks=[BiasBalancingCallback(BiasBalancer(ki=0.05))])
    ```
    """

    def __init__(self, balancer: BiasBalancer | None = None, **balancer_kwargs: Any):
        if balancer is not None and balancer_kwargs:
            raise ValueError("Pass either a BiasBalancer or its keyword arguments, not both.")
        self.balancer = balancer if balancer is not None else BiasBalancer(**balancer_kwargs)

    # `Trainer(restore_callback_states_from_checkpoint=True)` rebuilds the callback from `state()`: the balancer's
    # constructor arguments, then this attribute.
    @property
    def balancer_state(self) -> dict[str, Any]:
        state = self.balancer.state_dict()
        return {key: value.tolist() if isinstance(value, torch.Tensor) else value for key, value in state.items()}

    @balancer_state.setter
    def balancer_state(self, state: dict[str, Any]) -> None:
        self.balancer.load_state_dict(state)

    def state(self) -> dict[str, Any]:
        return {"args": self.balancer.config(), "attributes": {"balancer_state": self.balancer_state}}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        name = type(self).__name__
        stored = state.stateful_callbacks.get(name)
        if state.global_step > 0 and isinstance(stored, dict):  # resuming from a checkpoint saved with us
            self.balancer_state = stored["attributes"]["balancer_state"]
        # Trainer updates this entry on every save; a checkpoint saved without the callback lacks it.
        state.stateful_callbacks.setdefault(name, self.state())

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        self.balancer.step(model)


class LoadImbalanceLogger(TrainerCallback):
    """Prints, on the main process whenever Trainer logs, the loss (when logged) and the worst layer's expert load
    imbalance (max / mean, 1.0 = balanced) at the balancer's last step."""

    def __init__(self, balancer: BiasBalancer):
        self.balancer = balancer

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        load = self.balancer.last_load
        if state.is_world_process_zero and load is not None:
            loss = f"loss {logs['loss']:.3f}, " if logs and "loss" in logs else ""
            print(f"step {state.global_step}: {loss}expert load imbalance (worst layer) "
                  f"{expert_load_imbalance(load).max().item():.2f}")


__all__ = [
    "BiasBalancer",
    "BiasBalancingCallback",
    "LoadImbalanceLogger",
    "collect_router_loads",
    "expert_load_imbalance",
    "zaya_routers",
]
