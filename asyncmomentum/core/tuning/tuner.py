"""MomentumTuner: the one object that turns what a run observes into a momentum.

The optimizer owns one; the Lightning callback drives one against any optimizer. Neither
re-derives a formula: the math is in :mod:`asyncmomentum.core.tuning.formulas`, the estimate in
:class:`~asyncmomentum.core.measuring.staleness.StalenessEstimator`, the rules (objects, one
registry) in :mod:`asyncmomentum.core.tuning.rules`.
"""

from __future__ import annotations

from typing import Any

from asyncmomentum.core.measuring.meter import MomentumReading
from asyncmomentum.core.measuring.staleness import (
    DEFAULT_HORIZON,
    DEFAULT_WARMUP,
    StalenessEstimator,
    VersionClock,
    tick_and_observe,
)
from asyncmomentum.core.tuning import formulas
from asyncmomentum.core.tuning.rules import DEFAULT_RULE, TuningRule, make_rule
from asyncmomentum.core.validation import check_momentum, check_momentum_bounds

__all__ = ["MomentumTuner"]


class MomentumTuner:
    """Staleness (and, for the feedback rules, a measurement or a curvature) in, momentum out.

    The rule is an object (:class:`~asyncmomentum.core.tuning.rules.base.TuningRule`); the
    tuner estimates the implicit momentum, hands the rule what its flags ask for and delegates
    the momentum, the totals and the rule's state to it. The registered rules
    (:data:`asyncmomentum.core.tuning.rules.RULES`):

    - ``"additive"`` (default): ``target - (1 - 1/M_hat)``.
    - ``"compositional"``: ``1 - (1 - target) / (1 - implicit)``.
    - ``"closed_loop"``: the additive rule plus a correction integrated from the total momentum
      a :class:`~asyncmomentum.core.measuring.meter.MomentumMeter` measures (fed by
      :meth:`observe_reading`): ``correction += gain * (target - measured_total)``, bounded and
      rate-limited (:class:`~asyncmomentum.core.tuning.rules.closed_loop.ClosedLoopRule`).
    - ``"stability"``: the largest momentum, capped by the target, at which the delayed heavy
      ball is stable for the observed staleness histogram and ``lr * lambda_max``
      (:class:`~asyncmomentum.core.tuning.rules.stability.StabilityRule`; the curvature comes
      from :meth:`observe_curvature`). Needs the group's ``lr``.

    The feedback rules return the additive rule's momentum until they have what they need (a
    first reading; a curvature), and report totals in its composition.

    Args:
        target_momentum: total momentum to aim for, in (-1, 1).
        rule: a name in :func:`asyncmomentum.core.tuning.rules.rule_names`, or a rule object
            (which this tuner then owns: one object per tuner).
        momentum_bounds: ``(low, high)`` clip range of the algorithmic momentum, inside (-1, 1).
        workers: known number of workers; skips estimation.
        horizon: span of the staleness moving average, in updates.
        warmup: observations before the estimate leaves ``M = 1``.
        rule_options: keyword arguments of the rule's class, for a rule given by name (e.g.
            ``gain`` for ``"closed_loop"``, ``curvature_margin`` for ``"stability"``). The
            bounds are ``momentum_bounds``.

    Example:
        >>> tuner = MomentumTuner(target_momentum=0.9, warmup=0)
        >>> for _ in range(100):
        ...     tuner.observe(3)
        >>> round(tuner.estimated_workers, 6), round(tuner.algorithmic_momentum(), 6)
        (4.0, 0.15)
    """

    def __init__(
        self,
        target_momentum: float = 0.9,
        *,
        rule: str | TuningRule = DEFAULT_RULE,
        momentum_bounds: tuple[float, float] = formulas.DEFAULT_MOMENTUM_BOUNDS,
        workers: float | None = None,
        horizon: int = DEFAULT_HORIZON,
        warmup: int = DEFAULT_WARMUP,
        rule_options: dict[str, Any] | None = None,
    ) -> None:
        self.target_momentum = check_momentum(target_momentum)
        self.momentum_bounds = check_momentum_bounds(momentum_bounds)
        self.estimator = StalenessEstimator(horizon=horizon, warmup=warmup, workers=workers)
        self.rule_options = _check_rule_options(rule_options)
        self.rule: TuningRule = make_rule(rule, **self.rule_options)

    # -- inputs -------------------------------------------------------------------------------

    def observe(self, tau: int) -> None:
        """Record the staleness of one applied gradient.

        Args:
            tau: updates applied between the gradient's read and its application (>= 0).
        """
        self.estimator.observe(tau)
        self.rule.observe(tau)

    def record_update(
        self, clock: VersionClock, version_read: int, staleness: int | None
    ) -> tuple[int, int]:
        """Claim ``clock``'s next version for an update and record its staleness.

        What :meth:`observe` does, plus the tick, with the tick and the estimator's record in
        one critical section when the estimator shares the clock's lock
        (:func:`~asyncmomentum.core.measuring.staleness.tick_and_observe`).

        Args:
            clock: the clock of applied updates.
            version_read: the version the gradient's parameters were read at.
            staleness: the staleness if the caller knows it, else ``None`` (measured).

        Returns:
            The version the update is applied at, and its staleness.
        """
        version, tau = tick_and_observe(clock, self.estimator, version_read, staleness)
        self.rule.observe(tau)
        return version, tau

    def observe_reading(self, reading: MomentumReading | None) -> None:
        """Hand the rule the momentum meter's latest reading (``None``: none yet).

        A rule that does not use the meter (:attr:`uses_meter`) ignores it.

        Args:
            reading: :attr:`MomentumMeter.reading
                <asyncmomentum.core.measuring.meter.MomentumMeter.reading>`.
        """
        self.rule.observe_reading(reading)

    def observe_curvature(self, lambda_max: float) -> None:
        """Set the largest curvature of the loss (not times ``lr``).

        For a rule that uses one (:attr:`uses_curvature`); other rules raise ``ValueError``.

        Args:
            lambda_max: e.g. from a
                :class:`~asyncmomentum.core.measuring.curvature.CurvatureEstimator` (>= 0).
        """
        self.rule.observe_curvature(lambda_max)

    # -- the rule ----------------------------------------------------------------------------------

    @property
    def rule_name(self) -> str:
        """The rule's name, for logs."""
        return self.rule.name

    @property
    def uses_meter(self) -> bool:
        """Whether the rule feeds on the momentum meter's readings (:meth:`observe_reading`)."""
        return self.rule.uses_meter

    @property
    def uses_curvature(self) -> bool:
        """Whether the rule needs a curvature estimate (:meth:`observe_curvature`)."""
        return self.rule.uses_curvature

    @property
    def needs_lr(self) -> bool:
        """Whether :meth:`algorithmic_momentum` needs the group's ``lr``."""
        return self.rule.needs_lr

    # -- what it knows --------------------------------------------------------------------------

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

    # -- output ---------------------------------------------------------------------------------

    def algorithmic_momentum(
        self, target: float | None = None, *, lr: float | None = None
    ) -> float:
        """Momentum to apply so that the total is ``target`` (default: this tuner's target).

        Args:
            target: a total momentum in (-1, 1), for a parameter group with its own target.
            lr: the group's learning rate; required by a rule with :attr:`needs_lr`.
        """
        target = self.target_momentum if target is None else check_momentum(target)
        return self.rule.algorithmic_momentum(
            target, self.implicit_momentum, lr=lr, bounds=self.momentum_bounds
        )

    def total_momentum(self, algorithmic: float) -> float:
        """Total momentum that ``algorithmic`` makes with the current implicit momentum.

        Args:
            algorithmic: the momentum an optimizer applies.
        """
        return self.rule.total_momentum(algorithmic, self.implicit_momentum)

    # -- lifecycle ------------------------------------------------------------------------------

    def share_memory(self) -> MomentumTuner:
        """Put the estimate (and what the rule shares) in shared memory for Hogwild processes.

        Returns:
            ``self``.
        """
        self.estimator.share_memory()
        self.rule.share_memory()
        return self

    def state_dict(self) -> dict[str, Any]:
        """The estimator's observations and, under the rule's name, the rule's state.

        The rule's entry is there only if it keeps any state; its configuration stays the
        constructor's.
        """
        state: dict[str, Any] = {"estimator": self.estimator.state_dict()}
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
        if not isinstance(state_dict, dict) or "estimator" not in state_dict:
            raise ValueError("MomentumTuner.load_state_dict expects a dict with an 'estimator'")
        StalenessEstimator().load_state_dict(state_dict["estimator"])  # a fresh one: checks
        rule_state = state_dict.get(self.rule.name)
        if rule_state is not None:
            self.rule.check_state_dict(rule_state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a bad state raises and changes nothing.

        A state without an entry for this tuner's rule (written under another rule) restarts the
        rule from scratch.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        self.check_state_dict(state_dict)
        rule_state = state_dict.get(self.rule.name)
        if rule_state is None:
            self.rule.reset()
        else:
            self.rule.load_state_dict(rule_state)
        self.estimator.load_state_dict(state_dict["estimator"])

    def __repr__(self) -> str:
        return (
            f"MomentumTuner(target_momentum={self.target_momentum}, rule={self.rule.name!r}, "
            f"momentum_bounds={self.momentum_bounds}, estimated_workers="
            f"{self.estimated_workers:.3g})"
        )


def _check_rule_options(options: dict[str, Any] | None) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"rule_options must be a dict of keyword arguments, got {options!r}")
    taken = {"bounds", "momentum_bounds"} & set(options)
    if taken:
        raise ValueError(
            f"rule_options must not set {sorted(taken)}: the tuner's momentum_bounds apply"
        )
    return dict(options)
