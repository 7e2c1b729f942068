"""The server's checkpoints: the format it writes, and loading one after every check."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from asyncmomentum.core.validation import (
    MAX_COUNT,
    check_int,
    check_optimizer_state,
    check_state_tensor,
)

#: Layout version of the checkpoints the server writes.
CHECKPOINT_FORMAT = 1


class CheckpointInfo(NamedTuple):
    """What :func:`load_checkpoint` read besides the state it loaded."""

    #: Updates the server had applied when it saved.
    updates: int
    #: Class name of the optimizer whose state the checkpoint holds.
    optimizer_class: str


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> CheckpointInfo:
    """Load a checkpoint of :meth:`ParameterServer.checkpoint` into a model (and optimizer).

    The optimizer must be of the class that was trained (an AsyncMomentumSGD gets its tuner
    back, so the momentum continues where it was). The whole checkpoint is checked before
    anything is loaded, so a refused one leaves model and optimizer as they were: the file
    must unpickle with ``torch.load(weights_only=True)``; the model tensors must have this
    model's names and shapes, a loadable dtype and finite values; the optimizer state passes
    the optimizer's own ``check_state_dict`` (AsyncMomentumSGD) or
    :func:`~asyncmomentum.core.validation.check_optimizer_state`; ``updates`` is a count.

    Args:
        path: the checkpoint file.
        model: a model of the trained architecture.
        optimizer: an optimizer over ``model``'s parameters, or ``None`` to load weights only.

    Returns:
        The number of updates and the optimizer class the checkpoint records.

    Raises:
        ValueError: the file is not a readable checkpoint, or does not fit model or optimizer.
        OSError: the file cannot be opened.
    """
    state = _read_checkpoint(path)
    info = _check_checkpoint(state, model, optimizer)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    model.load_state_dict(state["model"])
    return info


def _read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Unpickle a checkpoint (tensors and plain containers only) and check its layout."""
    name = os.fspath(path)
    try:
        state = torch.load(name, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # corrupt bytes fail in many ways
        lines = str(error).splitlines() or [""]
        # weights_only names the refused global on a later line: the useful one.
        reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
        reason = reason.split(". Please use")[0]
        raise ValueError(
            f"{name!r} cannot be read as a checkpoint ({type(error).__name__}: {reason}); it is "
            "corrupt, truncated, or holds objects other than tensors and plain containers"
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{name!r} is not a parameter-server checkpoint of format "
            f"{CHECKPOINT_FORMAT} (found {found!r}); was it written by ParameterServer.checkpoint?"
        )
    missing = [k for k in ("model", "optimizer", "optimizer_class", "updates") if k not in state]
    if missing:
        raise ValueError(f"the checkpoint {name!r} lacks {missing}; it is corrupt")
    return state


def _check_checkpoint(
    state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> CheckpointInfo:
    """Check everything ``load_checkpoint`` would load; change nothing."""
    updates = check_int(state["updates"], "the checkpoint's 'updates'", 0, maximum=MAX_COUNT)
    optimizer_class = state["optimizer_class"]
    if not isinstance(optimizer_class, str):
        raise ValueError(f"the checkpoint's 'optimizer_class' is not a name: {optimizer_class!r}")
    if not isinstance(state["model"], dict):
        raise ValueError("the checkpoint's 'model' is not a state dict")
    _check_same_tensors(model.state_dict(), state["model"])
    if optimizer is not None:
        if type(optimizer).__name__ != optimizer_class:
            raise ValueError(
                f"the checkpoint holds the state of a {optimizer_class}, not of a "
                f"{type(optimizer).__name__}; build the optimizer the run used, or pass "
                "optimizer=None"
            )
        check = getattr(optimizer, "check_state_dict", None)
        if callable(check):
            check(state["optimizer"])
        else:
            check_optimizer_state(optimizer, state["optimizer"])
    return CheckpointInfo(updates, optimizer_class)


def _check_same_tensors(expected: dict[str, Tensor], found: dict[str, Any]) -> None:
    if expected.keys() != found.keys():
        missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
        raise ValueError(
            f"the checkpoint's model does not match this model: missing {sorted(missing)}, "
            f"unexpected {sorted(map(str, unexpected))}; build the model the run used"
        )
    for name, tensor in expected.items():
        try:
            check_state_tensor(tensor, found[name], f"the checkpoint's {name!r}")
        except ValueError as error:
            raise ValueError(f"{error}; build the model the run used") from None
