"""AsyncMomentumSGD: torch.optim.SGD whose momentum stays what you tuned under asynchrony."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from asyncmomentum.core import formulas
from asyncmomentum.core import update as updates
from asyncmomentum.core.components import (
    CurvatureSchedule,
    GradientNormFeed,
    MeterComponent,
    StepComponent,
)
from asyncmomentum.core.finite_gradients import (
    GradientWatch,
    NonFiniteGradientError,
    check_gradients,
    nonfinite_error,
)
from asyncmomentum.core.measuring.meter import MomentumMeter
from asyncmomentum.core.measuring.staleness import DEFAULT_HORIZON, DEFAULT_WARMUP
from asyncmomentum.core.tracker import SKIPPED, AsynchronyTracker, MomentumSummary, StepReport
from asyncmomentum.core.tracker import STATE_FORMAT as TRACKER_STATE_FORMAT
from asyncmomentum.core.tuning.rules import TuningRule
from asyncmomentum.core.validation import (
    MAX_COUNT,
    check_bool,
    check_choice,
    check_int,
    check_loss,
    check_momentum,
    check_optimizer_state,
    check_real,
    check_staleness,
    is_loss,
)

__all__ = ["AsyncMomentumSGD", "NonFiniteGradientError"]

#: Version of the ``"async_momentum"`` entry of :meth:`AsyncMomentumSGD.state_dict`. Formats 1
#: (groups with ``target_momentum``, fixed when it was ``None``) and 2 (clock and tuner apart)
#: are upgraded on load.
STATE_FORMAT = 3
_STATE_KEY = "async_momentum"

#: What a parameter group that lacks a key (an older state dict) gets, as torch's SGD does.
_GROUP_DEFAULTS: dict[str, Any] = {
    "dampening": 0.0,
    "weight_decay": 0.0,
    "nesterov": False,
    "maximize": False,
    "foreach": None,
    "differentiable": False,
    "fused": None,
    "tune": True,
}


@dataclass
class _AsyncState:
    """Everything this optimizer keeps beyond torch's ``state`` and ``param_groups``.

    One object, so that pickling and copying carry all of it without a list of names.
    """

    nonfinite: str
    tracker: AsynchronyTracker
    components: dict[str, StepComponent] = field(default_factory=dict)
    #: Checks gradients for NaN/inf during backward (an empty watch after copy or unpickling).
    watch: GradientWatch = field(default_factory=GradientWatch)
    skipped_steps: int = 0
    last_step: StepReport = SKIPPED


class AsyncMomentumSGD(Optimizer):
    r"""torch.optim.SGD whose momentum stays what you tuned under asynchrony.

    Swap it for :class:`torch.optim.SGD` and keep your arguments: ``momentum`` is the momentum
    you tuned, the *total* to keep. Asynchronous training (Hogwild, parameter servers, delayed
    gradients) adds an *implicit* momentum ``1 - 1/M`` for ``M`` asynchronous workers
    (Mitliagkas et al., 2016); this optimizer measures the staleness of every gradient it
    applies, estimates ``M`` and applies the *algorithmic* momentum that brings the total back
    to ``momentum``: ``momentum - (1 - 1/M)`` by default, negative under high asynchrony. With no
    asynchrony it is :class:`torch.optim.SGD`, step for step. ``tune=False`` applies
    ``momentum`` as given (a plain SGD that also accepts negative momentum).

    Staleness is measured with a version clock: :meth:`zero_grad` (which a training loop calls
    right before the forward pass) notes the version the next gradient is computed from, and
    :meth:`step` takes the difference. Systems that know the staleness pass
    ``step(staleness=tau)``.

    Args:
        params: iterable of parameters (or named parameters) or of dicts defining parameter
            groups; a group may set any argument from ``lr`` to ``fused`` and ``tune``.
        lr: learning rate (float or 1-element tensor), >= 0.
        momentum: the momentum you tuned, in (-1, 1): the total (algorithmic + implicit) to
            keep, or with ``tune=False`` the momentum to apply.
        dampening: dampening of the momentum buffer, as in :class:`torch.optim.SGD`.
        weight_decay: L2 penalty, >= 0.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        maximize: maximize the objective instead of minimizing it.
        foreach: ``True`` for the multi-tensor path, ``False`` for the per-tensor loop,
            ``None`` to choose as torch does (see :func:`~asyncmomentum.core.update.choose_update`).
        differentiable: accepted for torch's signature; ``True`` raises (not supported).
        fused: ``True`` for torch's fused kernel, ``False`` to never use it, ``None`` to choose.
        tune: retune the applied momentum to the measured staleness (default). ``False`` fixes
            it at ``momentum``; the tuning options below then must keep their defaults.
        rule: how the algorithmic momentum is set, a name in
            :func:`asyncmomentum.core.tuning.rules.rule_names` or a rule object (``None``: the
            default): ``"additive"`` (``momentum - (1 - 1/M)``), ``"compositional"``,
            ``"closed_loop"`` (the additive rule corrected by the momentum meter, which it
            switches on), ``"stability"`` (needs a ``curvature_probe`` or calls to
            :meth:`estimate_curvature`) or ``"auto"`` (the stability bound at a curvature it
            finds itself, with an instability detector).
        momentum_bounds: ``(low, high)`` clip range of the tuned momentum, inside (-1, 1).
        workers: known number of asynchronous workers; skips estimation.
        horizon: span, in updates, of the staleness moving average.
        warmup: observations before the estimate leaves ``M = 1``.
        nonfinite: what a NaN or inf gradient does: ``"raise"`` a
            :class:`NonFiniteGradientError` or ``"skip"`` the step (counted in
            :attr:`skipped_steps`). Either way parameters, buffers and tracker are untouched.
            Limit: a gradient of 16,384 elements or more is checked by a sum taken during
            backward, so a value written through ``p.grad.data`` after backward (which torch
            does not version) is not seen and reaches the parameters on every update path;
            write gradients in place (``p.grad[...] = x``) or replace them (``p.grad = g``),
            both of which are checked at the step.
        measure_momentum: measure the total momentum from the trajectory with a
            :class:`~asyncmomentum.core.measuring.meter.MomentumMeter` (see
            :attr:`measured_total_momentum`). It needs one process to see every update in order
            (a simulator, a parameter server, Lightning): not Hogwild workers.
        meter_options: keyword arguments of the meter (e.g. ``refresh``).
        rule_options: keyword arguments of the feedback rule (e.g. ``gain`` for
            ``"closed_loop"``, ``curvature_margin`` for ``"stability"``).
        curvature_probe: for ``rule="stability"``: returns a scalar loss of the current
            parameters with its graph (no ``backward``); every ``curvature_every`` updates,
            :meth:`step` estimates ``lambda_max`` on it with Hessian-vector products.
        curvature_every: updates between curvature estimates (>= 1).

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = AsyncMomentumSGD(model.parameters(), lr=0.05, momentum=0.9)
        >>> opt.zero_grad()
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> _ = opt.step(staleness=3)
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        tune: bool = True,
        rule: str | TuningRule | None = None,
        momentum_bounds: tuple[float, float] = formulas.DEFAULT_MOMENTUM_BOUNDS,
        workers: float | None = None,
        horizon: int = DEFAULT_HORIZON,
        warmup: int = DEFAULT_WARMUP,
        nonfinite: Literal["raise", "skip"] = "raise",
        measure_momentum: bool = False,
        meter_options: dict[str, Any] | None = None,
        rule_options: dict[str, Any] | None = None,
        curvature_probe: Callable[[], Tensor] | None = None,
        curvature_every: int = 100,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
            "tune": tune,
        }
        # Every argument is checked before anything is built, as torch does.
        _check_group(defaults)
        check_choice(nonfinite, "nonfinite", ("raise", "skip"))
        check_int(curvature_every, "curvature_every", 1)
        if not tune:
            contradictions = {
                "rule": rule is not None,
                "workers": workers is not None,
                "rule_options": bool(rule_options),
                "curvature_probe": curvature_probe is not None,
            }
            given = [name for name, set_ in contradictions.items() if set_]
            if given:
                raise ValueError(
                    f"tune=False fixes the momentum, so {', '.join(given)} would have no effect; "
                    "drop tune=False to tune, or drop these arguments"
                )
        tracker_options: dict[str, Any] = {  # the tracker checks them
            "rule": rule,
            "momentum_bounds": momentum_bounds,
            "workers": workers,
            "horizon": horizon,
            "warmup": warmup,
            "rule_options": rule_options,
        }
        self._async = _AsyncState(nonfinite=nonfinite, tracker=AsynchronyTracker(**tracker_options))
        super().__init__(params, defaults)
        self._register_state_hook()
        if any(group["fused"] for group in self.param_groups):
            # torch.amp.GradScaler hands the fused kernel its scale instead of unscaling.
            self._step_supports_amp_scaling = True
        self._attach_components(measure_momentum, meter_options, curvature_probe, curvature_every)

    def _attach_components(
        self,
        measure_momentum: bool,
        meter_options: dict[str, Any] | None,
        curvature_probe: Callable[[], Tensor] | None,
        curvature_every: int,
    ) -> None:
        tracker = self.tracker
        components = self._async.components
        groups = self.param_groups
        if tracker.uses_curvature:
            components["curvature"] = CurvatureSchedule(
                groups, tracker, curvature_probe, curvature_every
            )
        elif curvature_probe is not None:
            raise ValueError(
                "curvature_probe is used by rule='stability' only; "
                f"this optimizer's rule is {tracker.rule_name!r}"
            )
        if measure_momentum or tracker.uses_meter:
            try:
                components["meter"] = MeterComponent(groups, tracker, **(meter_options or {}))
            except TypeError as error:
                raise ValueError(f"meter_options: {error}") from None
        elif meter_options:
            raise ValueError("meter_options need measure_momentum=True (or rule='closed_loop')")
        if tracker.uses_gradient_norm:  # rule="auto"
            components["gradient_norm"] = GradientNormFeed(groups, tracker)

    def _register_state_hook(self) -> None:
        # torch's state_dict() gets the "async_momentum" entry from the first post hook, so that
        # the user's own state_dict post hooks see the whole state.
        self.register_state_dict_post_hook(_add_async_state, prepend=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_async" in state:  # an unpickled optimizer: torch's hooks were not pickled
            self._register_state_hook()
            for group in self.param_groups:  # nor the gradient hooks (tensors drop them)
                self._async.watch.watch(group["params"])
        # State dicts and pickles of older versions lack some keys: torch's defaults apply.
        for group in self.param_groups:
            for key, value in _GROUP_DEFAULTS.items():
                group.setdefault(key, value)
        if hasattr(self, "_async"):  # load_state_dict replaces the groups: components follow
            for component in self._async.components.values():
                component.param_groups = self.param_groups

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_async"] = self._async
        return state

    # -- groups -------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; it may set any per-group argument, ``tune`` included.

        Args:
            param_group: a dict with ``params`` and any per-group option.
        """
        if "target_momentum" in param_group:
            raise ValueError(
                "parameter groups take 'momentum' (the total you tuned) and 'tune'; "
                "'target_momentum' is the old name of 'momentum'"
            )
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _check_group(merged)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._async.watch.watch(group["params"])
        for key in ("momentum", "dampening", "weight_decay"):
            group[key] = float(group[key])

    @property
    def tracker(self) -> AsynchronyTracker:
        """What this optimizer measured about asynchrony: clock, estimate, rule."""
        return self._async.tracker

    # -- what it measured ---------------------------------------------------------------------

    def applied_momentum(self, group: dict[str, Any]) -> float:
        """The momentum a parameter group applies now: tuned from its ``momentum``, or fixed.

        Args:
            group: one of :attr:`param_groups`.
        """
        if not group["tune"]:
            return float(group["momentum"])
        return self.tracker.algorithmic_momentum(group["momentum"], lr=_to_scalar(group["lr"]))

    def summary(self) -> MomentumSummary:
        """The first parameter group's momentum against the measured asynchrony, now.

        A tuned group's value comes from the tracker, so it is current also in a process that
        shares the estimate with Hogwild workers but did not step itself.
        """
        return self.tracker.summary(
            self.applied_momentum(self.param_groups[0]), self.measured_total_momentum
        )

    @property
    def rule(self) -> TuningRule:
        """The tuning rule (the tracker's)."""
        return self.tracker.rule

    @property
    def algorithmic_momentum(self) -> float:
        """Momentum the first parameter group applies now (tuned or fixed)."""
        return self.applied_momentum(self.param_groups[0])

    @property
    def implicit_momentum(self) -> float:
        """Implicit momentum ``1 - 1/M_hat`` of the measured asynchrony."""
        return self.tracker.implicit_momentum

    @property
    def total_momentum(self) -> float:
        """Algorithmic and implicit momentum composed under :attr:`rule`, for the first group."""
        return self.tracker.total_momentum(self.algorithmic_momentum)

    @property
    def estimated_workers(self) -> float:
        """``M_hat``, the estimated number of asynchronous workers."""
        return self.tracker.estimated_workers

    @property
    def mean_staleness(self) -> float:
        """Moving average of the staleness of applied gradients."""
        return self.tracker.mean_staleness

    @property
    def last_staleness(self) -> int:
        """Staleness of the most recently applied gradient."""
        return self.tracker.last_staleness

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (with ``nonfinite="skip"``)."""
        return self._async.skipped_steps

    @property
    def meter(self) -> MomentumMeter | None:
        """The momentum meter (with ``measure_momentum=True`` or ``rule="closed_loop"``)."""
        component = self._async.components.get("meter")
        return component.meter if isinstance(component, MeterComponent) else None

    @property
    def measured_total_momentum(self) -> float | None:
        """Total momentum measured from the trajectory by the momentum meter.

        ``None`` without the meter or before it has enough updates (see
        ``docs/momentum-meter.md``).
        """
        meter = self.meter
        return None if meter is None else meter.measured_total_momentum

    @property
    def curvature(self) -> float | None:
        """The ``lambda_max`` a curvature rule works with (``None`` for others, or before one)."""
        return self.tracker.curvature

    def _curvature_schedule(self) -> CurvatureSchedule:
        schedule = self._async.components.get("curvature")
        if not isinstance(schedule, CurvatureSchedule):
            raise ValueError(
                "the curvature feeds rule='stability'; this optimizer's rule is "
                f"{self.tracker.rule_name!r}"
            )
        return schedule

    @property
    def curvature_probe(self) -> Callable[[], Tensor] | None:
        """The loss :meth:`step` estimates the curvature on (``rule="stability"``).

        Settable, e.g. once the model it needs exists.
        """
        schedule = self._async.components.get("curvature")
        return schedule.probe if isinstance(schedule, CurvatureSchedule) else None

    @curvature_probe.setter
    def curvature_probe(self, probe: Callable[[], Tensor] | None) -> None:
        if probe is None and "curvature" not in self._async.components:
            return
        self._curvature_schedule().probe = probe

    def estimate_curvature(self, loss_fn: Callable[[], Tensor] | None = None) -> float:
        """Estimate the largest curvature ``lambda_max`` now and hand it to the stability rule.

        :meth:`step` calls this every ``curvature_every`` updates when a ``curvature_probe``
        was given; call it yourself to choose when (e.g. on a fresh batch).

        Args:
            loss_fn: returns a scalar loss of the parameters with its graph (default: the
                ``curvature_probe``). Parameters and gradients are left untouched.

        Returns:
            The estimate of ``lambda_max``.
        """
        return self._curvature_schedule().estimate(loss_fn)

    def mark_read(self) -> None:
        """Note that the parameters were just read: the next gradient is computed from them."""
        self.tracker.mark_read()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset gradients and mark the parameters as read (see :meth:`mark_read`).

        Args:
            set_to_none: set gradients to ``None`` instead of zero, as in torch.
        """
        # Not torch's Optimizer.zero_grad: its first call imports torch._dynamo, seconds of CPU
        # in every freshly spawned Hogwild worker.
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()
        self.mark_read()

    # -- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        staleness: int | None = None,
        loss: float | Tensor | None = None,
        batch_size: int | None = None,
    ) -> Any:
        """Apply one update, retuning the momentum to the staleness of its gradient.

        Args:
            closure: re-evaluates the model and returns the loss; run first, with gradients on
                (Lightning tunes the momentum from inside it).
            staleness: updates applied since this gradient's parameters were read, if the
                caller knows it (a parameter server does); else it is measured from the clock.
            loss: the training loss of the batch this gradient comes from (a number or a
                one-element tensor), for a rule that watches it (``rule="auto"``: a loss that
                climbs tells an instability from noise); the closure's loss when not given.
                Ignored by the other rules; a non-finite loss is ignored.
            batch_size: the number of samples of that batch, for a rule that reads it
                (``rule="auto"``: the gradient of an epoch's short last batch is noise, not an
                instability). Ignored by the other rules.

        Returns:
            The closure's loss, or ``None``.
        """
        # Checked first: a bad staleness or loss changes nothing (no closure run, no tick).
        if staleness is not None:
            staleness = check_staleness(staleness)
        if loss is not None:
            check_loss(loss)
        if batch_size is not None:
            check_int(batch_size, "batch_size", 1)
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
            if loss is None and is_loss(closure_loss):
                loss = closure_loss
        self._async.last_step = SKIPPED
        self._async.last_step = self._apply_gradients(staleness, loss, batch_size)
        return closure_loss

    @property
    def last_step(self) -> StepReport:
        """What the latest :meth:`step` did: applied or skipped, with its staleness and version.

        Skipped: a NaN or inf gradient with ``nonfinite="skip"``, an inf found by AMP, or no
        gradient at all.
        """
        return self._async.last_step

    def _apply_gradients(
        self, staleness: int | None, loss: float | Tensor | None, batch_size: int | None
    ) -> StepReport:
        run = self._async
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item() != 0):
            return SKIPPED  # torch.amp.GradScaler found inf: this step is skipped, as torch does
        gathered = [self._gather(group) for group in self.param_groups]
        if not any(grads for _, grads, _ in gathered):
            return SKIPPED  # no gradient at all: nothing to apply, no update to count
        self._check_before_update(gathered)
        norms = any(component.reads_norms for component in run.components.values())
        checked = check_gradients(gathered, run.watch, norms=norms)
        bad = checked.nonfinite
        if bad is not None:
            if run.nonfinite == "skip":
                run.skipped_steps += 1
                return SKIPPED
            raise nonfinite_error(
                bad,
                "the step was refused and parameters, momentum buffers and the tracker are "
                "unchanged. Lower the learning rate, clip gradients, or pass nonfinite='skip' "
                "to drop such steps.",
            )
        if loss is not None and run.tracker.uses_loss:
            run.tracker.observe_loss(float(loss))  # a tensor is read only for such a rule
        if batch_size is not None and run.tracker.uses_batch_size:
            run.tracker.observe_batch_size(batch_size)
        for component in run.components.values():
            component.before_update(checked)
        # Claim this update's version atomically: the staleness is exact under concurrency.
        report = run.tracker.record_update(staleness)
        first_momentum = 0.0
        for index, (group, (params, grads, buffers)) in enumerate(
            zip(self.param_groups, gathered, strict=True)
        ):
            momentum = self.applied_momentum(group)
            if index == 0:
                first_momentum = momentum
            if params:
                self._update_group(group, momentum, params, grads, buffers)
        for component in run.components.values():
            component.after_update(report, first_momentum)
        return report

    def _check_before_update(
        self, gathered: list[tuple[list[Tensor], list[Tensor], list[Tensor | None]]]
    ) -> None:
        """What torch checks at ``step``: the fused kernel's devices and dtypes, AMP's scale."""
        grad_scale = getattr(self, "grad_scale", None)
        for group, (params, grads, _) in zip(self.param_groups, gathered, strict=True):
            if group["fused"]:
                updates.check_fused_support(params, grads)
            elif grad_scale is not None and grads:
                raise RuntimeError(
                    "a grad_scale was set (torch.amp.GradScaler) for a parameter group without "
                    "fused=True: only the fused kernel unscales; unscale the gradients first"
                )

    def _uses_buffer(self, group: dict[str, Any], momentum: float) -> bool:
        # A tuned group keeps its velocity even when the tuned momentum passes through zero.
        return momentum != 0 or (group["tune"] and group["momentum"] != 0)

    def _gather(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Any]]:
        params = [p for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        # Not self.state[p]: the defaultdict would leave an empty entry, which torch does not.
        states = list(map(self.state.get, params))
        buffers = [None if s is None else s.get("momentum_buffer") for s in states]
        return params, grads, buffers

    def _update_group(
        self,
        group: dict[str, Any],
        momentum: float,
        params: list[Tensor],
        grads: list[Tensor],
        buffers: list[Tensor | None],
    ) -> None:
        with_buffer = self._uses_buffer(group, momentum)
        hyper: dict[str, Any] = {
            "lr": _to_scalar(group["lr"]),
            "momentum": momentum,
            "dampening": float(group["dampening"]),
            "weight_decay": float(group["weight_decay"]),
            "nesterov": bool(group["nesterov"]),
            "maximize": bool(group["maximize"]),
            "with_buffer": with_buffer,
        }
        update = updates.choose_update(group, params, grads)
        grad_scale = getattr(self, "grad_scale", None)
        if update is updates.fused_update:
            if with_buffer and momentum == 0.0 and grad_scale is None:
                # The fused kernel leaves buffers alone at momentum 0; the others set buf = grad.
                update = updates.multi_tensor_update
            else:
                hyper["grad_scale"] = grad_scale
        if not with_buffer:
            update(params, grads, [None] * len(params), **hyper)
            return
        # Only buffers created by this update go into the state: the others are updated in place.
        fresh = [i for i, buf in enumerate(buffers) if buf is None]
        update(params, grads, buffers, **hyper)
        for i in fresh:
            self.state[params[i]]["momentum_buffer"] = buffers[i]

    # -- sharing and state --------------------------------------------------------------------

    def share_memory(self) -> AsyncMomentumSGD:
        """Put parameters, momentum buffers, clock and estimator in shared memory.

        After this, Hogwild processes that receive this optimizer at start-up share one global
        velocity and one staleness estimate (the paper's model has one ``w_t - w_{t-1}``, not one
        per worker). Buffers are created as zeros now, so the first update of a buffer is
        ``(1 - dampening) * grad`` rather than torch's ``grad`` (the same when dampening is 0).

        Returns:
            self.
        """
        for group in self.param_groups:
            with_buffer = self._uses_buffer(group, self.applied_momentum(group))
            for p in group["params"]:
                p.data.share_memory_()
                if with_buffer:
                    state = self.state[p]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                    state["momentum_buffer"].share_memory_()
        self.tracker.share_memory()
        return self

    def _async_state_dict(self) -> dict[str, Any]:
        """The ``"async_momentum"`` entry of :meth:`state_dict`."""
        run = self._async
        return {
            "format": STATE_FORMAT,
            "tracker": run.tracker.state_dict(),
            "skipped_steps": run.skipped_steps,
            "components": {name: c.state_dict() for name, c in run.components.items()},
        }

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can take ``state_dict``.

        Changes nothing. Checked: every group's hyper-parameters (as the constructor checks
        them); that groups and parameter ids match this optimizer's; every state entry belongs
        to a listed parameter and is a dict; every momentum buffer is a tensor of its
        parameter's shape, holds no NaN or inf, and has a dtype torch can load (any floating
        dtype for a floating parameter, which torch casts; exactly the parameter's dtype
        otherwise); and the ``"async_momentum"`` entry (tracker, counters, components).

        Args:
            state_dict: a dict returned by :meth:`state_dict` of an ``AsyncMomentumSGD``.
        """
        self._checked(state_dict)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a bad checkpoint raises and changes nothing.

        Everything is checked first (see :meth:`check_state_dict`), then loaded.

        Args:
            state_dict: a dict returned by :meth:`state_dict` of an ``AsyncMomentumSGD``.
        """
        torch_state, extra = self._checked(state_dict)
        super().load_state_dict(torch_state)
        run = self._async
        run.tracker.load_state_dict(extra["tracker"])
        run.skipped_steps = int(extra["skipped_steps"])
        saved_components = extra["components"]
        for name, component in run.components.items():
            if name in saved_components:
                component.load_state_dict(saved_components[name])
        meter = run.components.get("meter")
        if isinstance(meter, MeterComponent):
            meter.feed()

    def _checked(self, state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check ``state_dict`` whole; return torch's part and ours."""
        state_dict, extra = _upgraded(state_dict)
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list):
            raise ValueError("this state_dict has no list of 'param_groups'")
        for index, saved in enumerate(groups):
            if not isinstance(saved, dict):
                raise ValueError(f"param group {index} of this state_dict is not a dict")
            merged = {**_GROUP_DEFAULTS, **self.defaults, **saved}
            try:
                _check_group(merged)
            except (ValueError, RuntimeError) as error:
                raise ValueError(f"param group {index} of this state_dict: {error}") from None
        torch_state = {k: v for k, v in state_dict.items() if k != _STATE_KEY}
        # Buffers of another shape would corrupt memory in the fused kernel; NaN would reach
        # the parameters at the next step.
        check_optimizer_state(self, torch_state, exact=("momentum_buffer",), check_groups=False)
        self._check_async_state(extra)
        return torch_state, extra

    def _check_async_state(self, extra: dict[str, Any]) -> None:
        """Check the ``"async_momentum"`` entry without changing anything."""
        missing = [key for key in ("tracker", "skipped_steps") if key not in extra]
        if missing:
            raise ValueError(f"the {_STATE_KEY!r} entry of this state_dict lacks {missing}")
        components = extra.get("components")
        if not isinstance(components, dict):
            raise ValueError(
                f"the {_STATE_KEY!r} entry of this state_dict has no 'components' dict, got "
                f"{components!r}"
            )
        try:
            self.tracker.check_state_dict(extra["tracker"])
            check_int(extra["skipped_steps"], "skipped_steps", 0, maximum=MAX_COUNT)
            for name, component in self._async.components.items():
                if name in components:
                    component.check_state_dict(components[name])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"the {_STATE_KEY!r} entry of this state_dict is corrupt: {error}"
            ) from None


def _add_async_state(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    state_dict[_STATE_KEY] = optimizer._async_state_dict()  # type: ignore[attr-defined]
    return state_dict


def _upgraded(state_dict: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state dict in the current format, and its ``"async_momentum"`` entry.

    Raises ``ValueError`` for one that is not ours.
    """
    extra = state_dict.get(_STATE_KEY) if isinstance(state_dict, dict) else None
    if extra is None:
        raise ValueError(
            f"this state_dict has no {_STATE_KEY!r} entry: it was not written by "
            "AsyncMomentumSGD (a torch.optim.SGD checkpoint?). Load it into torch.optim.SGD, "
            "or start AsyncMomentumSGD afresh and copy only the momentum buffers."
        )
    found = extra.get("format") if isinstance(extra, dict) else type(extra).__name__
    if found == STATE_FORMAT:
        return state_dict, extra
    if found == 2:
        return _upgraded_from_2(state_dict, extra)
    if found != 1:
        raise ValueError(
            f"{_STATE_KEY} state has format {found!r}, but this version of asyncmomentum "
            f"reads formats 1 to {STATE_FORMAT}; load the checkpoint with the version that "
            "wrote it"
        )
    # Format 1: a group was tuned toward 'target_momentum', or fixed at 'momentum' when the
    # target was None; the meter and the curvature schedule had entries of their own.
    groups = []
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list):
        raise ValueError("this format-1 state_dict has no list of 'param_groups'")
    for index, group in enumerate(saved_groups):
        if not isinstance(group, dict) or "target_momentum" not in group:
            raise ValueError(f"param group {index} of this format-1 state_dict is corrupt")
        group = dict(group)
        target = group.pop("target_momentum")
        group["tune"] = target is not None
        if target is not None:
            group["momentum"] = target
        groups.append(group)
    components = {}
    if extra.get("meter") is not None:
        components["meter"] = extra["meter"]
    components["curvature"] = {"version": extra.get("curvature_version")}
    upgraded = {**extra, "format": 2, "components": components}
    return _upgraded_from_2({**state_dict, "param_groups": groups}, upgraded)


def _upgraded_from_2(
    state_dict: dict[str, Any], extra: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Format 2 kept clock, tuner and counters side by side; format 3 has one tracker entry."""
    tuner = extra.get("tuner")
    if not isinstance(tuner, dict) or "clock" not in extra:
        raise ValueError(f"the {_STATE_KEY!r} entry of this format-2 state_dict is corrupt")
    tracker = {
        **tuner,
        "format": TRACKER_STATE_FORMAT,
        "clock": extra["clock"],
        "version_read": extra.get("version_read", 0),
        "last_staleness": extra.get("last_staleness", 0),
    }
    upgraded = {
        "format": STATE_FORMAT,
        "tracker": tracker,
        "skipped_steps": extra.get("skipped_steps", 0),
        "components": extra.get("components", {}),
    }
    return {**state_dict, _STATE_KEY: upgraded}, upgraded


def _check_group(group: dict[str, Any]) -> None:
    """Check one parameter group's hyper-parameters as torch's SGD does, with clearer words."""
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    # The type first (bools and strings refused), then the range with torch's own words.
    lr_value = check_real(lr, "lr", finite=False, allow_tensor=True)
    if not (lr_value >= 0.0 and math.isfinite(lr_value)):
        raise ValueError(f"Invalid learning rate: {lr_value} (lr must be a finite number >= 0)")
    momentum = check_momentum(
        check_real(group["momentum"], "momentum", finite=False, allow_tensor=True), "momentum"
    )
    weight_decay = check_real(
        group["weight_decay"], "weight_decay", finite=False, allow_tensor=True
    )
    if not (weight_decay >= 0.0 and math.isfinite(weight_decay)):
        raise ValueError(
            f"Invalid weight_decay value: {weight_decay} (weight_decay must be finite and >= 0)"
        )
    dampening = check_real(group["dampening"], "dampening", finite=False, allow_tensor=True)
    if not 0.0 <= dampening <= 1.0:
        raise ValueError(f"Invalid dampening value: {dampening} (dampening must lie in [0, 1])")
    for flag in ("nesterov", "maximize", "differentiable", "tune"):
        check_bool(group[flag], flag)
    for flag in ("foreach", "fused"):
        if group[flag] is not None and not isinstance(group[flag], bool):
            raise ValueError(f"{flag} must be True, False or None, got {group[flag]!r}")
    if group["nesterov"] and (momentum <= 0 or dampening != 0):
        raise ValueError(
            "Nesterov momentum requires a momentum and zero dampening: nesterov=True needs "
            f"momentum > 0 and dampening == 0, got momentum={momentum}, dampening={dampening}"
        )
    if group["differentiable"]:
        raise ValueError(
            "differentiable=True is not supported by AsyncMomentumSGD: its momentum is retuned "
            "from measured staleness, which autograd cannot differentiate through. Use "
            "torch.optim.SGD(differentiable=True) for a differentiable optimizer step."
        )
    if group["fused"] and group["foreach"]:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def _to_scalar(value: float | Tensor) -> float:
    return value.item() if isinstance(value, Tensor) else float(value)
