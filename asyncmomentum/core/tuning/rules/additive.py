"""The additive rule: ``target - (1 - 1/M_hat)``, the default."""

from __future__ import annotations

from typing import ClassVar

from asyncmomentum.core import formulas
from asyncmomentum.core.tuning.rules.base import TuningRule

__all__ = ["AdditiveRule"]


class AdditiveRule(TuningRule):
    """Applies ``target - implicit``, clipped: totals compose as ``algorithmic + implicit``.

    The first-order match of the expected recurrence of asynchronous SGD (Mitliagkas et al.,
    2016). Under high asynchrony the result is negative: the optimizer removes momentum.
    No state, no options.
    """

    name: ClassVar[str] = "additive"

    def algorithmic_momentum(
        self,
        target: float,
        implicit: float,
        *,
        lr: float | None = None,
        bounds: tuple[float, float] = formulas.DEFAULT_MOMENTUM_BOUNDS,
    ) -> float:
        """``target - implicit`` clipped to ``bounds``.

        Args:
            target: the total momentum to reach.
            implicit: the implicit momentum of the asynchrony.
            lr: unused.
            bounds: ``(low, high)`` clip range of the result.
        """
        return formulas.clip_momentum(formulas.additive_momentum(target, implicit), bounds)

    def total_momentum(self, algorithmic: float, implicit: float) -> float:
        """``algorithmic + implicit``.

        Args:
            algorithmic: the momentum an optimizer applies.
            implicit: the implicit momentum of the asynchrony.
        """
        return formulas.additive_total(algorithmic, implicit)
