"""The stability rule: the largest momentum the delayed heavy ball tolerates.

The analysis (the recursion, its radii,
:func:`~asyncmomentum.core.tuning.delayed_heavy_ball.largest_stable_momentum`) is in
:mod:`asyncmomentum.core.tuning.delayed_heavy_ball`; the curvature comes from a
:class:`~asyncmomentum.core.measuring.curvature.CurvatureEstimator`. See
``docs/stability-rule.md``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from asyncmomentum.core import formulas
from asyncmomentum.core.tuning.delayed_heavy_ball import (
    CRITERIA,
    DEFAULT_TAIL_MASS,
    Criterion,
    StalenessHistogram,
    largest_stable_momentum,
)
from asyncmomentum.core.tuning.rules.base import TuningRule
from asyncmomentum.core.validation import (
    check_choice,
    check_int,
    check_momentum,
    check_real,
    check_state,
)

__all__ = ["StabilityRule"]

#: Layout version of the state dicts of this module.
STATE_FORMAT = 1


class StabilityRule(TuningRule):
    """Staleness and curvature in, the largest stable algorithmic momentum out.

    Keeps a :class:`~asyncmomentum.core.tuning.delayed_heavy_ball.StalenessHistogram` of the applied
    gradients' staleness and an estimate of the largest curvature ``lambda_max`` (fed by
    :meth:`observe_curvature`, e.g. from a
    :class:`~asyncmomentum.core.measuring.curvature.CurvatureEstimator`);
    :meth:`algorithmic_momentum` returns
    :func:`~asyncmomentum.core.tuning.delayed_heavy_ball.largest_stable_momentum` for
    ``a = lr * lambda_max``, capped by the target, inside the bounds.

    Results are cached by (target, ``a`` to 1 %, bounds). The histogram is re-read at doubling
    counts (1, 2, 4, ... observations: at start-up it changes fast, and the first delays are
    short because every worker starts from version 0) and then every ``refresh`` observations;
    the cache is dropped when the total-variation distance of its pmf from the one last used
    exceeds ``pmf_tolerance``. A cached answer costs a few microseconds; a new one 1-25
    milliseconds where a momentum of the grid is stable (less the nearer the cap it is),
    70-330 where none is (see ``docs/stability-rule.md``).

    It speaks from ``min_observations`` observations on (by default the first: at start-up the
    staleness grows by one per update, and a warm-up spent at the target momentum is what made
    runs with many workers diverge). Before that, or while no curvature is known, it follows the
    additive rule; totals compose additively.

    Args:
        curvature_margin: relative safety factor on ``lr * lambda_max`` (see
            :func:`~asyncmomentum.core.tuning.delayed_heavy_ball.largest_stable_momentum`);
            absorbs the estimate's error, curvature that rises between estimates, and the start-up
            transient. 0.25 was the best of {0, 0.25, 0.5} on the sweep's quadratic (0 diverged
            with a constant delay).
        margin: required decay per step, in [0, 1).
        criterion: ``"mean_square"`` (random delays, the default) or ``"mean_field"``
            (optimistic for random delays: it diverged on the quadratic from M = 8).
        window: staleness observations kept (see
            :class:`~asyncmomentum.core.tuning.delayed_heavy_ball.StalenessHistogram`).
        max_staleness: the histogram's cap.
        tail_mass: see :func:`~asyncmomentum.core.tuning.delayed_heavy_ball.truncate_pmf`.
        refresh: observations between checks of the histogram, once warm.
        pmf_tolerance: total-variation change of the pmf that invalidates the cache.
        min_observations: observations before the rule speaks.
        grid_step: scan spacing of
            :func:`~asyncmomentum.core.tuning.delayed_heavy_ball.largest_stable_momentum`.
    """

    name: ClassVar[str] = "stability"
    uses_curvature: ClassVar[bool] = True
    needs_lr: ClassVar[bool] = True
    stateful: ClassVar[bool] = True

    def __init__(
        self,
        *,
        curvature_margin: float = 0.25,
        margin: float = 0.0,
        criterion: Criterion = "mean_square",
        window: int = 1024,
        max_staleness: int = 1024,
        tail_mass: float = DEFAULT_TAIL_MASS,
        refresh: int = 256,
        pmf_tolerance: float = 0.02,
        min_observations: int = 1,
        grid_step: float = 0.05,
    ) -> None:
        below_one: dict[str, Any] = {"minimum": 0.0, "maximum": 1.0, "max_inclusive": False}
        self.curvature_margin = check_real(curvature_margin, "curvature_margin", minimum=0.0)
        self.margin = check_real(margin, "margin", **below_one)
        self.criterion = check_choice(criterion, "criterion", CRITERIA)
        self.tail_mass = check_real(tail_mass, "tail_mass", **below_one)
        self.refresh = check_int(refresh, "refresh", 1)
        self.pmf_tolerance = check_real(pmf_tolerance, "pmf_tolerance", minimum=0.0, maximum=1.0)
        self.min_observations = check_int(min_observations, "min_observations", 1)
        self.grid_step = check_real(grid_step, "grid_step", minimum=0.0, min_inclusive=False)
        self.histogram = StalenessHistogram(window, max_staleness)
        self._curvature: float | None = None
        self._pmf: np.ndarray | None = None
        self._checked_at = -1
        self._cache: dict[tuple[float, int, tuple[float, float]], float] = {}
        self.computations = 0

    # -- inputs ---------------------------------------------------------------------------------

    def observe(self, tau: int) -> None:
        """Record the staleness of one applied gradient.

        Args:
            tau: updates applied between the gradient's read and its application (>= 0).
        """
        self.histogram.observe(tau)

    def observe_curvature(self, lambda_max: float) -> None:
        """Set the current estimate of the largest Hessian eigenvalue (not times ``lr``).

        Args:
            lambda_max: largest curvature of the loss (>= 0), e.g. ``CurvatureEstimator.value``.
        """
        self._curvature = check_real(lambda_max, "lambda_max", minimum=0.0)

    @property
    def curvature(self) -> float | None:
        """The current estimate of ``lambda_max``, ``None`` until :meth:`observe_curvature`."""
        return self._curvature

    @property
    def ready(self) -> bool:
        """Whether the rule has a curvature and enough staleness observations to speak."""
        return self._curvature is not None and self.histogram.count >= self.min_observations

    # -- output ---------------------------------------------------------------------------------

    def algorithmic_momentum(
        self,
        target: float,
        implicit: float,
        *,
        lr: float | None = None,
        bounds: tuple[float, float] = formulas.DEFAULT_MOMENTUM_BOUNDS,
    ) -> float:
        """Largest stable algorithmic momentum for ``a = lr * lambda_max``, capped by ``target``.

        Until the rule is :attr:`ready`: the additive rule's ``target - implicit``, clipped.

        Args:
            target: the total momentum the user wants: the cap of the result, in (-1, 1).
            implicit: the implicit momentum of the asynchrony (for the additive fallback).
            lr: the learning rate of the parameter group (>= 0); required.
            bounds: ``(low, high)``: the floor of the result, and a ceiling under the target.
        """
        if lr is None:
            raise ValueError(
                "rule='stability' needs the learning rate: algorithmic_momentum(target, lr=...)"
            )
        target = check_momentum(target)
        lr = check_real(lr, "lr", minimum=0.0, allow_tensor=True)
        if not self.ready:
            return formulas.clip_momentum(formulas.additive_momentum(target, implicit), bounds)
        return self.bound_at(lr * self._curvature, target, bounds)  # type: ignore[operator]

    def bound_at(self, a: float, target: float, bounds: tuple[float, float]) -> float:
        """The largest stable momentum at ``a``, capped by ``target``, for the histogram now.

        Computed once per ``a`` (to about 1 %), target and bounds while the histogram holds
        still (:meth:`algorithmic_momentum`'s cache). The inputs are not checked: this is the
        per-step path of a caller that has (the auto rule); the rule must have observations.

        Args:
            a: ``lr * lambda`` (>= 0).
            target: the cap, in (-1, 1).
            bounds: ``(low, high)``, checked.
        """
        self._refresh_pmf()
        key = (round(target, 9), _bucket(a), bounds)
        cached = self._cache.get(key)
        if cached is None:
            self.computations += 1
            low, high = bounds
            cached = self._cache[key] = largest_stable_momentum(
                a,
                self._pmf,
                cap=max(min(target, high), low),
                floor=low,
                margin=self.margin,
                curvature_margin=self.curvature_margin,
                criterion=self.criterion,
                tail_mass=0.0,  # the histogram's pmf is already truncated
                grid_step=self.grid_step,
            )
        return cached

    def _refresh_pmf(self) -> None:
        """Re-read the histogram; drop the cache if it moved.

        The histogram is re-read at doubling counts, then every ``refresh`` observations.
        """
        count = self.histogram.count
        # Early on the histogram changes fast (and starts from the short delays of start-up):
        # check at doubling counts until `refresh` observations apart.
        if self._pmf is not None and count - self._checked_at < min(self.refresh, self._checked_at):
            return
        self._checked_at = count
        pmf = self.histogram.pmf(self.tail_mass)
        if (
            self._pmf is None
            or pmf is None
            or _total_variation(pmf, self._pmf) > self.pmf_tolerance
        ):
            self._pmf = pmf
            self._cache.clear()

    # -- lifecycle ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The histogram's observations and the curvature (the cache is rebuilt on demand)."""
        return {
            "format": STATE_FORMAT,
            "histogram": self.histogram.state_dict(),
            "curvature": self._curvature,
        }

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can take ``state_dict``.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        check_state(
            state_dict,
            "StabilityRule",
            expected_format=STATE_FORMAT,
            keys=("histogram", "curvature"),
        )
        curvature = state_dict["curvature"]
        if curvature is not None:
            try:
                check_real(curvature, "curvature", minimum=0.0)
            except ValueError as error:
                raise ValueError(f"StabilityRule state is corrupt: {error}") from None
        histogram = self.histogram
        StalenessHistogram(histogram.window, histogram.max_staleness).load_state_dict(
            state_dict["histogram"]
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a bad state raises and changes nothing.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        self.check_state_dict(state_dict)
        self.reset()
        self.histogram.load_state_dict(state_dict["histogram"])
        curvature = state_dict["curvature"]
        self._curvature = None if curvature is None else float(curvature)

    def reset(self) -> None:
        """Forget the observed staleness, the curvature and the cache."""
        self.histogram.reset()
        self._curvature = None
        self._pmf = None
        self._checked_at = -1
        self._cache.clear()
        self.computations = 0

    def __repr__(self) -> str:
        return (
            f"StabilityRule(curvature={self._curvature}, histogram={self.histogram!r}, "
            f"curvature_margin={self.curvature_margin}, criterion={self.criterion!r})"
        )


def _bucket(a: float) -> int:
    """``a`` to about 1 % (log scale); 0 and tiny values share one bucket."""
    return -(10**9) if a < 1e-12 else round(math.log(a) / math.log(1.01))


def _total_variation(p: np.ndarray, q: np.ndarray) -> float:
    size = max(p.size, q.size)
    return 0.5 * float(np.abs(np.pad(p, (0, size - p.size)) - np.pad(q, (0, size - q.size))).sum())
