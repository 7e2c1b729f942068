"""AsyncMomentumSGD: SGD whose momentum is retuned to the asynchrony it measures."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from asyncmomentum.core.measuring.meter import MomentumMeter
from asyncmomentum.core.measuring.staleness import StalenessEstimator, VersionClock, check_staleness
from asyncmomentum.core.tuning import formulas
from asyncmomentum.core.tuning.stability import CurvatureEstimator
from asyncmomentum.core.tuning.tuner import MomentumTuner

__all__ = ["AsyncMomentumSGD", "NonFiniteGradientError"]

#: Version of the ``"async_momentum"`` entry of :meth:`AsyncMomentumSGD.state_dict`.
STATE_FORMAT = 1
_STATE_KEY = "async_momentum"

# The foreach path works on buckets of about this many bytes per tensor list, so that the few
# passes it makes over a bucket (buffer scale, buffer add, parameter add) hit the CPU cache.
# Measured on a 2-core x86 CPU with a ResNet-18 parameter list: 5.2 ms per step in 2 MiB
# buckets, 6.5 ms in one bucket.
_FOREACH_BUCKET_BYTES = 2 << 20

try:  # Where torch ships a fused SGD kernel.
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    _FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())
except ImportError:  # pragma: no cover - older torch
    _FUSED_DEVICES = frozenset({"cpu", "cuda"})


class NonFiniteGradientError(RuntimeError):
    """A gradient held NaN or inf; the step was refused and nothing was changed."""


class AsyncMomentumSGD(Optimizer):
    r"""SGD with momentum tuned to the asynchrony it runs under.

    A drop-in for :class:`torch.optim.SGD`. Asynchronous training (Hogwild, parameter servers,
    delayed gradients) adds an *implicit* momentum ``1 - 1/M`` for ``M`` asynchronous workers
    (Mitliagkas et al., 2016). This optimizer measures the staleness of every gradient it applies,
    estimates ``M`` from it and applies the *algorithmic* momentum that brings the total to
    ``target_momentum``: ``target - (1 - 1/M)`` by default, negative under high asynchrony.

    Staleness is measured with a version clock: :meth:`zero_grad` (which a training loop calls
    right before the forward pass) notes the version the next gradient is computed from, and
    :meth:`step` takes the difference. Systems that know the staleness pass
    ``step(staleness=tau)``. Without :meth:`zero_grad` (or :meth:`mark_read`), staleness is
    counted from this optimizer's own previous step.

    The update is the one of :class:`torch.optim.SGD` (heavy ball, optionally Nesterov, with
    dampening, weight decay and ``maximize``); with a fixed ``momentum`` and no asynchrony it
    reproduces :class:`torch.optim.SGD` step for step, and it also accepts negative momentum.

    Args:
        params: iterable of parameters or of dicts defining parameter groups; a group may set
            any argument below that has a per-group meaning (``lr``, ``target_momentum``,
            ``momentum``, ``dampening``, ``weight_decay``, ``nesterov``, ``maximize``,
            ``foreach``, ``fused``).
        lr: learning rate (float or 1-element tensor), >= 0.
        target_momentum: total momentum (algorithmic + implicit) to aim for, in (-1, 1).
        momentum: if given, a fixed algorithmic momentum in (-1, 1): tuning is off and this is
            a plain SGD that also accepts negative momentum. Staleness is still measured.
        dampening: dampening of the momentum buffer, as in :class:`torch.optim.SGD`.
        weight_decay: L2 penalty, >= 0.
        nesterov: Nesterov momentum. A fixed momentum must then be > 0 and dampening 0.
        maximize: maximize the objective instead of minimizing it.
        foreach: ``True`` for the multi-tensor path (torch's fused multi-tensor kernel where the
            device and dtype have it, else ``torch._foreach_*`` ops on cache-sized buckets),
            ``False`` for the per-tensor loop, ``None`` to choose (see ``fused``).
        fused: ``True`` for torch's fused SGD kernel. When both ``foreach`` and ``fused`` are
            ``None`` the fused kernel is used where the device and dtype have it (the fastest
            path), else foreach on accelerators and the per-tensor loop otherwise.
        rule: how the algorithmic momentum is set (see
        :class:`~asyncmomentum.core.tuning.tuner.MomentumTuner`):
            ``"additive"`` (``target - (1 - 1/M)``, the default), ``"compositional"``,
            ``"closed_loop"`` (the additive rule corrected by feedback from the momentum meter,
            which it switches on) or ``"stability"`` (the largest momentum the delayed heavy ball
            tolerates for the observed staleness histogram and ``lr * lambda_max``; needs a
            ``curvature_probe`` or calls to :meth:`estimate_curvature`).
        momentum_bounds: ``(low, high)`` clip range of the tuned momentum, inside (-1, 1).
        workers: known number of asynchronous workers; skips estimation.
        horizon: span, in updates, of the staleness moving average (see
            :class:`~asyncmomentum.core.measuring.staleness.StalenessEstimator`).
        warmup: observations before the estimate leaves ``M = 1``.
        nonfinite: what a NaN or inf gradient does: ``"raise"`` a
            :class:`NonFiniteGradientError` or ``"skip"`` the step (counted in
            :attr:`skipped_steps`). Either way parameters, buffers, clock and tuner are untouched.
        measure_momentum: run a :class:`~asyncmomentum.core.measuring.meter.MomentumMeter` that
        measures the
            total momentum from the trajectory (see :attr:`measured_total_momentum`): about
            0.25 ms per step and a fit every 256 steps on 11.7M parameters (it samples 512
            coordinates). It needs one process to see every update in order (a simulator, a
            parameter server, Lightning): not Hogwild workers. ``rule="closed_loop"`` turns it on.
        meter_options: keyword arguments of the
        :class:`~asyncmomentum.core.measuring.meter.MomentumMeter`
            (e.g. ``refresh``, the updates between readings, which the closed loop acts on).
        rule_options: keyword arguments of the feedback rule (``"closed_loop"``:
            :class:`~asyncmomentum.core.measuring.meter.ClosedLoopController`, e.g. ``gain``;
            ``"stability"``:
            :class:`~asyncmomentum.core.tuning.stability.StabilityRule`, e.g. ``curvature_margin``).
        curvature_probe: for ``rule="stability"``: a callable with no arguments that returns a
            scalar loss of the current parameters with its graph (a forward pass on a probe
            batch, no ``backward``). Every ``curvature_every`` updates, :meth:`step` runs a few
            Hessian-vector products on it (a
            :class:`~asyncmomentum.core.tuning.stability.CurvatureEstimator`)
            to estimate ``lambda_max``. Gradients and parameters are left alone.
        curvature_every: updates between curvature estimates (>= 1).

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = AsyncMomentumSGD(model.parameters(), lr=0.05, target_momentum=0.9)
        >>> opt.zero_grad()
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> _ = opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        target_momentum: float = 0.9,
        *,
        momentum: float | None = None,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        rule: str = "additive",
        momentum_bounds: tuple[float, float] = formulas.DEFAULT_MOMENTUM_BOUNDS,
        workers: float | None = None,
        horizon: int = 1000,
        warmup: int = 20,
        nonfinite: Literal["raise", "skip"] = "raise",
        measure_momentum: bool = False,
        meter_options: dict[str, Any] | None = None,
        rule_options: dict[str, Any] | None = None,
        curvature_probe: Callable[[], Tensor] | None = None,
        curvature_every: int = 100,
    ) -> None:
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if (
            isinstance(curvature_every, bool)
            or not isinstance(curvature_every, int)
            or curvature_every < 1
        ):
            raise ValueError(f"curvature_every must be an integer >= 1, got {curvature_every!r}")
        # The tuner exists before the groups: adding a group sets its first momentum from it.
        self.nonfinite = nonfinite
        self._clock = VersionClock()
        # The tuner's own target is unused: every group carries its target_momentum.
        self._tuner_options: dict[str, Any] = {
            "rule": rule,
            "momentum_bounds": momentum_bounds,
            "workers": workers,
            "horizon": horizon,
            "warmup": warmup,
            "rule_options": rule_options,
        }
        self._tuner = MomentumTuner(**self._tuner_options)
        self._curvature_probe: Callable[[], Tensor] | None = None
        self.curvature_probe = curvature_probe
        self.curvature_every = curvature_every
        self._curvature_estimator: CurvatureEstimator | None = None
        self._curvature_version: int | None = None  # clock value at the last estimate
        self._warned_no_curvature = False
        self._version_read = 0
        self._last_staleness = 0
        self._skipped_steps = 0
        defaults = {
            "lr": lr,
            "target_momentum": None if momentum is not None else target_momentum,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)
        # The closed loop feeds on the meter's readings.
        measured = measure_momentum or self._tuner.rule == "closed_loop"
        self._meter = None
        if measured:
            options = {"rule": rule, **(meter_options or {})}
            try:
                self._meter = MomentumMeter(self.param_groups, **options)
            except TypeError as error:
                raise ValueError(f"meter_options: {error}") from None
        elif meter_options:
            raise ValueError("meter_options need measure_momentum=True (or rule='closed_loop')")

    # -- groups -------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; its ``momentum`` fixes it, its ``target_momentum`` tunes it.

        Args:
            param_group: a dict with ``params`` and any per-group option.
        """
        fixed, target = param_group.get("momentum"), param_group.get("target_momentum")
        if fixed is not None and target is not None:
            raise ValueError(
                "a parameter group takes either momentum (fixed, no tuning) or target_momentum "
                f"(tuned), not both; got momentum={fixed!r}, target_momentum={target!r}"
            )
        if fixed is not None:
            param_group["target_momentum"] = None
        elif target is not None:
            param_group["momentum"] = None
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except ValueError:
            self.param_groups.pop()
            raise
        if group["target_momentum"] is not None:
            group["momentum"] = self._tuned_momentum(group)

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError(f"lr as a tensor must have exactly 1 element, got shape {lr.shape}")
        if not float(lr) >= 0.0:
            raise ValueError(f"lr must be >= 0, got {float(lr)!r}")
        if not float(group["weight_decay"]) >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']!r}")
        if not 0.0 <= float(group["dampening"]) <= 1.0:
            raise ValueError(f"dampening must lie in [0, 1], got {group['dampening']!r}")
        if group["target_momentum"] is not None:
            group["target_momentum"] = formulas.check_momentum(group["target_momentum"])
        elif group["momentum"] is None:
            raise ValueError("give target_momentum (tuned) or momentum (fixed); both are None")
        else:
            group["momentum"] = formulas.check_momentum(group["momentum"], "momentum")
        if group["nesterov"]:
            if group["dampening"] != 0:
                raise ValueError(
                    f"nesterov requires dampening=0, got dampening={group['dampening']!r}"
                )
            if group["target_momentum"] is None and group["momentum"] <= 0:
                raise ValueError(
                    f"nesterov requires a momentum > 0, got momentum={group['momentum']!r}; "
                    "drop nesterov or use a positive momentum"
                )
        if group["fused"] and group["foreach"]:
            raise ValueError("fused=True and foreach=True cannot be used together; pick one")
        if group["fused"]:
            for p in group["params"]:
                if not (p.is_floating_point() and p.device.type in _FUSED_DEVICES):
                    raise ValueError(
                        "fused=True needs floating-point parameters on one of "
                        f"{sorted(_FUSED_DEVICES)}, got {p.dtype} on {p.device}"
                    )

    # -- what the tuner sees ------------------------------------------------------------------

    @property
    def clock(self) -> VersionClock:
        """The version clock this optimizer bumps at every applied update."""
        return self._clock

    @property
    def tuner(self) -> MomentumTuner:
        """The tuner that turns measured staleness into this optimizer's momentum."""
        return self._tuner

    @property
    def estimator(self) -> StalenessEstimator:
        """The staleness estimator this optimizer feeds."""
        return self._tuner.estimator

    @property
    def rule(self) -> str:
        """The tuning rule's name."""
        return self._tuner.rule

    @property
    def momentum_bounds(self) -> tuple[float, float]:
        """Clip range of the tuned momentum."""
        return self._tuner.momentum_bounds

    @property
    def implicit_momentum(self) -> float:
        """Implicit momentum ``1 - 1/M_hat`` of the measured asynchrony."""
        return self._tuner.estimator.implicit_momentum

    @property
    def algorithmic_momentum(self) -> float:
        """Momentum the first parameter group applies (tuned or fixed).

        A tuned group's value comes from the tuner, so it is current also in a process that
        shares the estimate with Hogwild workers but did not step itself.
        """
        group = self.param_groups[0]
        if group["target_momentum"] is None:
            return float(group["momentum"])
        return self._tuned_momentum(group)

    def _tuned_momentum(self, group: dict[str, Any]) -> float:
        return self._tuner.algorithmic_momentum(
            group["target_momentum"], lr=_to_scalar(group["lr"])
        )

    @property
    def total_momentum(self) -> float:
        """Algorithmic and implicit momentum composed under :attr:`rule`, for the first group."""
        return self._tuner.total_momentum(self.algorithmic_momentum)

    @property
    def estimated_workers(self) -> float:
        """``M_hat``, the estimated number of asynchronous workers."""
        return self._tuner.estimator.estimated_workers

    @property
    def staleness_mean(self) -> float:
        """Moving average of the staleness of applied gradients."""
        return self._tuner.estimator.mean

    @property
    def last_staleness(self) -> int:
        """Staleness of the most recently applied gradient."""
        return self._last_staleness

    @property
    def measured_total_momentum(self) -> float | None:
        """Total momentum measured from the trajectory by the momentum meter.

        ``None`` without ``measure_momentum=True`` or before the meter has enough updates. With no
        asynchrony it reads the algorithmic momentum; under asynchrony, algorithmic plus
        implicit (see ``docs/momentum-meter.md`` for the derivation and its limits).
        """
        return None if self._meter is None else self._meter.measured_total_momentum

    @property
    def curvature_probe(self) -> Callable[[], Tensor] | None:
        """The loss :meth:`step` estimates the curvature on (``rule="stability"``); settable,
        e.g. once the model it needs exists."""
        return self._curvature_probe

    @curvature_probe.setter
    def curvature_probe(self, probe: Callable[[], Tensor] | None) -> None:
        if probe is not None and not callable(probe):
            raise ValueError(f"curvature_probe must be a callable, got {probe!r}")
        if probe is not None and self._tuner.rule != "stability":
            raise ValueError(
                "curvature_probe is used by rule='stability' only; "
                f"this optimizer's rule is {self._tuner.rule!r}"
            )
        self._curvature_probe = probe

    @property
    def meter(self) -> MomentumMeter | None:
        """The momentum meter (with ``measure_momentum=True`` or ``rule="closed_loop"``)."""
        return self._meter

    @property
    def curvature(self) -> float | None:
        """``lambda_max`` the stability rule works with (``None`` for other rules, or before
        the first estimate)."""
        return self._tuner.curvature

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (with ``nonfinite="skip"``)."""
        return self._skipped_steps

    def estimate_curvature(self, loss_fn: Callable[[], Tensor] | None = None) -> float:
        """Estimate the largest curvature ``lambda_max`` now and hand it to the stability rule.

        :meth:`step` calls this every ``curvature_every`` updates when a ``curvature_probe``
        was given; call it yourself to choose when (e.g. on a fresh batch).

        Args:
            loss_fn: returns a scalar loss of the parameters with its graph (default: the
                ``curvature_probe``). Parameters and gradients are left untouched.

        Returns:
            The estimate of ``lambda_max`` (the largest of the estimator's recent ones).
        """
        if self._tuner.rule != "stability":
            raise ValueError(
                f"estimate_curvature feeds rule='stability'; this optimizer's rule is "
                f"{self._tuner.rule!r}"
            )
        loss_fn = loss_fn or self._curvature_probe
        if loss_fn is None:
            raise ValueError(
                "estimate_curvature needs a loss_fn, or a curvature_probe at construction"
            )
        if self._curvature_estimator is None:
            params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
            self._curvature_estimator = CurvatureEstimator(params, history=1)
        self._curvature_estimator.estimate(loss_fn)
        value = self._curvature_estimator.value
        assert value is not None
        self._tuner.observe_curvature(value)
        self._curvature_version = self._clock.value
        return value

    def _curvature_due(self) -> bool:
        if self._tuner.rule != "stability":
            return False
        if self._curvature_probe is None:
            if self._tuner.curvature is None and not self._warned_no_curvature:
                self._warned_no_curvature = True
                warnings.warn(
                    "rule='stability' has no curvature yet and no curvature_probe: it follows the "
                    "additive rule until estimate_curvature() is called",
                    stacklevel=3,
                )
            return False
        return (
            self._curvature_version is None
            or self._tuner.curvature is None
            or self._clock.value - self._curvature_version >= self.curvature_every
        )

    def mark_read(self) -> None:
        """Note that the parameters were just read: the next gradient is computed from them."""
        self._version_read = self._clock.value

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
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, *, staleness: int | None = None
    ) -> Any:
        """Apply one update, retuning the momentum to the staleness of its gradient.

        Args:
            closure: re-evaluates the model and returns the loss; run first, with gradients on
                (Lightning tunes the momentum from inside it).
            staleness: updates applied since this gradient's parameters were read, if the
                caller knows it (a parameter server does); else it is measured from the clock.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if staleness is not None:
            staleness = check_staleness(staleness)

        gathered = [self._gather(group) for group in self.param_groups]
        bad = _first_nonfinite(gathered)
        if bad is not None:
            if self.nonfinite == "skip":
                self._skipped_steps += 1
                return loss
            group_index, index, shape = bad
            raise NonFiniteGradientError(
                f"the gradient of parameter {index} (shape {tuple(shape)}) in param group "
                f"{group_index} holds NaN or inf; the step was refused and parameters, momentum "
                "buffers and the staleness tuner are unchanged. Lower the learning rate, clip "
                "gradients, or pass nonfinite='skip' to drop such steps."
            )

        if self._curvature_due():
            # Before the update and before the clock moves: if the probe raises, nothing changed.
            self.estimate_curvature()

        # Claim this update's version atomically: the staleness is exact under concurrency.
        version = self._clock.tick()
        tau = staleness if staleness is not None else max(version - self._version_read, 0)
        self._tuner.observe(tau)
        self._last_staleness = tau

        for group, (params, grads, buffers) in zip(self.param_groups, gathered):
            if group["target_momentum"] is not None:
                group["momentum"] = self._tuned_momentum(group)
            if params:
                self._update_group(group, params, grads, buffers)
        if self._meter is not None:
            # The gradient was computed at version - tau: the meter attributes it there. A
            # staleness reported beyond the start of this optimizer's clock (a caller's own
            # count, a resumed job) dates the gradient to the oldest version there is.
            self._meter.record(version, max(version - tau, 0))
            if self._tuner.rule == "closed_loop":
                self._tuner.observe_reading(self._meter.reading)
        self._version_read = version + 1
        return loss

    def _uses_buffer(self, group: dict[str, Any]) -> bool:
        # A tuned group keeps its velocity even when the tuned momentum passes through zero.
        return group["target_momentum"] is not None or group["momentum"] != 0

    def _gather(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Any]]:
        params, grads, buffers = [], [], []
        with_buffer = self._uses_buffer(group)
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            buffers.append(self.state[p].get("momentum_buffer") if with_buffer else None)
        return params, grads, buffers

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        buffers: list[Tensor | None],
    ) -> None:
        with_buffer = self._uses_buffer(group)
        hyper = {
            "lr": _to_scalar(group["lr"]),
            "momentum": float(group["momentum"]),
            "dampening": float(group["dampening"]),
            "weight_decay": float(group["weight_decay"]),
            "nesterov": bool(group["nesterov"]),
            "maximize": bool(group["maximize"]),
            "with_buffer": with_buffer,
        }
        update = _choose_update(group, params, grads)
        if update is _fused_update and with_buffer and hyper["momentum"] == 0.0:
            # The fused kernel leaves buffers alone at momentum 0; the other paths set buf = grad.
            update = _multi_tensor_update
        update(params, grads, buffers, **hyper)
        if with_buffer:
            for p, buf in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buf

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
            for p in group["params"]:
                p.data.share_memory_()
                if self._uses_buffer(group):
                    state = self.state[p]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                    state["momentum_buffer"].share_memory_()
        self._clock.share_memory()
        self._tuner.share_memory()
        return self

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus an ``"async_momentum"`` entry with the tuner's state."""
        state = super().state_dict()
        state[_STATE_KEY] = {
            "format": STATE_FORMAT,
            "clock": self._clock.state_dict(),
            "tuner": self._tuner.state_dict(),
            "version_read": self._version_read,
            "last_staleness": self._last_staleness,
            "skipped_steps": self._skipped_steps,
            "meter": None if self._meter is None else self._meter.state_dict(),
            "curvature_version": self._curvature_version,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a bad checkpoint raises and changes nothing.

        Args:
            state_dict: a dict returned by :meth:`state_dict` of an ``AsyncMomentumSGD``.
        """
        extra = state_dict.get(_STATE_KEY) if isinstance(state_dict, dict) else None
        if extra is None:
            raise ValueError(
                f"this state_dict has no {_STATE_KEY!r} entry: it was not written by "
                "AsyncMomentumSGD (a torch.optim.SGD checkpoint?). Load it into torch.optim.SGD, "
                "or start AsyncMomentumSGD afresh and copy only the momentum buffers."
            )
        if not isinstance(extra, dict) or extra.get("format") != STATE_FORMAT:
            found = extra.get("format") if isinstance(extra, dict) else type(extra).__name__
            raise ValueError(
                f"{_STATE_KEY} state has format {found!r}, but this version of asyncmomentum "
                f"reads format {STATE_FORMAT}; load the checkpoint with the version that wrote it"
            )
        for i, group in enumerate(state_dict.get("param_groups", [])):
            if "target_momentum" not in group:
                raise ValueError(f"param group {i} of this state_dict has no 'target_momentum'")
        # Validate the tuner state on throwaway objects before touching our own.
        VersionClock().load_state_dict(extra["clock"])
        MomentumTuner(**self._tuner_options).load_state_dict(extra["tuner"])
        if self._meter is not None and extra.get("meter") is not None:
            self._meter.check_state_dict(extra["meter"])
        torch_state = {k: v for k, v in state_dict.items() if k != _STATE_KEY}
        super().load_state_dict(torch_state)
        self._clock.load_state_dict(extra["clock"])
        self._tuner.load_state_dict(extra["tuner"])
        self._version_read = int(extra["version_read"])
        self._last_staleness = int(extra["last_staleness"])
        self._skipped_steps = int(extra["skipped_steps"])
        if self._meter is not None and extra.get("meter") is not None:
            self._meter.load_state_dict(extra["meter"])
        if self._meter is not None and self._tuner.rule == "closed_loop":
            self._tuner.observe_reading(self._meter.reading)
        curvature_version = extra.get("curvature_version")
        self._curvature_version = None if curvature_version is None else int(curvature_version)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in (
            "nonfinite",
            "_clock",
            "_tuner",
            "_version_read",
            "_last_staleness",
            "_skipped_steps",
            "_meter",
            "_tuner_options",
            "_curvature_probe",
            "curvature_every",
            "_curvature_estimator",
            "_curvature_version",
            "_warned_no_curvature",
        ):
            state[name] = self.__dict__[name]
        return state


# -- the update, three ways ---------------------------------------------------------------------


def _to_scalar(value: float | Tensor) -> float:
    return value.item() if isinstance(value, Tensor) else float(value)


# Below this many elements per device and dtype, the gradients are checked with torch's fused
# AMP check (one kernel, ~4 us for a small CNN, against ~19 us for a sum per tensor); above it, a
# sum per tensor only reads the data and wins (1.3 ms against 2.1 ms for 11.7M elements).
_FUSED_CHECK_MAX_ELEMENTS = 1 << 20


def _all_finite(grads: list[Tensor]) -> bool:
    """Whether no gradient holds NaN or inf (cheap; a ``False`` is confirmed by the caller)."""
    kinds: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for g in grads:
        kinds[(g.device, g.dtype)].append(g._values() if g.is_sparse else g)
    for (device, _), same in kinds.items():
        if sum(g.numel() for g in same) <= _FUSED_CHECK_MAX_ELEMENTS:
            found = torch.zeros(1, device=device)
            try:
                # Multiplies by exactly 1 (a no-op on every value) and flags any non-finite one.
                torch._amp_foreach_non_finite_check_and_unscale_(
                    same, found, torch.ones(1, device=device)
                )
            except (RuntimeError, NotImplementedError):  # a dtype or layout it lacks
                pass
            else:
                if found.item() != 0:
                    return False
                continue
        if not bool(torch.isfinite(torch.stack([g.sum() for g in same])).all()):
            return False
    return True


def _first_nonfinite(
    gathered: Sequence[tuple[list[Tensor], list[Tensor], list[Any]]],
) -> tuple[int, int, torch.Size] | None:
    """Where the first NaN/inf gradient is, or ``None``: one cheap pass, then an exact one."""
    if _all_finite([g for _, grads, _ in gathered for g in grads]):
        return None
    # A non-finite sum may come from finite values that overflow: confirm value by value.
    for group_index, (params, grads, _) in enumerate(gathered):
        for index, g in enumerate(grads):
            values = g._values() if g.is_sparse else g
            if not bool(torch.isfinite(values).all()):
                return group_index, index, params[index].shape
    return None


def _choose_update(group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> Callable:
    if any(g.is_sparse for g in grads):
        return _single_tensor_update
    if group["fused"]:
        return _fused_update
    fusable = all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params)
    if group["foreach"] is False:
        return _single_tensor_update
    if group["foreach"]:
        # The multi-tensor path: torch's fused multi-tensor kernel where the device and dtype
        # have it (one pass over memory, where the _foreach ops make three), else those ops.
        return _fused_update if fusable else _multi_tensor_update
    if fusable:
        return _fused_update
    return _multi_tensor_update if params[0].device.type != "cpu" else _single_tensor_update


def _single_tensor_update(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    with_buffer: bool,
) -> None:
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if with_buffer:
            buf = buffers[i]
            if buf is None:
                buf = buffers[i] = torch.clone(grad).detach()
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(grad, alpha=-lr)


def _buckets(tensors: list[Tensor], indices: list[int]) -> Iterable[list[int]]:
    bucket: list[int] = []
    size = 0
    for i in indices:
        bucket.append(i)
        size += tensors[i].numel() * tensors[i].element_size()
        if size >= _FOREACH_BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _by_device_and_dtype(params: list[Tensor]) -> list[list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype)].append(i)
    return list(groups.values())


def _multi_tensor_update(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    with_buffer: bool,
) -> None:
    for same_kind in _by_device_and_dtype(params):
        for bucket in _buckets(params, same_kind):
            ps = [params[i] for i in bucket]
            gs = [grads[i] for i in bucket]
            if maximize:
                gs = torch._foreach_neg(gs)
            if weight_decay != 0:
                gs = torch._foreach_add(gs, ps, alpha=weight_decay)
            if with_buffer:
                fresh = {i for i in bucket if buffers[i] is None}
                running, running_grads = [], []
                for i, g in zip(bucket, gs):
                    if i in fresh:
                        buffers[i] = torch.clone(g).detach()
                    else:
                        running.append(buffers[i])
                        running_grads.append(g)
                if running:
                    torch._foreach_mul_(running, momentum)
                    torch._foreach_add_(running, running_grads, alpha=1 - dampening)
                bufs = [buffers[i] for i in bucket]
                gs = torch._foreach_add(gs, bufs, alpha=momentum) if nesterov else bufs
            torch._foreach_add_(ps, gs, alpha=-lr)


def _fused_update(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    with_buffer: bool,
) -> None:
    kernel_args = {
        "weight_decay": weight_decay,
        "momentum": momentum if with_buffer else 0.0,
        "lr": lr,
        "dampening": dampening,
        "nesterov": nesterov,
        "maximize": maximize,
    }
    for same_kind in _by_device_and_dtype(params):
        if not with_buffer:
            torch._fused_sgd_(
                [params[i] for i in same_kind],
                [grads[i] for i in same_kind],
                [],
                is_first_step=False,
                **kernel_args,
            )
            continue
        # The kernel's first step sets buf = grad; later steps scale and add.
        fresh = [i for i in same_kind if buffers[i] is None]
        running = [i for i in same_kind if buffers[i] is not None]
        for i in fresh:
            buffers[i] = torch.empty_like(grads[i])
        for first, chosen in ((True, fresh), (False, running)):
            if chosen:
                torch._fused_sgd_(
                    [params[i] for i in chosen],
                    [grads[i] for i in chosen],
                    [buffers[i] for i in chosen],
                    is_first_step=first,
                    **kernel_args,
                )
