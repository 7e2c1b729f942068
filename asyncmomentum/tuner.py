"""MomentumTuner: the one object that turns staleness observations into a momentum.

The optimizer owns one; the Lightning callback drives one against any optimizer. Neither
re-derives a formula: the math is in :mod:`asyncmomentum.tuning`, the estimate in
:class:`~asyncmomentum.staleness.StalenessEstimator`.
"""

from __future__ import annotations

from typing import Any

from asyncmomentum import tuning
from asyncmomentum.staleness import StalenessEstimator

__all__ = ["MomentumTuner"]


class MomentumTuner:
    """Staleness in, algorithmic momentum out.

    Args:
        target_momentum: total momentum to aim for, in (-1, 1).
        rule: a name in :data:`asyncmomentum.tuning.RULES`.
        momentum_bounds: ``(low, high)`` clip range of the algorithmic momentum, inside (-1, 1).
        workers: known number of workers; skips estimation.
        horizon: span of the staleness moving average, in updates.
        warmup: observations before the estimate leaves ``M = 1``.

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
        momentum_bounds: tuple[float, float] = tuning.DEFAULT_MOMENTUM_BOUNDS,
        workers: float | None = None,
        horizon: int = 1000,
        warmup: int = 20,
    ) -> None:
        self.target_momentum = tuning.check_momentum(target_momentum)
        self.rule = tuning.check_rule(rule)
        self.momentum_bounds = tuning.check_momentum_bounds(momentum_bounds)
        self.estimator = StalenessEstimator(horizon=horizon, warmup=warmup, workers=workers)

    def observe(self, tau: int) -> None:
        """Record the staleness of one applied gradient.

        Args:
            tau: updates applied between the gradient's read and its application (>= 0).
        """
        self.estimator.observe(tau)

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

    def algorithmic_momentum(self, target: float | None = None) -> float:
        """Momentum to apply so that the total is ``target`` (default: this tuner's target).

        Args:
            target: a total momentum in (-1, 1), for a parameter group with its own target.
        """
        return tuning.algorithmic_momentum(
            self.target_momentum if target is None else target,
            self.implicit_momentum,
            self.rule,
            self.momentum_bounds,
        )

    def total_momentum(self, algorithmic: float) -> float:
        """Total momentum that ``algorithmic`` makes with the current implicit momentum.

        Args:
            algorithmic: the momentum an optimizer applies.
        """
        return tuning.total_momentum(algorithmic, self.implicit_momentum, self.rule)

    def share_memory(self) -> MomentumTuner:
        """Put the estimate in shared memory for Hogwild processes; returns self."""
        self.estimator.share_memory()
        return self

    def state_dict(self) -> dict[str, Any]:
        """The estimator's observations (configuration stays the constructor's)."""
        return {"estimator": self.estimator.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore observations from :meth:`state_dict`.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        if not isinstance(state_dict, dict) or "estimator" not in state_dict:
            raise ValueError("MomentumTuner.load_state_dict expects a dict with an 'estimator'")
        self.estimator.load_state_dict(state_dict["estimator"])

    def __repr__(self) -> str:
        return (
            f"MomentumTuner(target_momentum={self.target_momentum}, rule={self.rule!r}, "
            f"momentum_bounds={self.momentum_bounds}, estimated_workers="
            f"{self.estimated_workers:.3g})"
        )
