"""The compositional rule: ``1 - (1 - target) / (1 - implicit)``."""

from __future__ import annotations

from typing import ClassVar

from asyncmomentum.core import formulas
from asyncmomentum.core.tuning.rules.base import TuningRule

__all__ = ["CompositionalRule"]


class CompositionalRule(TuningRule):
    """Applies ``1 - (1 - target) / (1 - implicit)``, clipped.

    It matches the low-frequency gain, ``(1 - total) = (1 - algorithmic)(1 - implicit)``. No
    state, no options.
    """

    name: ClassVar[str] = "compositional"

    def algorithmic_momentum(
        self,
        target: float,
        implicit: float,
        *,
        lr: float | None = None,
        bounds: tuple[float, float] = formulas.DEFAULT_MOMENTUM_BOUNDS,
    ) -> float:
        """``1 - (1 - target) / (1 - implicit)`` clipped to ``bounds``.

        Args:
            target: the total momentum to reach.
            implicit: the implicit momentum of the asynchrony, below 1.
            lr: unused.
            bounds: ``(low, high)`` clip range of the result.
        """
        return formulas.clip_momentum(formulas.compositional_momentum(target, implicit), bounds)

    def total_momentum(self, algorithmic: float, implicit: float) -> float:
        """``1 - (1 - algorithmic)(1 - implicit)``.

        Args:
            algorithmic: the momentum an optimizer applies.
            implicit: the implicit momentum of the asynchrony.
        """
        return formulas.compositional_total(algorithmic, implicit)
