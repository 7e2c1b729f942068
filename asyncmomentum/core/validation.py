"""The package's one set of argument checks.

Each check returns the value, normalized (``int``, ``float``, a tuple), or raises ``ValueError``
with a message that names the argument and the range it allows; none coerces a string or
accepts a bool as a number. Every module of the package checks its arguments with these, so
that one kind of argument is refused the same way, with the same words, everywhere.
Depends on the standard library and torch only.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Collection, Iterable
from typing import Any, TypeVar

import torch

__all__ = [
    "MAX_COUNT",
    "check_bool",
    "check_choice",
    "check_int",
    "check_momentum",
    "check_momentum_bounds",
    "check_positive",
    "check_real",
    "check_staleness",
    "check_state",
]

#: Largest staleness, clock version or observation count accepted. The package keeps them in
#: int64 tensors; a value below ``2**62`` leaves room to add to it without overflowing.
MAX_COUNT: int = 2**62 - 1

_T = TypeVar("_T")


def _text(number: float) -> str:
    """A bound as the messages write it: ``1`` not ``1.0``."""
    return f"{number:g}"


def check_int(value: Any, name: str, minimum: int, *, maximum: int | None = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer (not a bool) in range, else raise.

    Args:
        value: a count, size, period, seed or rank given by a caller.
        name: the argument's name, for the message.
        minimum: the smallest allowed value.
        maximum: the largest allowed value (``None``: no limit).
    """
    valid = not isinstance(value, bool) and isinstance(value, numbers.Integral)
    if valid and value >= minimum and (maximum is None or value <= maximum):
        return int(value)
    if maximum is None:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}")


def _describe_range(
    minimum: float | None,
    maximum: float | None,
    finite: bool,
    min_inclusive: bool,
    max_inclusive: bool,
) -> str:
    """``"a finite number >= 0"``, ``"a number in (0, 1]"``, ...: the allowed range in words."""
    if minimum is not None and maximum is not None:
        low = "[" if min_inclusive else "("
        high = "]" if max_inclusive else ")"
        return f"a number in {low}{_text(minimum)}, {_text(maximum)}{high}"
    kind = "a finite number" if finite else "a number"
    if minimum is not None:
        return f"{kind} {'>=' if min_inclusive else '>'} {_text(minimum)}"
    if maximum is not None:
        return f"{kind} {'<=' if max_inclusive else '<'} {_text(maximum)}"
    return kind


def check_real(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    finite: bool = True,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
    allow_tensor: bool = False,
) -> float:
    """Return ``value`` as a ``float`` if it is a real number in range, else raise.

    Bools and strings are refused (``lr="0.1"`` is a mistake, not a number); NaN always is.

    Args:
        value: the number given by a caller.
        name: the argument's name, for the message.
        minimum: the smallest allowed value (``None``: no lower limit).
        maximum: the largest allowed value (``None``: no upper limit).
        finite: refuse ``inf`` and ``-inf``.
        min_inclusive: ``minimum`` itself is allowed (``False``: ``value > minimum``).
        max_inclusive: ``maximum`` itself is allowed (``False``: ``value < maximum``).
        allow_tensor: also accept a 1-element real tensor (as torch takes a tensor ``lr``).
    """
    if type(value) is float:  # the common case first: checks sit on hot paths
        number = value
    elif isinstance(value, torch.Tensor) and allow_tensor:
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(
                f"{name} must be a real number or a 1-element real tensor, got a "
                f"{value.dtype} tensor of shape {tuple(value.shape)}"
            )
        number = float(value.item())
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    else:
        number = float(value)
    if (
        math.isnan(number)
        or (finite and math.isinf(number))
        or (minimum is not None and (number < minimum if min_inclusive else number <= minimum))
        or (maximum is not None and (number > maximum if max_inclusive else number >= maximum))
    ):
        allowed = _describe_range(minimum, maximum, finite, min_inclusive, max_inclusive)
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def check_positive(
    value: Any, name: str, *, integer: bool = False, optional: bool = False
) -> int | float | None:
    """Return ``value`` if it is a finite number (or an integer) ``> 0``; else raise.

    ``None`` is returned as it is where allowed (``optional=True``).

    Args:
        value: a limit, period or timeout given by a caller.
        name: the argument's name, for the message.
        integer: require an integer (bools refused) and return an ``int``; else a ``float``.
        optional: accept ``None`` (no limit) and return it.
    """
    if value is None and optional:
        return None
    try:
        if integer:
            return check_int(value, name, 1)
        return check_real(value, name, minimum=0.0, min_inclusive=False)
    except ValueError:
        kind = "an integer" if integer else "a finite number"
        alternative = " or None" if optional else ""
        raise ValueError(f"{name} must be {kind} > 0{alternative}, got {value!r}") from None


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (not 0, 1 or a string), else raise.

    Args:
        value: a flag given by a caller.
        name: the argument's name, for the message.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(value: _T, name: str, choices: Collection[Any]) -> _T:
    """Return ``value`` if it is one of ``choices``, else raise.

    Args:
        value: a name given by a caller (a rule, a backend, a criterion, ...).
        name: the argument's name, for the message.
        choices: the allowed values (a tuple, a list, or a dict's keys).
    """
    try:
        known = value in choices
    except TypeError:  # an unhashable value cannot be a key of a dict of choices
        known = False
    if not known:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_staleness(tau: Any) -> int:
    """Return ``tau`` as an ``int`` if it is an integer in ``[0, MAX_COUNT]``, else raise.

    A 1-element integer tensor is taken as its value; bools, floats and strings are refused.

    Args:
        tau: number of updates applied between a worker's read and its write-back.
    """
    if isinstance(tau, torch.Tensor) and tau.numel() == 1 and not tau.is_floating_point():
        tau = tau.item()
    if isinstance(tau, bool):
        raise ValueError(f"staleness must be a non-negative integer, got {tau!r}")
    try:
        as_int = operator.index(tau)
    except TypeError:
        raise ValueError(
            f"staleness must be a non-negative integer (updates between read and write), "
            f"got {tau!r} of type {type(tau).__name__}"
        ) from None
    if as_int < 0:
        raise ValueError(
            f"staleness must be a non-negative integer, got {as_int}; a gradient cannot be "
            "computed from parameters newer than the ones it is applied to"
        )
    if as_int > MAX_COUNT:
        raise ValueError(
            f"staleness must be a non-negative integer <= {MAX_COUNT} (2**62 - 1), got "
            f"{as_int}; no run applies that many updates"
        )
    return as_int


def check_momentum(value: Any, name: str = "target_momentum") -> float:
    """Return ``value`` as a float if it is a number in the open interval (-1, 1), else raise.

    Bools and strings are refused.

    Args:
        value: a momentum.
        name: the argument's name, for the message.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number in (-1, 1), got {value!r}")
    as_float = float(value)
    if not -1.0 < as_float < 1.0:
        raise ValueError(
            f"{name} must lie in the open interval (-1, 1), got {value!r}; "
            "momentum 1 never forgets a gradient and diverges"
        )
    return as_float


def check_momentum_bounds(bounds: Any) -> tuple[float, float]:
    """Return ``bounds`` as a float pair ``(low, high)`` with ``-1 < low <= high < 1``, else raise.

    Args:
        bounds: clip range of the algorithmic momentum.
    """
    try:
        low, high = bounds
    except (TypeError, ValueError):
        low = high = None
    if not all(not isinstance(b, bool) and isinstance(b, numbers.Real) for b in (low, high)):
        raise ValueError(
            f"momentum_bounds must be a pair (low, high) inside (-1, 1), got {bounds!r}"
        )
    low, high = float(low), float(high)
    if not (-1.0 < low < 1.0 and -1.0 < high < 1.0):
        raise ValueError(
            f"momentum_bounds must lie inside the open interval (-1, 1), got {bounds!r}"
        )
    if low > high:
        raise ValueError(f"momentum_bounds must be (low, high) with low <= high, got {bounds!r}")
    return low, high


def check_state(
    state_dict: Any,
    owner: str,
    *,
    expected_format: int = 1,
    keys: Iterable[str] = (),
) -> None:
    """Raise ``ValueError`` unless ``state_dict`` is a dict of ``expected_format`` with ``keys``.

    The one check every ``load_state_dict`` of the package runs before it changes anything.

    Args:
        state_dict: what was passed to ``owner.load_state_dict``.
        owner: the class name, for the message.
        expected_format: the layout version ``owner`` reads.
        keys: entries the state must have.
    """
    if not isinstance(state_dict, dict) or "format" not in state_dict:
        raise ValueError(
            f"{owner}.load_state_dict expects a dict from {owner}.state_dict(), got "
            f"{type(state_dict).__name__}; was this checkpoint written by another program?"
        )
    if state_dict["format"] != expected_format:
        raise ValueError(
            f"{owner} state has format {state_dict['format']!r} but this version of asyncmomentum "
            f"reads format {expected_format}; load it with the asyncmomentum version that wrote "
            "it, or start afresh"
        )
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise ValueError(f"{owner} state is missing {missing}; was it written by another class?")
