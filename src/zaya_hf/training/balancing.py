"""Bias balancing of the ZAYA routers: the controller on `balancing_biases` that ZAYA trains with.

Each `ZayaRouter` counts, in training mode, the tokens it sends to every router class (E experts + skip, padding
excluded) and sums their decision margins, on the device. `BiasBalancer.step(model)` turns what was recorded since
its last step into loads, all-reduces them across data-parallel ranks and moves every layer's biases towards the
target load, with one of two rules: a PID controller whose gain adapts to the router ("pid", the default) or
DeepSeek-V3's auxiliary-loss-free sign rule ("sign").
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
    r"""Keeps every ZAYA layer's router load on target by moving its `balancing_biases` after each optimizer step.

    Per layer and router class c (the E experts, then skip), with l_c the fraction of the tokens routed to c since
    the previous step and e_c = target_c - l_c the load error, two rules:

    `rule="pid"` (default), a PID controller with a gain g_c per class that adapts to the router:

        bias_c = initial_c + g_c * (kp * e_c + kd * (e_c - previous e_c)) + ki * sum_steps(g_c * e_c)

    `rule="sign"`, DeepSeek-V3's auxiliary-loss-free update with a step u that decays over the steps t:

        bias_c += u_t * sign(e_c),   u_t = step_size / (1 + t / decay_steps)

    The biases add to the router *probabilities* before the top-1 choice (they never change the expert weighting),
    and a bias step re-routes the tokens whose decision margin (best minus second-best biased probability) is
    smaller than the step. How far the deciding tokens are from a boundary varies by orders of magnitude: a fresh
    router's probabilities sit within ~1e-4 of each other, a trained one's differ by ~0.1, and at the balanced point
    of a sharp router the deciding tokens lie within ~1e-4 of a boundary while the mean margin is ~0.1. A fixed
    step (the sign rule's u, or a PID gain on the probability scale) suits one of these and makes the others crawl
    or flip whole clusters of tokens from expert to expert on every step.

    So the PID's gain starts at the layer's mean decision margin and then adapts per class, like Rprop's step
    sizes: it grows by `GAIN_GROWTH` per step while the (lightly smoothed) error keeps its sign, shrinks by
    `GAIN_SHRINK` when the sign flips (an overshoot), and stays between `MIN_GAIN_MARGINS` and `MAX_GAIN_MARGINS`
    mean margins. Without the adaptation (`adaptive_gain=False`: g_c is the layer's mean margin at every step, the
    gain schedule of earlier versions) the controller overshoots by whole clusters of tokens on sharp routers and crawls once the top two
    classes' biased probabilities tie (the mean margin then collapses while a starved class is still far from
    winning). `benchmarks/bench_balancer.py` measures the three on the same skewed routers. Errors sum to zero over
    the classes but the adapted gains differ per class, so the biases' mean may drift; only differences matter.

    The sign rule needs `step_size` on the scale of the router's probabilities (DeepSeek-V3 used 0.001 on sigmoid
    affinities); it is the simpler rule, and the right one when that scale is known.

    Args:
        rule: `"pid"` or `"sign"`.
        kp, ki, kd: PID gains (rule "pid"; dimensionless, multiplied by g_c). Default 0, 1, 0: the integral term
            does the balancing. Per-step loads are noisy (a few percent on a few hundred tokens) and `kp` / `kd` feed
            that noise straight into the routing.
        adaptive_gain: adapt g_c (rule "pid", default) or keep it at the layer's mean margin.
        step_size, decay_steps: u_0 and the decay of the sign rule (default 1e-3 and 100;
            `decay_steps=float("inf")` keeps u constant, as in DeepSeek-V3).
        target_load: the target fraction per class, E+1 non-negative values summing to 1 (skip last). Default:
            uniform over the experts with `skip_load` for the skip class.
        skip_load: fraction of tokens that should skip the MoE when `target_load` is not given. Default 0.0 keeps
            the published behaviour (ZAYA1-8B's skip class never wins); e.g. 0.1 asks the router to spend no
            expert compute on a tenth of the tokens.
        max_offset: optional bound on |bias - initial| per class (the PID's integral is clamped with it:
            anti-windup).
        process_group: the group the loads are all-reduced over when `torch.distributed` is initialised
            (default: the world).

    Call `step(model)` after each optimizer step (`BiasBalancingCallback` does it for `Trainer`): it applies the
    loads recorded by training-mode forwards since the previous step, in fp32 and outside autograd, and returns
    them as fractions [L, E+1].
    """

    RULES = ("pid", "sign")
    # The PID's gain adaptation (rule "pid", adaptive_gain=True): factors per step, the weight of the previous
    # smoothed error (0.5 halves per-step noise without the lag that makes a grown gain overshoot), and the cap in
    # mean decision margins.
    GAIN_GROWTH = 1.3
    GAIN_SHRINK = 0.5
    ERROR_SMOOTHING = 0.5
    MAX_GAIN_MARGINS = 10.0
    # The gain's floor, in mean margins (so that noise-driven sign flips cannot freeze a layer for good), and in
    # probability units (so that a layer whose tokens all tie, mean margin 0, still moves: e.g. a fresh router
    # computed in bf16, whose probabilities round to the same values).
    MIN_GAIN_MARGINS = 0.01
    MIN_GAIN = 1e-6
    _STATE_TENSORS = ("initial_biases", "integral", "previous_error", "gain", "smoothed_error")

    def __init__(
        self,
        rule: str = "pid",
        kp: float | None = None,
        ki: float | None = None,
        kd: float | None = None,
        adaptive_gain: bool | None = None,
        step_size: float | None = None,
        decay_steps: float | None = None,
        target_load: Sequence[float] | torch.Tensor | None = None,
        skip_load: float = 0.0,
        max_offset: float | None = None,
        process_group: Any = None,
    ):
        if rule not in self.RULES:
            raise ValueError(f"rule must be one of {self.RULES}, got {rule!r}.")
        pid_settings = {"kp": kp, "ki": ki, "kd": kd, "adaptive_gain": adaptive_gain}
        sign_settings = {"step_size": step_size, "decay_steps": decay_steps}
        if rule == "sign":
            given = sorted(name for name, value in pid_settings.items() if value is not None)
            if given:
                raise ValueError(f"{given} apply to rule='pid' only; the sign rule takes step_size and decay_steps.")
        elif any(value is not None for value in sign_settings.values()):
            raise ValueError("step_size and decay_steps apply to rule='sign' only; rule='pid' adapts its gain.")
        self.rule = rule
        self.kp, self.ki, self.kd = (float(0.0 if kp is None else kp), float(1.0 if ki is None else ki),
                                     float(0.0 if kd is None else kd))
        self.adaptive_gain = True if adaptive_gain is None else bool(adaptive_gain)
        self.step_size = float(1e-3 if step_size is None else step_size)
        self.decay_steps = float(100.0 if decay_steps is None else decay_steps)
        if min(self.kp, self.ki, self.kd) < 0:
            raise ValueError(f"PID gains must be non-negative, got kp={self.kp}, ki={self.ki}, kd={self.kd}.")
        if self.step_size <= 0 or self.decay_steps <= 0:
            raise ValueError(f"step_size and decay_steps must be positive, got {self.step_size}, {self.decay_steps}.")
        if target_load is not None and skip_load:
            raise ValueError("Pass either target_load (the skip class included) or skip_load, not both.")
        if not 0.0 <= skip_load < 1.0:
            raise ValueError(f"skip_load must be in [0, 1), got {skip_load}.")
        if max_offset is not None and max_offset <= 0:
            raise ValueError(f"max_offset must be positive, got {max_offset}.")
        self.skip_load = float(skip_load)
        self.max_offset = None if max_offset is None else float(max_offset)
        self.process_group = process_group
        self.target_load = None if target_load is None else self._checked_target(torch.as_tensor(target_load))
        # Controller state, [L, E+1] fp32 each; created at the first step.
        self.initial_biases: torch.Tensor | None = None
        self.integral: torch.Tensor | None = None
        self.previous_error: torch.Tensor | None = None
        self.gain: torch.Tensor | None = None
        self.smoothed_error: torch.Tensor | None = None
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
        rule_settings = (
            {"kp": self.kp, "ki": self.ki, "kd": self.kd, "adaptive_gain": self.adaptive_gain}
            if self.rule == "pid"
            else {"step_size": self.step_size, "decay_steps": self.decay_steps}
        )
        return {
            "rule": self.rule,
            **rule_settings,
            "target_load": None if self.target_load is None else self.target_load.tolist(),
            "skip_load": self.skip_load,
            "max_offset": self.max_offset,
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
        active = tokens > 0  # stays on device: no host sync
        biases = torch.stack([router.balancing_biases for router in routers]).float()
        if self.initial_biases is None:
            self.initial_biases = biases.clone()
        elif self.initial_biases.shape != biases.shape:
            raise ValueError(
                f"The balancer's state is for {tuple(self.initial_biases.shape)} (layers, classes) but the model "
                f"has {tuple(biases.shape)}."
            )
        self._to_device(biases.device)
        error = torch.where(active, self.target_for(biases.shape[-1], biases.device) - load, 0.0)
        if self.rule == "sign":
            new_biases = self._sign_update(biases, error)
        else:
            new_biases = self._pid_update(error, margin_sums[:, None] / tokens.clamp_min(1), active)
        if self.max_offset is not None:
            new_biases = self.initial_biases + (new_biases - self.initial_biases).clamp(-self.max_offset, self.max_offset)
        new_biases = torch.where(active, new_biases, biases)
        for router, row in zip(routers, new_biases):
            router.balancing_biases.copy_(row)
        self.num_steps += 1
        self.last_load = load
        return load

    def _sign_update(self, biases: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        return biases + self.step_size / (1.0 + self.num_steps / self.decay_steps) * torch.sign(error)

    def _pid_update(self, error: torch.Tensor, margin: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The new biases [L, E+1] from the errors [L, E+1] and the layers' mean decision margins [L, 1]."""
        margin = margin.clamp_min(self.MIN_GAIN)
        if not self.adaptive_gain:
            self.gain = margin.expand_as(error).clone()
        elif self.gain is None:
            self.gain, self.smoothed_error = margin.expand_as(error).clone(), error.clone()
        else:
            smoothed = self.ERROR_SMOOTHING * self.smoothed_error + (1 - self.ERROR_SMOOTHING) * error
            agreement = torch.sign(smoothed) * torch.sign(self.smoothed_error)
            factor = torch.where(agreement > 0, self.GAIN_GROWTH, torch.where(agreement < 0, self.GAIN_SHRINK, 1.0))
            gain = (self.gain * factor).clamp(self.MIN_GAIN_MARGINS * margin, self.MAX_GAIN_MARGINS * margin)
            self.gain = torch.where(active, gain, self.gain)
            self.smoothed_error = torch.where(active, smoothed, self.smoothed_error)
        if self.integral is None:
            self.integral = torch.zeros_like(error)
        self.integral += self.gain * error
        if self.max_offset is not None and self.ki > 0:
            self.integral.clamp_(-self.max_offset / self.ki, self.max_offset / self.ki)
        derivative = torch.zeros_like(error) if self.previous_error is None else error - self.previous_error
        self.previous_error = error if self.previous_error is None else torch.where(active, error, self.previous_error)
        # Inactive layers' results are discarded by the caller (they keep their biases).
        return self.initial_biases + self.gain * (self.kp * error + self.kd * derivative) + self.ki * self.integral

    def _to_device(self, device: torch.device) -> None:
        for name in (*self._STATE_TENSORS, "target_load"):
            value = getattr(self, name)
            if value is not None and value.device != device:
                setattr(self, name, value.to(device))

    def state_dict(self) -> dict[str, Any]:
        """The controller state (CPU tensors; None where a rule keeps none or before the first step)."""
        state = {
            name: None if getattr(self, name) is None else getattr(self, name).detach().cpu().clone()
            for name in self._STATE_TENSORS
        }
        return {"rule": self.rule, **state, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned (tensors or nested lists, as stored in JSON)."""
        missing = {*self._STATE_TENSORS, "num_steps", "rule"} - state.keys()
        if missing:
            raise KeyError(f"BiasBalancer state lacks {sorted(missing)}.")
        if state["rule"] != self.rule:
            raise ValueError(f"The state is for rule={state['rule']!r} but this balancer uses rule={self.rule!r}.")
        tensors = {
            name: None if state[name] is None else torch.as_tensor(state[name], dtype=torch.float32).clone()
            for name in self._STATE_TENSORS
        }
        shapes = {tuple(t.shape) for t in tensors.values() if t is not None}
        if len(shapes) > 1:
            raise ValueError(f"Inconsistent BiasBalancer state: tensor shapes {sorted(shapes)}.")
        for name, value in tensors.items():
            setattr(self, name, value)
        self.num_steps = int(state["num_steps"])


class BiasBalancingCallback(TrainerCallback, ExportableState):
    """Runs a `BiasBalancer` after every optimizer step of a `Trainer`, and keeps its state in Trainer checkpoints.

    The controller state is stored with the other callback states in the checkpoint's `trainer_state.json` and
    restored in place when training resumes from that checkpoint, so `balancer` stays the object you passed.

    ```python
    trainer = Trainer(model, args, train_dataset=data, callbacks=[BiasBalancingCallback(BiasBalancer(rule="sign"))])
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
