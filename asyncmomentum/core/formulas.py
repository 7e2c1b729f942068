"""Pure math of asynchrony-aware momentum: no state, no tensors.

Asynchronous SGD with ``M`` workers behaves, in expectation, like synchronous SGD with an extra
*implicit* momentum ``1 - 1/M`` (Mitliagkas et al., 2016, "Asynchrony begets Momentum"). A user
tunes one *total* momentum; the optimizer applies the *algorithmic* momentum that, composed with
the implicit one, gives that total. Every other module asks this one; none re-derives a formula.
The tuning rules (:mod:`asyncmomentum.core.tuning.rules`) are objects that call these functions.
Arguments are checked with :mod:`asyncmomentum.core.validation`.
"""

from __future__ import annotations

from asyncmomentum.core.validation import check_real

__all__ = [
    "DEFAULT_MOMENTUM_BOUNDS",
    "additive_momentum",
    "additive_total",
    "clip_momentum",
    "compositional_momentum",
    "compositional_total",
    "implicit_momentum",
    "implicit_momentum_from_staleness",
    "workers_from_staleness",
]

#: Default clip range of the algorithmic momentum. The floor keeps a very high asynchrony from
#: asking for momentum -1 (which cancels every second update); the ceiling keeps it below 1.
DEFAULT_MOMENTUM_BOUNDS: tuple[float, float] = (-0.9, 0.99)


def implicit_momentum(workers: float) -> float:
    """Implicit momentum ``1 - 1/M`` that ``M`` asynchronous workers add.

    Args:
        workers: number of asynchronous workers ``M`` (>= 1; fractional values are estimates).
    """
    return 1.0 - 1.0 / check_real(workers, "workers", minimum=1.0)


def workers_from_staleness(mean_staleness: float) -> float:
    """Number of workers ``M = 1 + E[tau]`` implied by a mean staleness.

    Geometric staleness ``P(tau = l) = (1 - q) q^l`` with ``q = 1 - 1/M`` has mean ``M - 1``.

    Args:
        mean_staleness: mean number of updates applied between a read and its write-back (>= 0).
    """
    return 1.0 + check_real(mean_staleness, "mean_staleness", minimum=0.0)


def implicit_momentum_from_staleness(mean_staleness: float) -> float:
    """Implicit momentum ``E[tau] / (1 + E[tau])`` implied by a mean staleness.

    Args:
        mean_staleness: mean observed staleness (>= 0).
    """
    return implicit_momentum(workers_from_staleness(mean_staleness))


def additive_momentum(target: float, implicit: float) -> float:
    """Algorithmic momentum of the additive rule: ``target - implicit`` (unclipped).

    The first-order match of the expected recurrence: ``total = algorithmic + implicit``.

    Args:
        target: the total momentum to reach.
        implicit: the implicit momentum of the asynchrony.
    """
    return target - implicit


def additive_total(algorithmic: float, implicit: float) -> float:
    """Total momentum of the additive composition: ``algorithmic + implicit``.

    Args:
        algorithmic: the momentum an optimizer applies.
        implicit: the implicit momentum of the asynchrony.
    """
    return algorithmic + implicit


def compositional_momentum(target: float, implicit: float) -> float:
    """Algorithmic momentum of the compositional rule: ``1 - (1 - target) / (1 - implicit)``.

    Matches the low-frequency gain: ``(1 - target) = (1 - algorithmic) (1 - implicit)``.

    Args:
        target: the total momentum to reach.
        implicit: the implicit momentum of the asynchrony, below 1.
    """
    return 1.0 - (1.0 - target) / (1.0 - implicit)


def compositional_total(algorithmic: float, implicit: float) -> float:
    """Total momentum of the compositional composition: ``1 - (1 - algorithmic)(1 - implicit)``.

    Args:
        algorithmic: the momentum an optimizer applies.
        implicit: the implicit momentum of the asynchrony.
    """
    return 1.0 - (1.0 - algorithmic) * (1.0 - implicit)


def clip_momentum(momentum: float, bounds: tuple[float, float]) -> float:
    """``momentum`` clipped to ``bounds``.

    Args:
        momentum: an algorithmic momentum.
        bounds: ``(low, high)``, as
            :func:`~asyncmomentum.core.validation.check_momentum_bounds` returns them.
    """
    low, high = bounds
    return min(max(momentum, low), high)
