"""MomentumTuner: the one object that turns what a run observes into a momentum.

The optimizer owns one; the Lightning callback drives one against any optimizer. Neither
re-derives a formula: the math is in :mod:`asyncmomentum.core.tuning.formulas`, the estimate in
:class:`~asyncmomentum.core.measuring.staleness.StalenessEstimator`, the feedback rules in
:class:`~asyncmomentum.core.measuring.meter.ClosedLoopController` and
:class:`~asyncmomentum.core.tuning.stability.StabilityRule`.
"""

from __future__ import annotations

import math
from typing import Any

from asyncmomentum.core.measuring.meter import ClosedLoopController, MomentumReading
from asyncmomentum.core.measuring.staleness import StalenessEstimator
from asyncmomentum.core.tuning import formulas
from asyncmomentum.core.tuning.stability import StabilityRule

__all__ = ["MomentumTuner"]


class _Loop:
    """One closed loop: a controller and the correction it has integrated on top of the
    additive rule."""

    def __init__(self, controller: ClosedLoopController) -> None:
        self.controller = controller
        self.offset = 0.0


class MomentumTuner:
    """Staleness (and, for the feedback rules, a measurement or a curvature) in, momentum out.

    The rules (``rule``):

    - ``"additive"`` (default): ``target - (1 - 1/M_hat)``.
    - ``"compositional"``: ``1 - (1 - target) / (1 - implicit)``.
    - ``"closed_loop"``: the additive rule plus a correction integrated by a
      :class:`~asyncmomentum.core.measuring.meter.ClosedLoopController` from the total momentum a
      :class:`~asyncmomentum.core.measuring.meter.MomentumMeter` measures (fed by
      :meth:`observe_reading`):
      ``correction += gain * (target - measured_total)``, bounded and rate-limited. The
      additive part follows a change of ``M`` at once; the correction removes its bias.
    - ``"stability"``: the largest momentum, capped by the target, at which the delayed heavy
      ball is stable for the observed staleness histogram and ``lr * lambda_max``
      (:class:`~asyncmomentum.core.tuning.stability.StabilityRule`; the curvature comes from
      :meth:`observe_curvature`). Needs the group's ``lr``.

    The feedback rules return the additive rule's momentum until they have what they need (a
    first reading; a curvature), and report totals in its composition.

    Args:
        target_momentum: total momentum to aim for, in (-1, 1).
        rule: a name in :data:`asyncmomentum.core.tuning.formulas.RULE_NAMES`.
        momentum_bounds: ``(low, high)`` clip range of the algorithmic momentum, inside (-1, 1).
        workers: known number of workers; skips estimation.
        horizon: span of the staleness moving average, in updates.
        warmup: observations before the estimate leaves ``M = 1``.
        rule_options: keyword arguments of the feedback rule's object
            (:class:`~asyncmomentum.core.measuring.meter.ClosedLoopController` for
            ``"closed_loop"``, e.g.
            ``gain``; :class:`~asyncmomentum.core.tuning.stability.StabilityRule` for
            ``"stability"``, e.g.
            ``curvature_margin``). Their ``bounds``/``momentum_bounds`` is ``momentum_bounds``.

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
        rule: str = "additive",
        momentum_bounds: tuple[float, float] = formulas.DEFAULT_MOMENTUM_BOUNDS,
        workers: float | None = None,
        horizon: int = 1000,
        warmup: int = 20,
        rule_options: dict[str, Any] | None = None,
    ) -> None:
        self.target_momentum = formulas.check_momentum(target_momentum)
        self.rule = formulas.check_rule(rule)
        self.momentum_bounds = formulas.check_momentum_bounds(momentum_bounds)
        self.estimator = StalenessEstimator(horizon=horizon, warmup=warmup, workers=workers)
        self.rule_options = _check_rule_options(self.rule, rule_options)
        self.stability: StabilityRule | None = None
        if self.rule == "stability":
            self.stability = self._new_stability_rule()
        elif self.rule == "closed_loop":
            self._new_controller()  # fails now, not at the first reading, on a bad option
        self._loops: dict[float, _Loop] = {}
        self._reading: MomentumReading | None = None

    # -- inputs -------------------------------------------------------------------------------

    def observe(self, tau: int) -> None:
        """Record the staleness of one applied gradient.

        Args:
            tau: updates applied between the gradient's read and its application (>= 0).
        """
        self.estimator.observe(tau)
        if self.stability is not None:
            self.stability.observe(tau)

    def observe_reading(self, reading: MomentumReading | None) -> None:
        """Hand the closed loop the momentum meter's latest reading (``None``: none yet).

        Each reading is integrated once (by its ``serial``), however often this is called.

        Args:
            reading: :attr:`MomentumMeter.reading
            <asyncmomentum.core.measuring.meter.MomentumMeter.reading>`.
        """
        self._reading = reading

    def observe_curvature(self, lambda_max: float) -> None:
        """Set the largest curvature of the loss (not times ``lr``) for ``rule="stability"``.

        Args:
            lambda_max: e.g. from a
            :class:`~asyncmomentum.core.tuning.stability.CurvatureEstimator` (>= 0).
        """
        if self.stability is None:
            raise ValueError(
                f"observe_curvature is for rule='stability'; this tuner's rule is {self.rule!r}"
            )
        self.stability.observe_curvature(lambda_max)

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
    def staleness_mean(self) -> float:
        """Moving average of observed staleness."""
        return self.estimator.mean

    @property
    def curvature(self) -> float | None:
        """``lambda_max`` the stability rule uses (``None`` for other rules or before one)."""
        return None if self.stability is None else self.stability.curvature

    # -- output ---------------------------------------------------------------------------------

    def algorithmic_momentum(
        self, target: float | None = None, *, lr: float | None = None
    ) -> float:
        """Momentum to apply so that the total is ``target`` (default: this tuner's target).

        Args:
            target: a total momentum in (-1, 1), for a parameter group with its own target.
            lr: the group's learning rate; required by ``rule="stability"``.
        """
        target = self.target_momentum if target is None else formulas.check_momentum(target)
        formula = formulas.composition_rule(self.rule)
        base = formulas.algorithmic_momentum(
            target, self.implicit_momentum, formula, self.momentum_bounds
        )
        if self.rule == "stability":
            if lr is None:
                raise ValueError(
                    "rule='stability' needs the learning rate: algorithmic_momentum(target, lr=...)"
                )
            assert self.stability is not None
            return self.stability.algorithmic_momentum(target, float(lr), fallback=base)
        if self.rule == "closed_loop":
            return self._closed_loop(target, base)
        return base

    def _closed_loop(self, target: float, base: float) -> float:
        low, high = self.momentum_bounds
        loop = self._loops.get(target)
        if loop is None:
            loop = self._loops[target] = _Loop(self._new_controller())
        current = min(max(base + loop.offset, low), high)
        reading = self._reading
        if reading is not None:
            # Rebased to this group's momentum: total = current + measured implicit (additive).
            corrected = loop.controller.update(
                target,
                reading.total_momentum("additive"),
                current,
                measured_algorithmic=reading.algorithmic,
                reading_id=reading.serial,
            )
            # The correction is kept apart from the additive part, so that a change of M moves
            # the momentum at once instead of through the (slow, noisy) loop.
            loop.offset = corrected - base
            current = corrected
        return current

    def total_momentum(self, algorithmic: float) -> float:
        """Total momentum that ``algorithmic`` makes with the current implicit momentum.

        Args:
            algorithmic: the momentum an optimizer applies.
        """
        return formulas.total_momentum(algorithmic, self.implicit_momentum, self.rule)

    # -- lifecycle ------------------------------------------------------------------------------

    def share_memory(self) -> MomentumTuner:
        """Put the estimate in shared memory for Hogwild processes; returns self."""
        self.estimator.share_memory()
        return self

    def state_dict(self) -> dict[str, Any]:
        """The estimator's observations and the feedback rule's state (configuration stays the
        constructor's)."""
        state: dict[str, Any] = {"estimator": self.estimator.state_dict()}
        if self.stability is not None:
            state["stability"] = self.stability.state_dict()
        if self.rule == "closed_loop":
            state["closed_loop"] = [
                {
                    "target": target,
                    "offset": loop.offset,
                    "controller": loop.controller.state_dict(),
                }
                for target, loop in self._loops.items()
            ]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a bad state raises and changes nothing.

        A state without the feedback rule's entry (written under another rule) restarts that
        rule from scratch.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        if not isinstance(state_dict, dict) or "estimator" not in state_dict:
            raise ValueError("MomentumTuner.load_state_dict expects a dict with an 'estimator'")
        # Validate every part on fresh objects before touching this one.
        StalenessEstimator().load_state_dict(state_dict["estimator"])
        stability_state = state_dict.get("stability") if self.stability is not None else None
        if stability_state is not None:
            StabilityRule().load_state_dict(stability_state)
        loops = (
            self._loops_from(state_dict.get("closed_loop")) if self.rule == "closed_loop" else {}
        )
        self.estimator.load_state_dict(state_dict["estimator"])
        if self.stability is not None:
            self.stability = self._new_stability_rule()
            if stability_state is not None:
                self.stability.load_state_dict(stability_state)
        self._loops = loops

    def _new_controller(self) -> ClosedLoopController:
        try:
            return ClosedLoopController(bounds=self.momentum_bounds, **self.rule_options)
        except TypeError as error:
            raise ValueError(f"rule_options for 'closed_loop': {error}") from None

    def _new_stability_rule(self) -> StabilityRule:
        try:
            return StabilityRule(momentum_bounds=self.momentum_bounds, **self.rule_options)
        except TypeError as error:
            raise ValueError(f"rule_options for 'stability': {error}") from None

    def _loops_from(self, entries: Any) -> dict[float, _Loop]:
        loops: dict[float, _Loop] = {}
        if entries is None:
            return loops
        if not isinstance(entries, list):
            raise ValueError(f"MomentumTuner state is corrupt: closed_loop is {type(entries)}")
        for entry in entries:
            try:
                target = formulas.check_momentum(entry["target"])
                offset = float(entry["offset"])
                controller_state = entry["controller"]
            except (KeyError, TypeError) as error:
                raise ValueError(
                    f"MomentumTuner state is corrupt: closed_loop entry {entry!r}"
                ) from error
            if not math.isfinite(offset):
                raise ValueError(f"MomentumTuner state is corrupt: closed_loop offset {offset!r}")
            loop = _Loop(self._new_controller())
            loop.controller.load_state_dict(controller_state)
            loop.offset = offset
            loops[target] = loop
        return loops

    def __repr__(self) -> str:
        return (
            f"MomentumTuner(target_momentum={self.target_momentum}, rule={self.rule!r}, "
            f"momentum_bounds={self.momentum_bounds}, estimated_workers="
            f"{self.estimated_workers:.3g})"
        )


def _check_rule_options(rule: str, options: dict[str, Any] | None) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"rule_options must be a dict of keyword arguments, got {options!r}")
    if options and rule not in formulas.FEEDBACK_RULES:
        raise ValueError(
            f"rule_options configure the feedback rules {formulas.FEEDBACK_RULES}; rule {rule!r} "
            f"takes none, got {sorted(options)}"
        )
    taken = {"bounds", "momentum_bounds"} & set(options)
    if taken:
        raise ValueError(
            f"rule_options must not set {sorted(taken)}: the tuner's momentum_bounds apply"
        )
    return dict(options)
