"""AsynchronyTracker: the one owner of what is measured about asynchrony.

A run's version clock, its staleness estimator, the tuning rule and what the rule feeds on (the
meter's readings, a curvature, gradient norms), and the lock that guards clock and estimator,
live here and nowhere else. :class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD` is torch's
SGD update plus a tracker; the runtimes pair a tracker with any other torch optimizer
(:class:`~asyncmomentum.runtimes.adapter.OptimizerView`); the Lightning callbacks, Hogwild and
the parameter server read a tracker or its :class:`MomentumSummary`. The math is in
:mod:`asyncmomentum.core.formulas`, the rules (objects, one registry) in
:mod:`asyncmomentum.core.tuning.rules`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from asyncmomentum.core import formulas
from asyncmomentum.core.measuring.meter import MomentumReading
from asyncmomentum.core.measuring.staleness import (
    DEFAULT_HORIZON,
    DEFAULT_WARMUP,
    StalenessEstimator,
    VersionClock,
)
from asyncmomentum.core.tuning.rules import DEFAULT_RULE, TuningRule, make_rule
from asyncmomentum.core.validation import (
    MAX_COUNT,
    check_int,
    check_momentum,
    check_momentum_bounds,
    check_staleness,
)

__all__ = ["AsynchronyTracker", "MomentumSummary", "StepReport"]

#: Version of :meth:`AsynchronyTracker.state_dict`.
STATE_FORMAT = 1


class MomentumSummary(NamedTuple):
    """What the momentum is now, against the asynchrony measured: one immutable value.

    Args:
        algorithmic_momentum: the momentum applied (a tuned or fixed one).
        implicit_momentum: ``1 - 1/M_hat`` of the measured asynchrony.
        total_momentum: the two composed under the tracker's rule.
        estimated_workers: ``M_hat``.
        mean_staleness: moving average of the staleness of applied gradients.
        measured_total_momentum: the total momentum the momentum meter measured from the
            trajectory, when it runs and has a reading; else ``None``.
    """

    algorithmic_momentum: float
    implicit_momentum: float
    total_momentum: float
    estimated_workers: float
    mean_staleness: float
    measured_total_momentum: float | None = None


class StepReport(NamedTuple):
    """What one step did.

    Args:
        applied: whether the update was applied (``False``: skipped, e.g. a NaN gradient with
            ``nonfinite="skip"``, or no gradient at all).
        staleness: the staleness of the gradient applied (``None`` when not applied).
        version: the version the update took (``None`` when not applied).
    """

    applied: bool
    staleness: int | None = None
    version: int | None = None


SKIPPED = StepReport(applied=False)


class AsynchronyTracker:
    """Clock, staleness estimate and rule of one run, behind one lock; momentum out.

    Counts applied updates exactly (:meth:`record_update`, across processes after
    :meth:`share_memory`), estimates the number of asynchronous workers ``M`` from the staleness
    of every applied gradient, and asks the rule for the momentum that keeps a total the caller
    names. The registered rules (:data:`asyncmomentum.core.tuning.rules.RULES`, see
    :func:`~asyncmomentum.core.tuning.rules.rule_names`) are objects; the tracker hands each
    what its flags ask for.

    Args:
        rule: a name in :func:`asyncmomentum.core.tuning.rules.rule_names`, or a rule object
            (which this tracker then owns); ``None`` for the default, ``"additive"``.
        momentum_bounds: ``(low, high)`` clip range of the algorithmic momentum, inside (-1, 1).
        workers: known number of workers; skips estimation.
        horizon: span of the staleness moving average, in updates.
        warmup: observations before the estimate leaves ``M = 1``.
        rule_options: keyword arguments of the rule's class, for a rule given by name (e.g.
            ``gain`` for ``"closed_loop"``, ``curvature_margin`` for ``"stability"``).

    Example:
        >>> tracker = AsynchronyTracker(warmup=0)
        >>> for _ in range(100):
        ...     _ = tracker.record_update(staleness=3)
        >>> round(tracker.estimated_workers, 6), round(tracker.algorithmic_momentum(0.9), 6)
        (4.0, 0.15)
    """

    def __init__(
        self,
        *,
        rule: str | TuningRule | None = None,
        momentum_bounds: tuple[float, float] = formulas.DEFAULT_MOMENTUM_BOUNDS,
        workers: float | None = None,
        horizon: int = DEFAULT_HORIZON,
        warmup: int = DEFAULT_WARMUP,
        rule_options: dict[str, Any] | None = None,
    ) -> None:
        self.momentum_bounds = check_momentum_bounds(momentum_bounds)
        self.rule_options = _check_rule_options(rule_options)
        self.clock = VersionClock()
        # One lock for both: an update's count and its staleness are recorded together.
        self.estimator = StalenessEstimator(
            horizon=horizon, warmup=warmup, workers=workers, lock_of=self.clock
        )
        self.rule: TuningRule = make_rule(
            DEFAULT_RULE if rule is None else rule, **self.rule_options
        )
        #: The version the next gradient is computed from (per process: not shared).
        self.version_read = 0
        #: Staleness of the most recently applied gradient.
        self.last_staleness = 0

    # -- inputs -------------------------------------------------------------------------------

    def mark_read(self) -> None:
        """Note that the parameters were just read: the next gradient is computed from them."""
        self.version_read = self.clock.value

    def record_update(self, staleness: int | None = None) -> StepReport:
        """Claim the clock's next version for an applied update and record its staleness.

        Args:
            staleness: the staleness if the caller knows it (a parameter server does), else
                ``None``: measured from the clock since :meth:`mark_read`.

        Returns:
            The update's report: applied, with its staleness and version.
        """
        if staleness is not None:
            staleness = check_staleness(staleness)
        version, tau = self.clock.tick_and_observe(self.estimator, self.version_read, staleness)
        self.rule.observe(tau)
        self.last_staleness = tau
        self.version_read = version + 1  # this process has seen its own update
        return StepReport(applied=True, staleness=tau, version=version)

    def observe(self, tau: int) -> None:
        """Record the staleness of an update counted elsewhere (the clock does not move).

        Args:
            tau: updates applied between the gradient's read and its application (>= 0).
        """
        self.estimator.observe(tau)
        self.rule.observe(tau)
        self.last_staleness = int(tau)

    def observe_reading(self, reading: MomentumReading | None) -> None:
        """Hand the rule the momentum meter's latest reading; ignored unless :attr:`uses_meter`.

        Args:
            reading: :attr:`MomentumMeter.reading
                <asyncmomentum.core.measuring.meter.MomentumMeter.reading>`.
        """
        self.rule.observe_reading(reading)

    def observe_curvature(self, lambda_max: float) -> None:
        """Set the largest curvature of the loss (not times ``lr``).

        Args:
            lambda_max: e.g. from a
                :class:`~asyncmomentum.core.measuring.curvature.CurvatureEstimator` (>= 0).

        Raises:
            ValueError: the rule uses no curvature (:attr:`uses_curvature`).
        """
        self.rule.observe_curvature(lambda_max)

    def observe_gradient_norm(self, squared_norm: float) -> None:
        """Hand a rule with :attr:`uses_gradient_norm` the squared norm of a gradient.

        Args:
            squared_norm: the squared norm of the gradients about to be applied.
        """
        self.rule.observe_gradient_norm(squared_norm)  # type: ignore[attr-defined]

    def observe_loss(self, loss: float) -> None:
        """Hand a rule with :attr:`uses_loss` the training loss of the gradient about to be applied.

        Args:
            loss: the loss of the batch the gradient comes from (non-finite is ignored).
        """
        self.rule.observe_loss(loss)  # type: ignore[attr-defined]

    def observe_batch_size(self, batch_size: int) -> None:
        """Hand a rule with :attr:`uses_batch_size` the size of the gradient's batch.

        Args:
            batch_size: the number of samples the gradient about to be applied averages.
        """
        self.rule.observe_batch_size(batch_size)  # type: ignore[attr-defined]

    # -- the rule -----------------------------------------------------------------------------

    @property
    def rule_name(self) -> str:
        """The rule's name, for logs."""
        return self.rule.name

    @property
    def uses_meter(self) -> bool:
        """Whether the rule feeds on the momentum meter's readings."""
        return self.rule.uses_meter

    @property
    def uses_curvature(self) -> bool:
        """Whether the rule needs a curvature estimate."""
        return self.rule.uses_curvature

    @property
    def uses_gradient_norm(self) -> bool:
        """Whether the rule feeds on gradient norms (``rule="auto"``)."""
        return bool(getattr(self.rule, "uses_gradient_norm", False))

    @property
    def uses_loss(self) -> bool:
        """Whether the rule watches the training loss (``rule="auto"``)."""
        return bool(getattr(self.rule, "uses_loss", False))

    @property
    def uses_batch_size(self) -> bool:
        """Whether the rule reads the size of each gradient's batch (``rule="auto"``)."""
        return bool(getattr(self.rule, "uses_batch_size", False))

    @property
    def needs_lr(self) -> bool:
        """Whether :meth:`algorithmic_momentum` needs the group's ``lr``."""
        return self.rule.needs_lr

    # -- what it knows ------------------------------------------------------------------------

    @property
    def implicit_momentum(self) -> float:
        """Implicit momentum ``1 - 1/M_hat`` of the observed asynchrony."""
        return self.estimator.implicit_momentum

    @property
    def estimated_workers(self) -> float:
        """``M_hat``, the estimated number of asynchronous workers."""
        return self.estimator.estimated_workers

    @property
    def mean_staleness(self) -> float:
        """Moving average of observed staleness."""
        return self.estimator.mean

    @property
    def curvature(self) -> float | None:
        """``lambda_max`` the rule uses (``None`` for a rule without one, or before one)."""
        return self.rule.curvature

    # -- output -------------------------------------------------------------------------------

    def algorithmic_momentum(self, target: float, *, lr: float | None = None) -> float:
        """Momentum to apply so that the total is ``target``.

        Args:
            target: the total momentum to keep, in (-1, 1).
            lr: the group's learning rate; required by a rule with :attr:`needs_lr`.
        """
        return self.rule.algorithmic_momentum(
            check_momentum(target), self.implicit_momentum, lr=lr, bounds=self.momentum_bounds
        )

    def total_momentum(self, algorithmic: float) -> float:
        """Total momentum that ``algorithmic`` makes with the current implicit momentum.

        Args:
            algorithmic: the momentum an optimizer applies.
        """
        return self.rule.total_momentum(algorithmic, self.implicit_momentum)

    def summary(
        self, algorithmic: float, measured_total_momentum: float | None = None
    ) -> MomentumSummary:
        """The momentum now: ``algorithmic`` against the measured asynchrony.

        Args:
            algorithmic: the momentum applied.
            measured_total_momentum: the meter's measurement, if one runs.
        """
        implicit = self.implicit_momentum
        return MomentumSummary(
            algorithmic_momentum=algorithmic,
            implicit_momentum=implicit,
            total_momentum=self.rule.total_momentum(algorithmic, implicit),
            estimated_workers=self.estimator.estimated_workers,
            mean_staleness=self.estimator.mean,
            measured_total_momentum=measured_total_momentum,
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def share_memory(self) -> AsynchronyTracker:
        """Put clock, estimate (and what the rule shares) in shared memory, for processes.

        Processes that receive the tracker at start-up then count into one clock and one
        estimate, under one process lock.

        Returns:
            ``self``.
        """
        self.clock.share_memory()
        self.estimator.share_memory()
        self.rule.share_memory()
        return self

    @property
    def is_shared(self) -> bool:
        """Whether clock and estimate live in shared memory."""
        return self.clock.is_shared

    def state_dict(self) -> dict[str, Any]:
        """Clock, estimator observations, counters and, under the rule's name, the rule's state.

        The rule's entry is there only if it keeps any state; configuration stays the
        constructor's.
        """
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "clock": self.clock.state_dict(),
            "estimator": self.estimator.state_dict(),
            "version_read": self.version_read,
            "last_staleness": self.last_staleness,
        }
        rule_state = self.rule.state_dict()
        if rule_state:
            state[self.rule.name] = rule_state
        return state

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can take ``state_dict``.

        Changes nothing.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        if not isinstance(state_dict, dict):
            raise ValueError(f"tracker state must be a dict, got {type(state_dict).__name__}")
        # A state without a format is a MomentumTuner's (before the tracker): estimator and rule.
        required: tuple[str, ...] = ("clock", "estimator", "version_read", "last_staleness")
        if "format" not in state_dict:
            required = ("estimator",)
        elif state_dict["format"] != STATE_FORMAT:
            raise ValueError(
                f"tracker state has format {state_dict['format']!r}, this version reads "
                f"{STATE_FORMAT}"
            )
        missing = [key for key in required if key not in state_dict]
        if missing:
            raise ValueError(f"tracker state lacks {missing}")
        try:
            if "clock" in state_dict:
                VersionClock().load_state_dict(state_dict["clock"])  # fresh objects: they check
            StalenessEstimator().load_state_dict(state_dict["estimator"])
            for key in ("version_read", "last_staleness"):
                if key in state_dict:
                    check_int(state_dict[key], key, 0, maximum=MAX_COUNT)
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"tracker state is corrupt: {error}") from None
        rule_state = state_dict.get(self.rule.name)
        if rule_state is not None:
            self.rule.check_state_dict(rule_state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a bad state raises and changes nothing.

        A state without an entry for this tracker's rule (written under another rule) restarts
        the rule from scratch.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        self.check_state_dict(state_dict)
        rule_state = state_dict.get(self.rule.name)
        if rule_state is None:
            self.rule.reset()
        else:
            self.rule.load_state_dict(rule_state)
        if "clock" in state_dict:
            self.clock.load_state_dict(state_dict["clock"])
        self.estimator.load_state_dict(state_dict["estimator"])
        self.version_read = int(state_dict.get("version_read", self.clock.value))
        self.last_staleness = int(state_dict.get("last_staleness", 0))

    def __repr__(self) -> str:
        return (
            f"AsynchronyTracker(rule={self.rule.name!r}, momentum_bounds={self.momentum_bounds}, "
            f"version={self.clock.value}, estimated_workers={self.estimated_workers:.3g})"
        )


def _check_rule_options(options: dict[str, Any] | None) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"rule_options must be a dict of keyword arguments, got {options!r}")
    taken = {"bounds", "momentum_bounds"} & set(options)
    if taken:
        raise ValueError(
            f"rule_options must not set {sorted(taken)}: the tracker's momentum_bounds apply"
        )
    return dict(options)
