"""Parts that ride along the updates of an AsyncMomentumSGD.

The momentum meter, the curvature schedule of the stability rule, and the gradient-norm feed
of the auto rule.

The optimizer's ``step`` knows one small interface, :class:`StepComponent`, and calls every
attached component before and after an update; it holds no branch for any of them. A component
sees the parameter groups and the :class:`~asyncmomentum.core.tracker.AsynchronyTracker`, never
the optimizer. Each carries its own state in the optimizer's ``state_dict`` under its
:attr:`name`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor

from asyncmomentum.core.finite_gradients import GradientCheck
from asyncmomentum.core.measuring.curvature import CurvatureEstimator
from asyncmomentum.core.measuring.instability import squared_norm, sum_on_host
from asyncmomentum.core.measuring.meter import MomentumMeter
from asyncmomentum.core.tracker import AsynchronyTracker, StepReport
from asyncmomentum.core.validation import check_int

#: An optimizer's ``param_groups``.
ParamGroups = list[dict[str, Any]]

__all__ = ["CurvatureSchedule", "GradientNormFeed", "MeterComponent", "StepComponent"]


class StepComponent:
    """Something attached to an :class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD`.

    It sees every update of the optimizer's parameter groups, and its tracker. The defaults do
    nothing; a component overrides what it needs.

    Args:
        param_groups: the optimizer's parameter groups.
        tracker: the optimizer's tracker.
    """

    #: Key of this component's entry in the optimizer's state dict.
    name: str = "component"
    #: Whether :meth:`before_update` reads the gradients' squared norms from the NaN check
    #: (:attr:`~asyncmomentum.core.finite_gradients.GradientCheck.squared_norm_parts`), which
    #: the check then collects.
    reads_norms: bool = False

    def __init__(self, param_groups: ParamGroups, tracker: AsynchronyTracker) -> None:
        self.param_groups = param_groups
        self.tracker = tracker

    def before_update(self, checked: GradientCheck) -> None:
        """Called once the gradients are known to be finite, before the clock moves.

        If this raises, nothing has changed.

        Args:
            checked: the step's gradients, and what the NaN check read of them.
        """

    def after_update(self, report: StepReport, momentum: float) -> None:
        """Called right after the parameters changed.

        Args:
            report: the update (its version and the staleness of its gradient).
            momentum: the momentum the first parameter group applied.
        """

    def state_dict(self) -> dict[str, Any]:
        """This component's state, for the optimizer's ``state_dict``."""
        return {}

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` if :meth:`load_state_dict` would fail; change nothing.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from a state checked by :meth:`check_state_dict`.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """


class MeterComponent(StepComponent):
    """Feeds every update to a :class:`~asyncmomentum.core.measuring.meter.MomentumMeter`.

    For a rule that uses it, it hands the tracker the meter's latest reading.

    Args:
        param_groups: the optimizer's parameter groups.
        tracker: the optimizer's tracker.
        options: keyword arguments of the meter (e.g. ``refresh``).
    """

    name = "meter"

    def __init__(
        self, param_groups: ParamGroups, tracker: AsynchronyTracker, **options: Any
    ) -> None:
        super().__init__(param_groups, tracker)
        self.meter = MomentumMeter(param_groups, rule=tracker.rule, **options)

    def after_update(self, report: StepReport, momentum: float) -> None:
        """Record the update, its gradient dated to the version it was computed at.

        Args:
            report: the update.
            momentum: the momentum the first parameter group applied.
        """
        assert report.version is not None
        assert report.staleness is not None
        # A staleness beyond the start of this clock (a caller's own count, a resumed job)
        # dates the gradient to the oldest version there is.
        self.meter.record(
            report.version,
            max(report.version - report.staleness, 0),
            lr=float(self.param_groups[0]["lr"]),
            momentum=momentum,
        )
        self.feed()

    def feed(self) -> None:
        """Hand the meter's reading to the tracker if its rule uses one."""
        if self.tracker.uses_meter:
            self.tracker.observe_reading(self.meter.reading)

    def state_dict(self) -> dict[str, Any]:
        """The meter's state."""
        return self.meter.state_dict()

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check a meter state without loading it.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        self.meter.check_state_dict(state_dict)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a meter state.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        self.meter.load_state_dict(state_dict)


class CurvatureSchedule(StepComponent):
    """Estimates ``lambda_max`` for the stability rule every ``every`` updates, on a probe loss.

    Args:
        param_groups: the optimizer's parameter groups.
        tracker: the optimizer's tracker.
        probe: returns a scalar loss of the current parameters with its graph (no backward);
            ``None`` until set (then :meth:`estimate` needs a ``loss_fn``).
        every: updates between estimates (>= 1).
    """

    name = "curvature"

    def __init__(
        self,
        param_groups: ParamGroups,
        tracker: AsynchronyTracker,
        probe: Callable[[], Tensor] | None,
        every: int,
    ) -> None:
        super().__init__(param_groups, tracker)
        self.every = check_int(every, "curvature_every", 1)
        self.probe = probe
        self.version: int | None = None  # the clock's value at the last estimate
        self._estimator: CurvatureEstimator | None = None
        self._warned = False

    @property
    def probe(self) -> Callable[[], Tensor] | None:
        """The loss the curvature is estimated on."""
        return self._probe

    @probe.setter
    def probe(self, probe: Callable[[], Tensor] | None) -> None:
        if probe is not None and not callable(probe):
            raise ValueError(f"curvature_probe must be a callable, got {probe!r}")
        self._probe = probe

    def before_update(self, checked: GradientCheck) -> None:
        """Estimate the curvature if it is due.

        Before the clock moves: a probe that raises leaves everything unchanged.

        Args:
            checked: the step's gradients (unused: the probe has its own).
        """
        if self._probe is None:
            if self.tracker.curvature is None and not self._warned:
                self._warned = True
                warnings.warn(
                    "rule='stability' has no curvature yet and no curvature_probe: it follows the "
                    "additive rule until estimate_curvature() is called",
                    stacklevel=4,
                )
            return
        if (
            self.version is None
            or self.tracker.curvature is None
            or self.tracker.clock.value - self.version >= self.every
        ):
            self.estimate()

    def estimate(self, loss_fn: Callable[[], Tensor] | None = None) -> float:
        """Estimate ``lambda_max`` now and hand it to the tracker.

        Args:
            loss_fn: the loss to use instead of the probe.

        Returns:
            The estimate of ``lambda_max``.
        """
        loss_fn = loss_fn or self._probe
        if loss_fn is None:
            raise ValueError(
                "estimate_curvature needs a loss_fn, or a curvature_probe at construction"
            )
        if self._estimator is None:
            params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
            self._estimator = CurvatureEstimator(params, history=1)
        self._estimator.estimate(loss_fn)
        value = self._estimator.value
        assert value is not None
        self.tracker.observe_curvature(value)
        self.version = self.tracker.clock.value
        return value

    def state_dict(self) -> dict[str, Any]:
        """The version of the last estimate (the curvature itself is in the tracker's state)."""
        return {"version": self.version}

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check a schedule state without loading it.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        if not isinstance(state_dict, dict) or "version" not in state_dict:
            raise ValueError(f"curvature schedule state is corrupt: {state_dict!r}")
        if state_dict["version"] is not None:
            check_int(state_dict["version"], "curvature version", 0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a schedule state.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        version = state_dict["version"]
        self.version = None if version is None else int(version)


class GradientNormFeed(StepComponent):
    """Hands the tracker's rule the squared norm of the gradients about to be applied.

    For a rule with ``uses_gradient_norm`` (``rule="auto"``), before the update, every ``every``
    updates. The step's NaN check reads the norms on the way (:attr:`reads_norms`): the sums of
    the gradients hooked during backward and of large ones, and one sum of the small ones
    flattened together (a copy of them: about 2.5x torch's fused check, which reads no norm,
    on ResNet-18's small tensors). A gradient it did not read
    (a sparse one, coalesced; one whose check was suspect) counts with its first ``per_tensor``
    entries. It keeps no state of its own
    (the rule keeps what it makes of the norms).

    Args:
        param_groups: the optimizer's parameter groups.
        tracker: the optimizer's tracker.
        every: updates between two feeds (>= 1).
        per_tensor: entries counted of each gradient the check did not read (>= 1): a fixed
            sample, so that the cost stays small where a large one was not read; 4096 covers
            every tensor of the sweep's problems.
    """

    name = "gradient_norm"
    reads_norms = True

    def __init__(
        self,
        param_groups: ParamGroups,
        tracker: AsynchronyTracker,
        every: int = 1,
        per_tensor: int = 4096,
    ) -> None:
        super().__init__(param_groups, tracker)
        self.every = check_int(every, "gradient_norm_every", 1)
        self.per_tensor = check_int(per_tensor, "per_tensor", 1)
        self._calls = 0

    def before_update(self, checked: GradientCheck) -> None:
        """Feed the norm if it is due.

        Args:
            checked: the step's gradients, with the squared norms the NaN check read.
        """
        self._calls += 1
        if self._calls < self.every:
            return
        self._calls = 0
        total = sum_on_host(checked.squared_norm_parts)
        if not all(checked.read):
            unread = [
                # A sparse gradient's values may repeat an index: coalesced, they sum them.
                g.coalesce().values() if g.is_sparse else g
                for g, read in zip(checked.grads, checked.read, strict=True)
                if not read
            ]
            total += squared_norm(unread, self.per_tensor)
        self.tracker.observe_gradient_norm(total)
