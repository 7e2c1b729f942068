"""What every transport shares: the worker's interface, the reply, flat buffers, the secret.

* :class:`Transport` is the worker's side of a link to one server (``join``, ``push``,
  ``leave``, ``checkpoint``); :class:`Servable` is what a server offers to transports.
* :class:`LocalTransport` calls a server of this process directly.
* Messages are flat: a push carries one gradient tensor and a reply one parameter tensor, all
  parameters concatenated in ``model.parameters()`` order (:func:`flatten`, :func:`load_flat`).
  Per-message overhead, not bytes, bounds a server's rate on small models, so one tensor per
  message instead of one per parameter is what makes it fast.
* The job's secret (:data:`SECRET_ENV`): a server that has one refuses every connection or call
  that does not carry it (:func:`check_secret`).
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector

#: Environment variable with the job's secret: when the serving process has one, every
#: connection (or remote call) must carry the same (``launch_local`` and the Lightning strategy
#: set a fresh one; with ``torchrun`` or plain variables, export the same value to every
#: process). It stops mistakes (a worker of another job, a stray client), not attackers: it
#: travels in clear on the job's network, as the tensors do.
SECRET_ENV = "ASYNCMOMENTUM_JOB_SECRET"


class Reply(NamedTuple):
    """The server's answer to a join or a push."""

    #: All parameters, flat, in ``model.parameters()`` order: a fresh tensor the receiver may
    #: keep (empty when ``stop``).
    params: Tensor
    #: Number of updates applied when ``params`` were read: the version to push with.
    version: int
    #: The worker should leave (the job ended, or this worker was dropped or has left).
    stop: bool
    #: Whether the pushed gradient was applied (``False`` for a join).
    applied: bool
    #: Port of the store on which leaving workers sign off (0: none; the RPC transport's).
    control_port: int = 0


@runtime_checkable
class Transport(Protocol):
    """The worker's side of the link to one parameter server."""

    def join(self, rank: int) -> Reply:
        """A worker's first read: the current parameters and their version.

        Args:
            rank: the worker's rank, in ``1 .. num_workers``.
        """
        ...

    def push(
        self,
        rank: int,
        grad: Tensor,
        version: int,
        loss: float,
        present: tuple[int, ...] | None = None,
        batch_size: int | None = None,
    ) -> Reply:
        """Push one gradient; the reply holds the parameters right after it was applied.

        Args:
            rank: the worker's rank.
            grad: one flat 1-D tensor in the layout of :attr:`Reply.params`.
            version: the version of the parameters the gradient was computed from.
            loss: the worker's loss on its batch, for the server's trace.
            present: indices (in ``model.parameters()`` order) of the parameters that have a
                gradient; the others get none (``None`` on the server, as torch skips them).
                ``None``: all of them.
            batch_size: the number of samples the gradient averages, for a rule that reads it
                (``rule="auto"``); ``None``: not known.
        """
        ...

    def leave(self, rank: int) -> None:
        """Tell the server this worker leaves; it stops expecting the worker's gradients.

        Args:
            rank: the worker's rank.
        """
        ...

    def checkpoint(self, path: str | None) -> str:
        """Ask the server to save a checkpoint now; returns the path written (server's disk).

        Args:
            path: where to save, inside the folder of the server's ``checkpoint_path``;
                ``None``: that path.
        """
        ...


class Servable(Protocol):
    """What a server offers to transports; :class:`~.server.ParameterServer` is one.

    ``join``, ``push`` and ``leave`` are :class:`Transport`'s; a transport that sees a worker's
    link break calls ``drop``; ``checkpoint`` saves (its owner's call) and
    ``requested_checkpoint_path`` says where a remote request may write.
    """

    def join(self, rank: int) -> Reply:
        """See :meth:`Transport.join`."""
        ...

    def push(
        self,
        rank: int,
        grad: Tensor,
        version: int,
        loss: float,
        present: tuple[int, ...] | None = None,
        batch_size: int | None = None,
    ) -> Reply:
        """See :meth:`Transport.push`."""
        ...

    def leave(self, rank: int) -> None:
        """See :meth:`Transport.leave`."""
        ...

    def drop(self, rank: int) -> None:
        """The link to worker ``rank`` is lost (its process ended): stop expecting it."""
        ...

    def checkpoint(self, path: str | None = None) -> str:
        """Save now (the owner's call, any path); returns the path written."""
        ...

    def requested_checkpoint_path(self, path: str | None) -> str | None:
        """Where a remote checkpoint request for ``path`` may write; raises if nowhere."""
        ...


# -- flat buffers --------------------------------------------------------------------------------


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """One new 1-D tensor with ``tensors`` concatenated (detached), in order.

    torch's ``parameters_to_vector`` without autograd (as fast as a plain ``torch.cat``), after
    checks that name what does not fit.

    Args:
        tensors: at least one tensor, all of one dtype and on one device.

    Raises:
        ValueError: no tensors, or mixed dtypes or devices.
    """
    if isinstance(tensors, Tensor) or not tensors:
        raise ValueError("flatten needs a non-empty sequence of tensors")
    first = tensors[0]
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, Tensor):
            raise ValueError(f"entry {index} is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype != first.dtype or tensor.device != first.device:
            raise ValueError(
                f"one flat buffer holds one dtype on one device: entry {index} is "
                f"{tensor.dtype} on {tensor.device}, entry 0 is {first.dtype} on {first.device}"
            )
    with torch.no_grad():
        return parameters_to_vector(tensors)


def check_flat(flat: Any, params: Sequence[Tensor], what: str = "the flat tensor") -> Tensor:
    """Return ``flat`` if it is a 1-D tensor that fits ``params``, else raise ValueError.

    Args:
        flat: the tensor to check.
        params: the parameters it must cover, in order.
        what: how messages name ``flat``.
    """
    expected = sum(p.numel() for p in params)
    if not isinstance(flat, Tensor) or flat.dim() != 1:
        found = f"shape {tuple(flat.shape)}" if isinstance(flat, Tensor) else type(flat).__name__
        raise ValueError(f"{what} must be one 1-D tensor, got {found}")
    if flat.numel() != expected:
        raise ValueError(
            f"{what} has {flat.numel()} elements but the {len(params)} parameters hold "
            f"{expected}; do worker and server build the same model?"
        )
    if params and (flat.dtype != params[0].dtype or flat.device != params[0].device):
        raise ValueError(
            f"{what} is {flat.dtype} on {flat.device} but the parameters are "
            f"{params[0].dtype} on {params[0].device}"
        )
    return flat


@torch.no_grad()
def load_flat(params: Sequence[Tensor], flat: Tensor) -> None:
    """Copy a flat tensor (as :func:`flatten` makes) into ``params``, in order.

    Everything is checked before anything is copied.

    Args:
        params: the parameters to overwrite.
        flat: a 1-D tensor with exactly as many elements as ``params`` together.

    Raises:
        ValueError: ``flat`` is not 1-D, or its size, dtype or device does not fit.
    """
    check_flat(flat, params)
    offset = 0
    for param in params:
        count = param.numel()
        param.copy_(flat[offset : offset + count].view_as(param))
        offset += count


# -- the worker's side ---------------------------------------------------------------------------


class LocalTransport:
    """Calls a server of this process directly (a worker in the server's process, and tests).

    It follows the rules of the remote transports: a requested checkpoint path must lie in the
    server's checkpoint folder.

    Args:
        server: the server to call.
    """

    def __init__(self, server: Servable) -> None:
        self.server = server

    def join(self, rank: int) -> Reply:
        """See :meth:`Transport.join`."""
        return self.server.join(rank)

    def push(
        self,
        rank: int,
        grad: Tensor,
        version: int,
        loss: float,
        present: tuple[int, ...] | None = None,
        batch_size: int | None = None,
    ) -> Reply:
        """See :meth:`Transport.push`."""
        return self.server.push(rank, grad, version, loss, present, batch_size)

    def leave(self, rank: int) -> None:
        """See :meth:`Transport.leave`."""
        self.server.leave(rank)

    def checkpoint(self, path: str | None) -> str:
        """See :meth:`Transport.checkpoint`."""
        return self.server.checkpoint(self.server.requested_checkpoint_path(path))


def job_secret(*, create: bool = False) -> str:
    """The job's secret: the value of :data:`SECRET_ENV` in this process (``""``: none).

    Args:
        create: when there is none, set a fresh random one first (for the processes this one
            starts, and to hand to the others).
    """
    if create:
        return os.environ.setdefault(SECRET_ENV, new_secret())
    return os.environ.get(SECRET_ENV, "")


def new_secret() -> str:
    """A fresh random job secret (32 hex digits)."""
    return secrets.token_hex(16)


def check_secret(offered: Any) -> None:
    """Refuse ``offered`` unless it is the job's secret (nothing to check if the job has none).

    Args:
        offered: what a connection or call carries.

    Raises:
        PermissionError: the job has a secret and ``offered`` is not it.
    """
    expected = job_secret()
    if expected and not (
        isinstance(offered, str) and hmac.compare_digest(offered.encode(), expected.encode())
    ):
        raise PermissionError(
            f"this connection does not carry the job's secret ({SECRET_ENV}); refused, nothing "
            "changed"
        )
