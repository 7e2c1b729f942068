"""The tuning rules, and the one registry that names them.

Each rule is a :class:`~asyncmomentum.core.tuning.rules.base.TuningRule` in a file of its own;
:data:`RULES` maps names to classes. Adding a rule is that file plus one line below (or a call
to :func:`register_rule`), and every user of rule names (``AsynchronyTracker(rule=...)``,
``AsyncMomentumSGD(rule=...)``, the sweep, the command lines) sees it. Nobody compares rule
names: ask the rule (or its class) for its capability flags instead.
"""

from __future__ import annotations

import inspect
from typing import Any

from asyncmomentum.core import formulas
from asyncmomentum.core.tuning.rules.additive import AdditiveRule
from asyncmomentum.core.tuning.rules.auto import AutoRule
from asyncmomentum.core.tuning.rules.base import TuningRule
from asyncmomentum.core.tuning.rules.closed_loop import ClosedLoopController, ClosedLoopRule
from asyncmomentum.core.tuning.rules.compositional import CompositionalRule
from asyncmomentum.core.tuning.rules.stability import StabilityRule
from asyncmomentum.core.validation import check_choice, check_momentum, check_momentum_bounds

__all__ = [
    "DEFAULT_RULE",
    "RULES",
    "AdditiveRule",
    "AutoRule",
    "ClosedLoopController",
    "ClosedLoopRule",
    "CompositionalRule",
    "StabilityRule",
    "TuningRule",
    "algorithmic_momentum",
    "make_rule",
    "register_rule",
    "rule_class",
    "rule_names",
    "total_momentum",
]

#: Every rule by name, in the order the sweep and the command lines list them.
RULES: dict[str, type[TuningRule]] = {
    AdditiveRule.name: AdditiveRule,
    CompositionalRule.name: CompositionalRule,
    ClosedLoopRule.name: ClosedLoopRule,
    StabilityRule.name: StabilityRule,
    AutoRule.name: AutoRule,
}

#: The rule a tracker uses unless told otherwise.
DEFAULT_RULE: str = AdditiveRule.name


def rule_names() -> tuple[str, ...]:
    """Every registered rule's name, in registration order."""
    return tuple(RULES)


def register_rule(cls: type[TuningRule], *, replace: bool = False) -> type[TuningRule]:
    """Add a rule class to :data:`RULES` under its ``name``; returns the class (a decorator).

    Args:
        cls: a concrete subclass of :class:`TuningRule` with a non-empty ``name``.
        replace: allow replacing a registered rule of the same name.
    """
    if not (isinstance(cls, type) and issubclass(cls, TuningRule)):
        raise ValueError(f"a rule must be a subclass of TuningRule, got {cls!r}")
    if inspect.isabstract(cls):
        raise ValueError(f"{cls.__name__} is abstract: it must implement algorithmic_momentum")
    if not (isinstance(cls.name, str) and cls.name):
        raise ValueError(f"{cls.__name__} needs a class attribute `name`, a non-empty string")
    if cls.name in RULES and RULES[cls.name] is not cls and not replace:
        raise ValueError(
            f"a rule named {cls.name!r} is registered already ({RULES[cls.name].__name__}); "
            "pass replace=True to replace it"
        )
    RULES[cls.name] = cls
    return cls


def rule_class(name: str) -> type[TuningRule]:
    """The registered class of the rule ``name`` (for its flags without building one).

    Args:
        name: a name in :func:`rule_names`.
    """
    return RULES[check_choice(name, "rule", RULES)]


def make_rule(rule: str | TuningRule, **options: Any) -> TuningRule:
    """A rule object: a new one of the registered class ``rule`` built with ``options``.

    Or ``rule`` itself, if it is a rule object already.

    Args:
        rule: a name in :func:`rule_names`, or a :class:`TuningRule` (used as it is).
        **options: keyword arguments of the rule's constructor (e.g. ``gain`` for
            ``"closed_loop"``, ``curvature_margin`` for ``"stability"``); none for an object.
    """
    if isinstance(rule, TuningRule):
        if options:
            raise ValueError(
                f"options {sorted(options)} configure a rule given by name; this rule is an "
                f"object already ({rule!r}): configure it when you build it"
            )
        return rule
    cls = rule_class(rule)
    signature = inspect.signature(cls)
    try:
        signature.bind(**options)
    except TypeError as error:
        accepted = [
            p.name
            for p in signature.parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        raise ValueError(
            f"rule_options for {rule!r}: {error}; it takes {accepted or 'none'}"
        ) from None
    return cls(**options)


def algorithmic_momentum(
    target: float,
    implicit: float,
    rule: str | TuningRule = DEFAULT_RULE,
    bounds: tuple[float, float] = formulas.DEFAULT_MOMENTUM_BOUNDS,
) -> float:
    """Algorithmic momentum that gives a total of ``target`` on top of ``implicit``, clipped.

    For the rules that keep no state (``"additive"``: ``target - implicit``, the default;
    ``"compositional"``: ``1 - (1 - target) / (1 - implicit)``). Under high asynchrony the
    result is negative: the optimizer must *remove* momentum.

    Args:
        target: the total momentum the user wants, in (-1, 1).
        implicit: the implicit momentum of the asynchrony, in [0, 1).
        rule: a rule without state, by name or as an object.
        bounds: ``(low, high)`` clip range of the result.
    """
    instance = make_rule(rule)
    if instance.stateful:
        raise ValueError(
            f"rule {instance.name!r} is not a formula of (target, implicit momentum): it keeps "
            "state. Use asyncmomentum.AsynchronyTracker or AsyncMomentumSGD(rule=...) for it"
        )
    target = check_momentum(target)
    bounds = check_momentum_bounds(bounds)
    return instance.algorithmic_momentum(target, implicit, bounds=bounds)


def total_momentum(
    algorithmic: float, implicit: float, rule: str | TuningRule = DEFAULT_RULE
) -> float:
    """Total momentum that ``algorithmic`` and ``implicit`` compose to under ``rule``.

    Equals the target unless the algorithmic momentum was clipped.

    Args:
        algorithmic: the momentum the optimizer applies.
        implicit: the implicit momentum of the asynchrony.
        rule: a rule, by name or as an object (the feedback rules compose additively).
    """
    return make_rule(rule).total_momentum(algorithmic, implicit)
