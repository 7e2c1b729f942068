"""A local-SGD worker's loop over any :class:`~asyncmomentum.runtimes.transport.Transport`.

The worker starts from the parameters of a reply (version ``v``), takes ``sync_every`` (``H``)
steps of its own inner optimizer (any torch optimizer; AdamW is the usual choice, and its state
is kept from one round to the next, as DiLoCo keeps it), then pushes the pseudo-gradient
``params_read - params_after_H`` tagged with ``v``. To the server a pseudo-gradient is a gradient
like any other: its optimizer is the *outer* optimizer, and the staleness it measures is counted
in outer updates. The reply's parameters are the next round's start.

The parameter server runs this loop for a job with ``sync_every`` set
(:class:`~asyncmomentum.runtimes.server.ParameterServerJob`): under
:func:`~asyncmomentum.runtimes.server.launch_local`, ``torchrun`` or plain environment variables
(:func:`~asyncmomentum.runtimes.server.run_from_env`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from asyncmomentum.runtimes.local_sgd.pseudo_gradient import (
    check_pseudo_gradient,
    check_sync_every,
)
from asyncmomentum.runtimes.transport import Reply, Transport, flatten, load_flat

__all__ = ["LocalSGDRounds", "run_local_sgd_rounds"]


@dataclass(frozen=True)
class LocalSGDRounds:
    """What a local-SGD worker's loop did.

    Attributes:
        pushes: pseudo-gradients the server applied (this worker's outer updates).
        refused: pushes the server answered with "stop" (after the end, or once dropped).
        inner_steps: inner optimizer steps taken (a partial last round included).
        stop_reason: ``"server"``, ``"max_steps"`` (``max_pushes`` reached) or
            ``"batches_exhausted"``.
    """

    pushes: int
    refused: int
    inner_steps: int
    stop_reason: str


def run_local_sgd_rounds(
    model: nn.Module,
    batches: Iterator[tuple[Any, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inner: torch.optim.Optimizer,
    transport: Transport,
    rank: int,
    reply: Reply,
    *,
    sync_every: int,
    max_pushes: int | None = None,
) -> LocalSGDRounds:
    """Rounds of ``sync_every`` inner steps and one pseudo-gradient push, until told to stop.

    Args:
        model: the worker's model (same architecture as the server's; its weights are
            overwritten by every reply).
        batches: this worker's ``(inputs, targets)`` batches.
        loss_fn: ``loss_fn(model(inputs), targets)`` is the scalar loss.
        inner: the inner optimizer, over ``model``'s parameters.
        transport: the link to the server.
        rank: the worker's rank.
        reply: the server's reply to ``join`` (the parameters to start from).
        sync_every: inner steps between two pushes (``H >= 1``).
        max_pushes: leave after this many applied pushes (``None``: until the server stops).

    Raises:
        ValueError: ``sync_every < 1``, an inner optimizer over other parameters, or a
            pseudo-gradient that is not finite (the inner steps diverged: nothing is pushed).
    """
    sync_every = check_sync_every(sync_every)
    params = list(model.parameters())
    mine = {id(p) for p in params}
    if any(id(p) not in mine for group in inner.param_groups for p in group["params"]):
        raise ValueError(
            "the inner optimizer holds a parameter that is not one of the worker's model: "
            "build it from model.parameters() of the same model object"
        )
    numel = sum(p.numel() for p in params)
    model.train()
    pushes = refused = inner_steps = 0
    while not reply.stop:
        if max_pushes is not None and pushes >= max_pushes:
            return LocalSGDRounds(pushes, refused, inner_steps, "max_steps")
        # Copied in place: the inner optimizer's state stays attached to the same tensors.
        load_flat(params, reply.params)
        start = reply.params
        loss = torch.tensor(float("nan"))
        for _ in range(sync_every):
            try:
                inputs, targets = next(batches)
            except StopIteration:
                return LocalSGDRounds(pushes, refused, inner_steps, "batches_exhausted")
            inner.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            inner.step()
            inner_steps += 1
        delta = start - flatten([p.detach() for p in params])
        try:
            check_pseudo_gradient(delta, numel)
        except ValueError as error:
            raise ValueError(
                f"worker {rank}: {error} after {sync_every} inner steps (the inner optimizer "
                "diverged: lower its learning rate); nothing was pushed"
            ) from None
        reply = transport.push(rank, delta, reply.version, float(loss.detach()))
        pushes += int(reply.applied)
        refused += int(not reply.applied)
    return LocalSGDRounds(pushes, refused, inner_steps, "server")
