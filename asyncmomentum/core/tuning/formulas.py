"""Pure math of asynchrony-aware momentum: no state, no torch.

Asynchronous SGD with ``M`` workers behaves, in expectation, like synchronous SGD with an extra
*implicit* momentum ``1 - 1/M`` (Mitliagkas et al., 2016, "Asynchrony begets Momentum"). A user
tunes one *total* momentum; the optimizer applies the *algorithmic* momentum that, composed with
the implicit one, gives that total. Every other module asks this one; none re-derives a formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = [
    "DEFAULT_MOMENTUM_BOUNDS",
    "FEEDBACK_RULES",
    "RULES",
    "algorithmic_momentum",
    "check_momentum",
    "check_momentum_bounds",
    "check_rule",
    "composition_rule",
    "implicit_momentum",
    "implicit_momentum_from_staleness",
    "rule_names",
    "total_momentum",
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
    if not (workers >= 1.0) or math.isinf(workers):
        raise ValueError(f"workers must be a finite number >= 1, got {workers!r}")
    return 1.0 - 1.0 / workers


def workers_from_staleness(mean_staleness: float) -> float:
    """Number of workers ``M = 1 + E[tau]`` implied by a mean staleness.

    Geometric staleness ``P(tau = l) = (1 - q) q^l`` with ``q = 1 - 1/M`` has mean ``M - 1``.

    Args:
        mean_staleness: mean number of updates applied between a read and its write-back (>= 0).
    """
    if not (mean_staleness >= 0.0) or math.isinf(mean_staleness):
        raise ValueError(f"mean_staleness must be a finite number >= 0, got {mean_staleness!r}")
    return 1.0 + mean_staleness


def implicit_momentum_from_staleness(mean_staleness: float) -> float:
    """Implicit momentum ``E[tau] / (1 + E[tau])`` implied by a mean staleness.

    Args:
        mean_staleness: mean observed staleness (>= 0).
    """
    return implicit_momentum(workers_from_staleness(mean_staleness))


def _additive(target: float, implicit: float) -> float:
    # First-order match of the expected recurrence: total = algorithmic + implicit.
    return target - implicit


def _additive_total(algorithmic: float, implicit: float) -> float:
    return algorithmic + implicit


def _compositional(target: float, implicit: float) -> float:
    # Matches the low-frequency gain: (1 - target) = (1 - algorithmic) (1 - implicit).
    return 1.0 - (1.0 - target) / (1.0 - implicit)


def _compositional_total(algorithmic: float, implicit: float) -> float:
    return 1.0 - (1.0 - algorithmic) * (1.0 - implicit)


#: name -> (algorithmic from (target, implicit), total from (algorithmic, implicit))
RULES: dict[str, tuple[Callable[[float, float], float], Callable[[float, float], float]]] = {
    "additive": (_additive, _additive_total),
    "compositional": (_compositional, _compositional_total),
}


#: Rules that are not a formula of (target, implicit): they need state the
#: :class:`~asyncmomentum.core.tuning.tuner.MomentumTuner` keeps (``"closed_loop"``: feedback on
#: the measured
#: total momentum; ``"stability"``: the staleness histogram and a curvature estimate). Until
#: they have what they need they follow the additive rule, whose composition they also report.
FEEDBACK_RULES: tuple[str, ...] = ("closed_loop", "stability")


def rule_names() -> tuple[str, ...]:
    """Every rule a tuner accepts: the formulas of :data:`RULES`, then :data:`FEEDBACK_RULES`."""
    return (*RULES, *FEEDBACK_RULES)


def check_rule(rule: str, *, formulas_only: bool = False) -> str:
    """Return ``rule`` if it names a known tuning rule, else raise ``ValueError``.

    Args:
        rule: the rule's name, one of :func:`rule_names`.
        formulas_only: accept only the stateless formulas of :data:`RULES`.
    """
    known = tuple(RULES) if formulas_only else rule_names()
    if rule in known:
        return rule
    if rule in FEEDBACK_RULES:
        raise ValueError(
            f"rule {rule!r} is not a formula of (target, implicit momentum): it keeps state. "
            "Use asyncmomentum.MomentumTuner or AsyncMomentumSGD(rule=...) for it"
        )
    raise ValueError(f"rule must be one of {list(known)}, got {rule!r}")


def composition_rule(rule: str) -> str:
    """The formula under which ``rule`` composes algorithmic and implicit momentum.

    The feedback rules report their totals as the additive rule does (their fallback).

    Args:
        rule: a name in :func:`rule_names`.
    """
    return "additive" if check_rule(rule) in FEEDBACK_RULES else rule


def check_momentum(value: float, name: str = "target_momentum") -> float:
    """Return ``value`` as a float if it lies in the open interval (-1, 1), else raise.

    Args:
        value: a momentum.
        name: the argument's name, for the error message.
    """
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (-1, 1), got {value!r}") from None
    if not -1.0 < as_float < 1.0:
        raise ValueError(
            f"{name} must lie in the open interval (-1, 1), got {value!r}; "
            "momentum 1 never forgets a gradient and diverges"
        )
    return as_float


def check_momentum_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    """Return ``bounds`` as a float pair ``(low, high)`` with ``-1 < low <= high < 1``, else raise.

    Args:
        bounds: clip range of the algorithmic momentum.
    """
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(
            f"momentum_bounds must be a pair (low, high) inside (-1, 1), got {bounds!r}"
        ) from None
    if not (-1.0 < low < 1.0 and -1.0 < high < 1.0):
        raise ValueError(
            f"momentum_bounds must lie inside the open interval (-1, 1), got {bounds!r}"
        )
    if low > high:
        raise ValueError(f"momentum_bounds must be (low, high) with low <= high, got {bounds!r}")
    return low, high


def algorithmic_momentum(
    target: float,
    implicit: float,
    rule: str = "additive",
    bounds: tuple[float, float] = DEFAULT_MOMENTUM_BOUNDS,
) -> float:
    """Algorithmic momentum that gives a total of ``target`` on top of ``implicit``, clipped.

    Under high asynchrony the result is negative: the optimizer must *remove* momentum.

    Args:
        target: the total momentum the user wants, in (-1, 1).
        implicit: the implicit momentum of the asynchrony, in [0, 1).
        rule: ``"additive"`` (``target - implicit``, the default) or ``"compositional"``
            (``1 - (1 - target) / (1 - implicit)``).
        bounds: ``(low, high)`` clip range of the result.
    """
    solve, _ = RULES[check_rule(rule, formulas_only=True)]
    low, high = bounds
    return min(max(solve(target, implicit), low), high)


def total_momentum(algorithmic: float, implicit: float, rule: str = "additive") -> float:
    """Total momentum that ``algorithmic`` and ``implicit`` compose to under ``rule``.

    Equals the target unless the algorithmic momentum was clipped.

    Args:
        algorithmic: the momentum the optimizer applies.
        implicit: the implicit momentum of the asynchrony.
        rule: the tuning rule whose composition to use (see :func:`composition_rule`).
    """
    _, compose = RULES[composition_rule(rule)]
    return compose(algorithmic, implicit)
