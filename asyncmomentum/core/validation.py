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
    "check_loss",
    "check_momentum",
    "check_momentum_bounds",
    "check_positive",
    "check_real",
    "check_staleness",
    "check_state",
    "check_state_tensor",
    "check_optimizer_state",
    "is_loss",
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


def is_loss(value: Any) -> bool:
    """Whether ``value`` can be read as a training loss.

    A real number, or a one-element floating-point tensor (not read here, so that checking a
    CUDA loss costs no synchronization).

    Args:
        value: the candidate.
    """
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and value.is_floating_point()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_loss(value: Any) -> float | torch.Tensor:
    """Return ``value`` if :func:`is_loss` takes it, else raise ``ValueError``.

    Args:
        value: the training loss of a batch.
    """
    if not is_loss(value):
        raise ValueError(
            "loss must be a real number or a one-element floating-point tensor (the batch's "
            f"training loss), got {value!r} of type {type(value).__name__}"
        )
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


def check_state_tensor(
    reference: torch.Tensor, value: Any, name: str, *, reducible: bool = False
) -> None:
    """Raise ``ValueError`` unless ``value`` can be loaded as the state of ``reference``.

    The dtype rule follows what torch does on load: a floating tensor is cast to the
    floating dtype of ``reference`` (``float16`` state into a ``float32`` parameter is fine), so
    any floating ``value`` is accepted for a floating ``reference``; torch does not cast any
    other kind, so an integer, bool or complex ``reference`` needs ``value`` of exactly its
    dtype (a complex state is never accepted for a real parameter, nor the reverse). The
    device is not checked: torch moves the state to the parameter's device.

    Args:
        reference: the parameter (or model tensor) the state belongs to.
        value: the saved state.
        name: what ``value`` is, for the message (``"the momentum buffer of parameter 3"``).
        reducible: also accept a 0-d tensor, and a tensor with ``reference``'s number of
            dimensions whose every size is ``reference``'s or 1 (the factored statistics of
            Adafactor); else the shape must be ``reference``'s exactly.
    """
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(value).__name__}")
    shape, expected = tuple(value.shape), tuple(reference.shape)
    if shape != expected and not (reducible and _reduces(shape, expected)):
        raise ValueError(
            f"{name} has shape {shape}, but its parameter has shape {expected}: this state "
            "belongs to another model"
        )
    if reference.is_floating_point():
        kind_matches = value.is_floating_point()
    else:
        kind_matches = value.dtype == reference.dtype
    if not kind_matches:
        raise ValueError(
            f"{name} has dtype {value.dtype}, which cannot be loaded for a {reference.dtype} "
            "parameter (floating state is cast to a floating parameter's dtype; any other "
            "dtype must match exactly)"
        )
    if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} holds NaN or inf")


def _reduces(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Whether ``shape`` is 0-d or ``expected`` with some sizes reduced to 1."""
    if not shape:
        return True
    return len(shape) == len(expected) and all(
        size in (full, 1) for size, full in zip(shape, expected, strict=True)
    )


def _saved_params(
    optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> dict[Any, torch.Tensor]:
    """Map the saved parameter ids of ``state_dict`` to ``optimizer``'s parameters, or raise."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise ValueError("this optimizer state_dict has no list of 'param_groups' dicts")
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"this optimizer state_dict has {len(groups)} parameter groups, the optimizer "
            f"{len(optimizer.param_groups)}"
        )
    params: dict[Any, torch.Tensor] = {}
    for index, (saved, group) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        ids = saved.get("params")
        valid = isinstance(ids, list) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        )
        if not valid or len(ids) != len(group["params"]):
            found = len(ids) if isinstance(ids, list) else repr(ids)
            raise ValueError(
                f"param group {index} of this optimizer state_dict has params {found}, the "
                f"optimizer's group {len(group['params'])}: it belongs to another model"
            )
        params.update(zip(ids, group["params"], strict=True))
    if len(params) != sum(len(g["params"]) for g in groups):
        raise ValueError("this optimizer state_dict lists a parameter id twice")
    return params


def _check_group_values(
    optimizer: torch.optim.Optimizer, index: int, saved: dict[str, Any]
) -> None:
    """Check the hyper-parameters of a saved group against the types of the defaults."""
    for key, default in optimizer.defaults.items():
        if key not in saved or default is None:
            continue
        name = f"{key!r} of param group {index}"
        value = saved[key]
        if isinstance(default, bool):
            check_bool(value, name)
        elif isinstance(default, (numbers.Real, torch.Tensor)):
            number = check_real(value, name, allow_tensor=True)
            if key == "lr" and number < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        elif isinstance(default, tuple):
            if not isinstance(value, (tuple, list)) or len(value) != len(default):
                raise ValueError(f"{name} must be a {len(default)}-tuple, got {value!r}")
            for item, default_item in zip(value, default, strict=True):
                if item is not None or default_item is not None:  # Adafactor's eps=(None, ..)
                    check_real(item, name, allow_tensor=True)


def check_optimizer_state(
    optimizer: torch.optim.Optimizer,
    state_dict: Any,
    *,
    exact: Collection[str] = (),
    check_groups: bool = True,
) -> None:
    """Raise ``ValueError`` unless ``optimizer.load_state_dict(state_dict)`` is safe.

    Changes nothing.

    Checks what torch's own load does not: every state entry belongs to a parameter, every
    state tensor fits its parameter (:func:`check_state_tensor`) and holds no NaN or inf, and
    (``check_groups``) every saved hyper-parameter has the type of the optimizer's default and
    a finite value. Tensors nested in lists or dicts are checked for finiteness only; so are
    all state tensors of :class:`torch.optim.LBFGS`, whose state is not per parameter.

    Args:
        optimizer: the optimizer about to load ``state_dict``.
        state_dict: a dict returned by ``state_dict()`` of an optimizer of the same class.
        exact: state keys whose values must be ``None`` or tensors of their parameter's shape
            exactly; other tensors may be 0-d or reduced (see ``reducible`` of
            :func:`check_state_tensor`).
        check_groups: check the hyper-parameters of the groups (off where the optimizer
            checks them itself).
    """
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
        raise ValueError(
            "an optimizer state_dict is a dict with a 'state' dict and 'param_groups', got "
            f"{type(state_dict).__name__}"
        )
    params = _saved_params(optimizer, state_dict)
    if check_groups:
        for index, saved in enumerate(state_dict["param_groups"]):
            _check_group_values(optimizer, index, saved)
    per_parameter = not isinstance(optimizer, torch.optim.LBFGS)
    for key, entry in state_dict["state"].items():
        if key not in params:
            raise ValueError(
                f"this optimizer state_dict has state for parameter {key!r}, which none of its "
                "param groups lists"
            )
        if not isinstance(entry, dict):
            raise ValueError(
                f"the state of parameter {key} must be a dict, got {type(entry).__name__}"
            )
        for name, value in entry.items():
            where = f"the {name!r} state of parameter {key}"
            if name in exact and value is not None:  # a tensor of the parameter's shape
                check_state_tensor(params[key], value, where)
            elif isinstance(value, torch.Tensor) and per_parameter:
                check_state_tensor(params[key], value, where, reducible=True)
            else:
                _check_finite_within(value, where)


def _check_finite_within(value: Any, name: str) -> None:
    """Raise ``ValueError`` if a tensor or float in ``value`` (or nested in it) is not finite."""
    if isinstance(value, torch.Tensor):
        if (value.is_floating_point() or value.is_complex()) and not bool(
            torch.isfinite(value).all()
        ):
            raise ValueError(f"{name} holds NaN or inf")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{name} is {value}")
    elif isinstance(value, dict):
        for item in value.values():
            _check_finite_within(item, name)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_finite_within(item, name)
