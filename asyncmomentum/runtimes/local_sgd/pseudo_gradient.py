"""The pure pieces every local-SGD runtime shares, independent of any transport.

A worker reads the global parameters (flattened: ``params_read``), takes ``H`` inner steps, and
sends the pseudo-gradient ``params_read - params_after_H`` as one flat vector. The server checks
it (:func:`check_pseudo_gradient`: right size, finite) and applies it with the outer optimizer
(:func:`apply_pseudo_gradient`: ``p.grad`` from the flat vector, then ``outer.step``, with the
staleness when the outer optimizer is an :class:`~asyncmomentum.AsyncMomentumSGD`).

The simulator (:mod:`.simulate`) and the real-process runtime both use these functions, so a
pseudo-gradient is computed, checked and applied the same way everywhere.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from asyncmomentum import AsyncMomentumSGD

__all__ = [
    "apply_pseudo_gradient",
    "check_outer_optimizer",
    "check_pseudo_gradient",
    "check_sync_every",
    "flat_parameters",
    "pseudo_gradient",
]


def check_sync_every(sync_every: object) -> int:
    """``sync_every`` (inner steps between pushes) as an ``int >= 1``; ``ValueError`` otherwise.

    Args:
        sync_every: the number of inner steps a worker takes before it pushes.

    Raises:
        ValueError: not an integer, or smaller than 1.
    """
    if isinstance(sync_every, bool) or not isinstance(sync_every, numbers.Integral):
        raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1 (inner steps between pushes), got {sync_every}")
    return int(sync_every)


def _as_list(params: Iterable[Tensor] | nn.Module) -> list[Tensor]:
    if isinstance(params, nn.Module):
        return list(params.parameters())
    return list(params)


def flat_parameters(params: Iterable[Tensor] | nn.Module) -> Tensor:
    """A detached flat copy of ``params`` (in their order): what a worker notes when it reads.

    Args:
        params: tensors, or a module whose parameters are taken.
    """
    tensors = _as_list(params)
    if not tensors:
        raise ValueError("no parameters to flatten")
    return torch.cat([p.detach().reshape(-1) for p in tensors]).clone()


def pseudo_gradient(params_read: Tensor, params_after: Iterable[Tensor] | nn.Module) -> Tensor:
    """The pseudo-gradient ``params_read - params_after`` as a flat tensor.

    Args:
        params_read: the flat parameters the worker read (from :func:`flat_parameters`).
        params_after: the worker's parameters after its inner steps.

    Raises:
        ValueError: the sizes differ.
    """
    after = flat_parameters(params_after)
    if params_read.dim() != 1 or params_read.numel() != after.numel():
        raise ValueError(
            f"params_read has shape {tuple(params_read.shape)}, the parameters after the inner "
            f"steps have {after.numel()} elements: they must be the same flat size"
        )
    return params_read.detach().to(after) - after


def check_pseudo_gradient(delta: Tensor, numel: int) -> None:
    """Refuse a pseudo-gradient that is not a flat, finite vector of ``numel`` elements.

    Args:
        delta: the pushed pseudo-gradient.
        numel: the number of elements of the global parameters.

    Raises:
        ValueError: not a tensor, not flat, wrong size, or a NaN / infinite entry.
    """
    if not isinstance(delta, Tensor):
        raise ValueError(f"a pseudo-gradient must be a tensor, got {type(delta).__name__}")
    if delta.dim() != 1 or delta.numel() != numel:
        raise ValueError(
            f"pseudo-gradient has shape {tuple(delta.shape)}; the global parameters need a flat "
            f"vector of {numel} elements"
        )
    if not bool(torch.isfinite(delta).all()):
        bad = int((~torch.isfinite(delta)).sum())
        raise ValueError(f"pseudo-gradient has {bad} non-finite entries (NaN or inf): refused")


def _optimizer_params(outer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in outer.param_groups for p in group["params"]]


def check_outer_optimizer(outer: torch.optim.Optimizer, params: Sequence[Tensor]) -> None:
    """Refuse an outer optimizer that is not over exactly ``params`` (the global parameters).

    Args:
        outer: the outer optimizer.
        params: the global parameters the pseudo-gradients are applied to.

    Raises:
        TypeError: ``outer`` is not a torch optimizer.
        ValueError: it holds other parameters (or misses some, or orders them differently).
    """
    if not isinstance(outer, torch.optim.Optimizer):
        name = type(outer).__name__
        raise TypeError(f"the outer optimizer must be a torch optimizer, got {name}")
    held = _optimizer_params(outer)
    if len(held) != len(params) or any(a is not b for a, b in zip(held, params, strict=True)):
        raise ValueError(
            f"the outer optimizer ({type(outer).__name__}) is over {len(held)} tensors that are "
            f"not the {len(params)} global parameters it must update: build it over the "
            "server's parameters, e.g. outer = fn(global_params)"
        )


def apply_pseudo_gradient(
    outer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    delta: Tensor,
    staleness: int | None = None,
) -> None:
    """Apply one pseudo-gradient: ``p.grad`` from ``delta``, then ``outer.step``.

    An :class:`~asyncmomentum.AsyncMomentumSGD` (or an optimizer whose class sets
    ``accepts_staleness = True``) gets ``step(staleness=staleness)`` (so it measures the
    asynchrony); any other torch optimizer gets ``step()``. Everything is checked before
    anything changes.

    Args:
        outer: the outer optimizer, over exactly ``params``.
        params: the global parameters.
        delta: the flat pseudo-gradient ``params_read - params_after_H``.
        staleness: outer updates applied since the pusher read the parameters.

    Raises:
        ValueError: a bad pseudo-gradient, a negative staleness, or an outer optimizer over
            other parameters.
    """
    params = list(params)
    check_outer_optimizer(outer, params)
    numel = sum(p.numel() for p in params)
    check_pseudo_gradient(delta, numel)
    if staleness is not None and (
        isinstance(staleness, bool) or not isinstance(staleness, numbers.Integral) or staleness < 0
    ):
        raise ValueError(f"staleness must be an integer >= 0, got {staleness!r}")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = delta[offset : offset + n].view_as(p).to(p).clone()
        offset += n
    if isinstance(outer, AsyncMomentumSGD) or getattr(outer, "accepts_staleness", False):
        step: Callable[..., object] = outer.step  # takes staleness=, unlike Optimizer.step
        step(staleness=None if staleness is None else int(staleness))
    else:
        outer.step()
