"""The link over ``torch.distributed.rpc`` (TensorPipe): the transport before c10d, kept optional.

PyTorch keeps ``torch.distributed.rpc`` and TensorPipe in maintenance mode, and TensorPipe's
shared-memory channel busy-polls (an idle process burns CPU); :mod:`.c10d` is the default.
This one stays for jobs that relied on it and as the baseline of
``benchmarks/server_throughput.py`` (``ServerConfig(transport="rpc")``).

* :class:`RpcTransport` calls the process named :data:`SERVER_NAME` over RPC.
* The host side: :func:`init_rpc` joins the RPC group, :func:`serving` makes a server reachable
  while its block runs, :func:`shutdown_rpc` leaves the group locally (a dead peer never
  blocks it).
* Over RPC a small flat tensor (up to :data:`INLINE_MAX_BYTES`) travels as bytes inside the
  message, which costs less than a tensor attachment.

Failures of the link itself (the server process ended, a timeout) raise :class:`ConnectionError`;
errors the server raised (a bad gradient, a refused secret) pass through with their type (built-in
types always; other types where torch's RPC keeps them, else a ``RuntimeError`` that names them).
"""

from __future__ import annotations

import builtins
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, cast

import torch
import torch.distributed.rpc as rpc
from torch import Tensor

from asyncmomentum.runtimes.transport.base import Reply, Servable, check_secret, job_secret

#: RPC name of the process that serves (rank 0 of a parameter-server job).
SERVER_NAME = "server"

# What torch's RPC puts in the message of an exception the remote side raised.
_REMOTE_ERROR_MARK = "On WorkerInfo("

# A leaving worker's last call; bounded, as the server may be gone already.
_LEAVE_TIMEOUT_S = 5.0

#: Over RPC, a flat CPU tensor of at most this many bytes travels as bytes inside the message
#: instead of as a tensor attachment: one round trip of the digits CNN's 7.6 KB took 180 us
#: that way against 270 us as a tensor; from about 128 KB on the attachment is cheaper.
INLINE_MAX_BYTES = 64 * 1024


def worker_name(rank: int) -> str:
    """RPC name of the worker of global rank ``rank`` (>= 1)."""
    return f"worker{rank}"


class RpcTransport:
    """Calls the server over ``torch.distributed.rpc``; this process must have joined the group.

    Every call carries the job's secret (:data:`SECRET_ENV`).

    Args:
        server_name: RPC name of the serving process.
        timeout: seconds each call may take (``None``: the RPC group's timeout).
        secret: the job's secret (``None``: read :data:`SECRET_ENV` now).
    """

    def __init__(
        self,
        server_name: str = SERVER_NAME,
        *,
        timeout: float | None = None,
        secret: str | None = None,
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive or None, got {timeout!r}")
        self.server_name = server_name
        self.timeout = timeout
        self._secret = job_secret() if secret is None else secret

    def join(self, rank: int) -> Reply:
        """See :meth:`Transport.join`."""
        return _unpack_reply(self._call(_remote_join, rank, self._secret))

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
        packed = _pack(grad)
        reply = self._call(
            _remote_push, rank, packed, version, loss, present, self._secret, batch_size
        )
        return _unpack_reply(reply)

    def leave(self, rank: int) -> None:
        """See :meth:`Transport.leave` (bounded: the server may be gone already)."""
        self._call(_remote_leave, rank, self._secret, timeout=_LEAVE_TIMEOUT_S)

    def checkpoint(self, path: str | None) -> str:
        """See :meth:`Transport.checkpoint`."""
        return self._call(_remote_checkpoint, path, self._secret)

    def _call(self, function: Any, *args: Any, timeout: float | None = None) -> Any:
        """``function(*args)`` on the server; transport failures become ConnectionError."""
        limit = timeout if timeout is not None else self.timeout
        kwargs = {} if limit is None else {"timeout": limit}
        try:
            return rpc.rpc_sync(self.server_name, function, args=args, **kwargs)
        except RuntimeError as error:
            if _REMOTE_ERROR_MARK in str(error):  # the server raised it: pass it on
                raise _original_error(error) from None
            raise ConnectionError(
                f"lost the parameter server {self.server_name!r}: its call "
                f"{function.__name__.removeprefix('_remote_')} failed ({error!s:.200}); the "
                "server process ended or cannot be reached"
            ) from error


class _Packed(NamedTuple):
    """A small flat tensor as it travels inside an RPC message: its dtype's name and bytes."""

    dtype: str
    data: bytes


def _pack(tensor: Tensor) -> Tensor | _Packed:
    """``tensor`` for the wire: bytes if it is a small flat CPU tensor, else itself."""
    if (
        not isinstance(tensor, Tensor)
        or tensor.device.type != "cpu"
        or tensor.dim() != 1
        or tensor.numel() * tensor.element_size() > INLINE_MAX_BYTES
    ):
        return tensor  # the receiver's checks say what is wrong with it, if anything
    raw = tensor.detach().contiguous().view(torch.uint8)
    return _Packed(str(tensor.dtype).removeprefix("torch."), raw.numpy().tobytes())


def _unpack(value: Any) -> Any:
    """The tensor :func:`_pack` packed (a fresh, writable one); anything else as it is."""
    if not isinstance(value, _Packed):
        return value
    dtype = getattr(torch, str(value.dtype), None)
    if not isinstance(dtype, torch.dtype) or not isinstance(value.data, bytes):
        raise ValueError(f"a packed tensor names no torch dtype: {value.dtype!r}")
    size = torch.empty(0, dtype=dtype).element_size()
    if len(value.data) % size:
        raise ValueError(f"{len(value.data)} bytes are no whole number of {dtype} elements")
    if not value.data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(value.data), dtype=torch.uint8).view(dtype)


def _pack_reply(reply: Reply) -> Reply:
    # Packed for the wire only: _unpack_reply turns params back into a tensor.
    return reply._replace(params=cast(Tensor, _pack(reply.params)))


def _unpack_reply(reply: Reply) -> Reply:
    return reply._replace(params=_unpack(reply.params))


def _original_error(error: RuntimeError) -> Exception:
    """The server's own exception, where torch's RPC turned it into a RuntimeError.

    torch re-raises a remote exception with its type, but its C++ layer turns some types (e.g.
    ``PermissionError``) into a ``RuntimeError`` whose message starts ``"Type: "``; a built-in
    type is restored from that name, any other stays the RuntimeError (its message names it).
    """
    if type(error) is not RuntimeError:
        return error
    name, _, message = str(error).partition(": ")
    kind = getattr(builtins, name, None)
    if (
        isinstance(kind, type)
        and issubclass(kind, Exception)
        and message.startswith(_REMOTE_ERROR_MARK)
    ):
        return kind(message)
    return error


# -- the host's side -----------------------------------------------------------------------------

# The server this process serves, reached by the remote functions below (RPC calls module
# functions by name, so they find their server here).
_SERVING: Servable | None = None
_SERVING_LOCK = threading.Lock()


@contextmanager
def serving(server: Servable) -> Iterator[Servable]:
    """Make ``server`` reachable over RPC from this process while the block runs.

    The process must join the RPC group (:func:`init_rpc`) under :data:`SERVER_NAME` for
    :class:`RpcTransport` to find it; joining before or inside the block both work (calls that
    arrive outside it are refused with a clear error).

    Args:
        server: the server to expose.

    Raises:
        RuntimeError: this process already serves a server.
    """
    global _SERVING
    with _SERVING_LOCK:
        if _SERVING is not None:
            raise RuntimeError("a parameter server already runs in this process")
        _SERVING = server
    try:
        yield server
    finally:
        with _SERVING_LOCK:
            _SERVING = None


def init_rpc(
    name: str,
    rank: int,
    world_size: int,
    *,
    init_method: str = "env://",
    timeout: float = 120.0,
) -> None:
    """Join the RPC group (TensorPipe) as ``name``; every process of the job calls it once.

    Args:
        name: this process's RPC name (:data:`SERVER_NAME` for the server,
            :func:`worker_name` for workers).
        rank: this process's rank in the group.
        world_size: number of processes in the group.
        init_method: rendezvous URL; ``"env://"`` reads ``MASTER_ADDR`` and ``MASTER_PORT``.
        timeout: default timeout of every call, in seconds.
    """
    options = rpc.TensorPipeRpcBackendOptions(rpc_timeout=timeout, init_method=init_method)
    with warnings.catch_warnings():
        # torch's own init_rpc trips its own deprecation warning; nothing a user can act on.
        warnings.filterwarnings("ignore", message="You are using a Backend", category=UserWarning)
        rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)


def rpc_joined() -> bool:
    """Whether this process has joined an RPC group (and not left it)."""
    return rpc.is_available() and bool(rpc.api._is_current_rpc_agent_set())


def shutdown_rpc() -> None:
    """Leave the RPC group locally, without the barrier over every rank.

    ``rpc.shutdown(graceful=True)`` waits for every rank and never returns once one has died;
    a job agrees on its end by other means (the server's stop, the workers' sign-off).
    """
    rpc.shutdown(graceful=False)


def _authorized(secret: Any) -> Servable:
    """The served server, if ``secret`` is the job's; refused before anything is read."""
    check_secret(secret)
    server = _SERVING
    if server is None:
        raise RuntimeError(f"no parameter server runs in this process; is this {SERVER_NAME!r}?")
    return server


def _remote_join(rank: int, secret: str = "") -> Reply:
    return _pack_reply(_authorized(secret).join(rank))


def _remote_push(
    rank: int,
    grad: Tensor | _Packed,
    version: int,
    loss: float,
    present: tuple[int, ...] | None,
    secret: str = "",
    batch_size: int | None = None,
) -> Reply:
    server = _authorized(secret)  # before anything of the message is read
    return _pack_reply(server.push(rank, _unpack(grad), version, loss, present, batch_size))


def _remote_leave(rank: int, secret: str = "") -> None:
    _authorized(secret).leave(rank)


def _remote_checkpoint(path: str | None, secret: str = "") -> str:
    server = _authorized(secret)
    return server.checkpoint(server.requested_checkpoint_path(path))
