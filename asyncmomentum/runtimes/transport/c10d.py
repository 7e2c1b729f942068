"""The link on ``torch.distributed`` (c10d): one two-rank process group per worker connection.

The default transport of the parameter server and of the Lightning strategy. The pattern is
torchft's parameter server: the job's rendezvous ``TCPStore`` (:mod:`.rendezvous`) introduces
each worker to the server, and each connection is a process group of its own with two ranks
(server 0, worker 1), so a dead worker's errors stay inside its pair and never touch the others.

Wire format (every message is a plain ``send``/``recv`` on the pair):

* a **header** of 8 int64 (:data:`HEADER_BYTES`): kind, rank, version, flags, the length of
  the *extra* bytes that follow, the loss (float64 bits), and two fields of the handshake (in a
  push, the first is the batch size, 0 when not known);
* the **payload**: a flat parameter or gradient tensor, all parameters in
  ``model.parameters()`` order. A payload of at most :data:`INLINE_MAX_BYTES` on CPU travels in
  one message with the header (a frame: one message each way per round trip, measured 4x faster
  than header and payload apart); a larger one, or one on CUDA, travels as its own message
  (no copy; over an nccl pair when it is on CUDA, device to device);
* the **extra** bytes, only where a message has them: the job's secret (handshake), a
  checkpoint path, the indices of the parameters a push has gradients for, an error.

Both sides know every message's size before it arrives, from the handshake (the number of
elements and the dtype of the flat parameters) and the header: gloo needs sizes to match.

A connection opens with a handshake: the worker announces itself in the store, both sides build
the pair, the worker sends its rank, the model's size and dtype, and the secret; the server
checks all of it before it reads anything else and refuses with an error that the worker raises
(a wrong secret: :class:`PermissionError`; nothing on the server changes). Every wait is bounded:
the worker's by its ``timeout``, the server's receive by ``worker_timeout`` (a silent worker is
then dropped, as the server's own rules say). A lost server raises :class:`ConnectionError` on
the worker; a lost worker is dropped at once (:meth:`~.base.Servable.drop`).
"""

from __future__ import annotations

import builtins
import contextlib
import enum
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from asyncmomentum.runtimes.transport.base import Reply, Servable, check_secret, job_secret
from asyncmomentum.runtimes.transport.rendezvous import local_address_toward

__all__ = [
    "HEADER_BYTES",
    "INLINE_MAX_BYTES",
    "PROTOCOL",
    "C10dHost",
    "C10dTransport",
    "active_transport",
]

#: Version of the wire format; a worker and a server of different versions refuse each other.
PROTOCOL = 1

#: Bytes of a message's header: 8 int64.
HEADER_BYTES = 64

#: A CPU payload of at most this many bytes shares one message with its header (copied in);
#: a larger one goes as a message of its own (no copy), as an extra message costs less than
#: copying it (about 25 us against 100 us per MB on loopback).
INLINE_MAX_BYTES = 256 * 1024

# A leaving worker's last message; bounded, as the server may be gone already.
_LEAVE_TIMEOUT_S = 5.0

# What close() writes into the key a connection waits for, to end the wait.
_CLOSED = "closed"

# Store keys of one worker rank's connections: attempts are numbered, each has its own prefix.
_KEY = "asyncmomentum/c10d"

# Header fields. A hello puts the wire format's version in _VERSION and describes the
# payload in the last two: its number of elements, and its dtype and device type.
_KIND, _RANK, _VERSION, _FLAGS, _EXTRA, _LOSS, _NUMEL, _LAYOUT = range(8)
# A push has no handshake fields: its batch size travels in the first.
_BATCH = _NUMEL

# Flags.
_STOP, _APPLIED, _PARTIAL, _HAS_PATH, _PAYLOAD = 1, 2, 4, 8, 16

# torch's stubs lack the constructor options and point-to-point methods of its gloo group.
_GLOO: Any = dist.ProcessGroupGloo

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DEVICES = ("cpu", "cuda")


class _Kind(enum.IntEnum):
    HELLO = 1
    JOIN = 2
    PUSH = 3
    LEAVE = 4
    CHECKPOINT = 5
    REPLY = 6
    ERROR = 7


class _Refused(Exception):
    """The peer refused the connection; the message says why."""


@dataclass
class _Message:
    header: list[Any]  # ints, but the loss (field _LOSS) as a float
    payload: Tensor | None
    extra: bytes

    @property
    def kind(self) -> int:
        return self.header[_KIND]

    @property
    def rank(self) -> int:
        return self.header[_RANK]

    @property
    def version(self) -> int:
        return self.header[_VERSION]

    @property
    def flags(self) -> int:
        return self.header[_FLAGS]

    @property
    def loss(self) -> float:
        return float(self.header[_LOSS])

    @property
    def batch_size(self) -> int | None:
        return int(self.header[_BATCH]) or None


def _wait(work: Any, timeout: float, what: str) -> None:
    """Wait for a send or receive; a timeout or a broken pair becomes ConnectionError."""
    try:
        work.wait(timedelta(seconds=timeout))
    except RuntimeError as error:
        raise ConnectionError(f"{what} failed ({error!s:.200})") from error


class _Pair:
    """One connection's two-rank process groups and its framing (the same on both sides).

    Args:
        store: the store of this connection (a prefix of the job's).
        rank: 0 on the server, 1 on the worker.
        device: gloo's device (a listener bound to one address, and one I/O thread); the
            server shares one among its connections.
        timeout: seconds the pair may take to connect.
    """

    def __init__(self, store: dist.Store, rank: int, device: Any, timeout: float) -> None:
        options = _GLOO._Options()
        options._timeout = timedelta(seconds=timeout)
        options._devices = [device]
        options._threads = 1  # one peer, one message at a time
        try:
            self.control: Any = _GLOO(store, rank, 2, options)
        except RuntimeError as error:
            peer = "worker" if rank == 0 else "server"
            raise ConnectionError(
                f"the {peer} did not open its end of the connection within {timeout:g} s "
                f"({error!s:.200}); is it gone, or is this rank connected already?"
            ) from error
        self.data: Any = self.control
        self._store = store
        self._rank = rank
        self.peer = 1 - rank
        self._sending = f"sending to the {'worker' if rank == 0 else 'server'}"
        # The server consumes a received payload before its next receive (it copies it into
        # its own buffer), so its receive buffer is reused; a worker keeps each reply.
        self._reuse_received = rank == 0
        self.numel = 0
        self.dtype = torch.float32
        self.device = torch.device("cpu")
        self.inline = False
        self._header = torch.zeros(8, dtype=torch.int64)  # header-only messages
        self._frame: Tensor | None = None  # the send buffer of inline messages, reused
        self._received: Tensor | None = None

    def fit(self, numel: int, dtype: torch.dtype, device: torch.device, timeout: float) -> None:
        """Set the payload's layout, agreed on in the handshake; CUDA payloads get an nccl pair."""
        self.numel, self.dtype, self.device = numel, dtype, device
        self._frame_bytes = HEADER_BYTES + numel * torch.empty(0, dtype=dtype).element_size()
        self.inline = device.type == "cpu" and self._frame_bytes - HEADER_BYTES <= INLINE_MAX_BYTES
        if self.inline:
            self._frame = torch.zeros(self._frame_bytes, dtype=torch.uint8)
        if device.type == "cuda":
            self.data = _nccl_pair(dist.PrefixStore("nccl/", self._store), self._rank, timeout)

    def send(
        self,
        kind: int,
        *,
        rank: int = 0,
        version: int = 0,
        flags: int = 0,
        loss: float = 0.0,
        payload: Tensor | None = None,
        extra: bytes = b"",
        layout: tuple[int, int] = (0, 0),
        timeout: float,
    ) -> None:
        if payload is not None:
            flags |= _PAYLOAD
        frame = self._frame
        target = self._header if frame is None else frame[:HEADER_BYTES].view(torch.int64)
        header = target.numpy()
        header[:] = (kind, rank, version, flags, len(extra), 0, *layout)
        header[_LOSS : _LOSS + 1].view(np.float64)[0] = loss
        if frame is not None:
            if payload is not None:
                frame[HEADER_BYTES:].view(self.dtype).copy_(payload)
            _wait(self.control.send([frame], self.peer, 0), timeout, self._sending)
        else:
            _wait(self.control.send([target], self.peer, 0), timeout, self._sending)
            if payload is not None:
                flat = payload.detach().to(self.device, self.dtype).contiguous()
                _wait(self.data.send([flat], self.peer, 1), timeout, self._sending)
        if extra:
            raw = torch.frombuffer(bytearray(extra), dtype=torch.uint8)
            _wait(self.control.send([raw], self.peer, 2), timeout, self._sending)

    def recv(self, timeout: float, what: str) -> _Message:
        """The next message; ``what`` names the wait in errors (a timeout: ConnectionError)."""
        payload = None
        if self.inline:
            frame = self._received if self._reuse_received else None
            if frame is None:
                frame = torch.empty(self._frame_bytes, dtype=torch.uint8)
                if self._reuse_received:
                    self._received = frame
            _wait(self.control.recv([frame], self.peer, 0), timeout, what)
            header = frame[:HEADER_BYTES].numpy().view(np.int64)
            if header[_FLAGS] & _PAYLOAD:
                payload = frame[HEADER_BYTES:].view(self.dtype)
        else:
            raw_header = torch.empty(8, dtype=torch.int64)
            _wait(self.control.recv([raw_header], self.peer, 0), timeout, what)
            header = raw_header.numpy()
            if header[_FLAGS] & _PAYLOAD:
                if not self.numel:
                    raise ConnectionError(f"{what}: a payload arrived before the handshake")
                payload = torch.empty(self.numel, dtype=self.dtype, device=self.device)
                _wait(self.data.recv([payload], self.peer, 1), timeout, what)
        fields = header.tolist()
        fields[_LOSS] = float(header[_LOSS : _LOSS + 1].view(np.float64)[0])
        extra = b""
        if fields[_EXTRA] > 0:
            raw = torch.empty(fields[_EXTRA], dtype=torch.uint8)
            _wait(self.control.recv([raw], self.peer, 2), timeout, what)
            extra = raw.numpy().tobytes()
        return _Message(fields, payload, extra)

    def close(self) -> None:
        """Drop the process groups: their sockets close, and a waiting peer gets an error.

        The peer's error comes at once; a pending wait of this side does not end (only its
        timeout ends it).
        """
        self.control = self.data = None


def _clone(store: dist.Store) -> dist.Store:
    """A new client of ``store`` (a client serves one call at a time; threads need their own)."""
    return cast(Any, store).clone()


def _device(address: str) -> Any:
    """A gloo device whose listener binds ``address`` only."""
    return _GLOO.create_device(hostname=address)


def _nccl_pair(store: dist.Store, rank: int, timeout: float) -> Any:
    """A two-rank nccl group on the current CUDA device, for payloads on CUDA."""
    if not dist.is_nccl_available():
        raise RuntimeError("a CUDA payload needs nccl, and this build of torch has none")
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timedelta(seconds=timeout)
    return dist.ProcessGroupNCCL(store, rank, 2, options)


def _layout_code(dtype: torch.dtype, device: torch.device) -> int:
    return _DTYPES.index(dtype) * len(_DEVICES) + _DEVICES.index(device.type)


def _describe_layout(code: int) -> str:
    dtype, device = divmod(code, len(_DEVICES))
    if not (0 <= dtype < len(_DTYPES) and 0 <= device < len(_DEVICES)):
        return f"of unknown layout {code}"
    return f"{_DTYPES[dtype]} on {_DEVICES[device]}"


def _attempts_key(rank: int) -> str:
    return f"{_KEY}/{rank}/attempts"


def _hello_key(rank: int, attempt: int) -> str:
    return f"{_KEY}/{rank}/{attempt}/hello"


def _pair_store(store: dist.Store, rank: int, attempt: int) -> dist.Store:
    return dist.PrefixStore(f"{_KEY}/{rank}/{attempt}/", store)


def _error_text(error: BaseException) -> bytes:
    return f"{type(error).__name__}: {error}".encode()


def _raise_remote(extra: bytes) -> None:
    """Raise the error the server sent: a built-in type keeps its type, others RuntimeError."""
    text = extra.decode(errors="replace")
    name, _, message = text.partition(": ")
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, ConnectionError):
        raise kind(f"lost the parameter server: {message}")
    if isinstance(kind, type) and issubclass(kind, Exception):
        raise kind(f"the parameter server refused: {message}")
    raise RuntimeError(f"the parameter server raised {text}")


# -- the worker's side ---------------------------------------------------------------------------

_ACTIVE: C10dTransport | None = None
_ACTIVE_LOCK = threading.Lock()


def active_transport() -> C10dTransport | None:
    """The open c10d connection of this process's worker, if one runs here."""
    return _ACTIVE


class C10dTransport:
    """A worker's connection to the server: opens in the constructor, a handshake included.

    Args:
        store: the job's rendezvous store.
        rank: the worker's rank (``1 .. num_workers`` on the server).
        like: a flat tensor with the dtype, device and size of the model's parameters.
        timeout: seconds every call (and the connection's opening) may take.
        secret: the job's secret (``None``: read :data:`~.base.SECRET_ENV` now).
        server_address: the server's address (``MASTER_ADDR``): this side's listener binds the
            address of this machine that reaches it.

    Raises:
        ConnectionError: the server did not answer within ``timeout``.
        PermissionError: the server refused the secret.
        ValueError: the server refused the model's size or dtype, or the rank.
    """

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        like: Tensor,
        *,
        timeout: float = 120.0,
        secret: str | None = None,
        server_address: str = "127.0.0.1",
    ) -> None:
        global _ACTIVE
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if like.dtype not in _DTYPES or like.device.type not in _DEVICES:
            raise ValueError(
                f"the c10d transport carries {[str(d) for d in _DTYPES]} tensors on "
                f"{list(_DEVICES)}, got {like.dtype} on {like.device}"
            )
        self.rank = rank
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        secret = job_secret() if secret is None else secret
        store = _clone(store)  # this connection's own client: the caller's stays free
        try:
            attempt = store.add(_attempts_key(rank), 1)
            store.set(_hello_key(rank, attempt), "1")
        except (RuntimeError, dist.DistError) as error:
            raise ConnectionError(f"the job's store cannot be reached ({error!s:.200})") from error
        device = _device(local_address_toward(server_address))
        pair = _Pair(_pair_store(store, rank, attempt), 1, device, timeout)
        try:
            pair.send(
                _Kind.HELLO,
                rank=rank,
                version=PROTOCOL,
                extra=secret.encode(),
                layout=(like.numel(), _layout_code(like.dtype, like.device)),
                timeout=self.timeout,
            )
            answer = pair.recv(self.timeout, "waiting for the server's handshake")
            if answer.kind == _Kind.ERROR:
                _raise_remote(answer.extra)
            pair.fit(like.numel(), like.dtype, like.device, self.timeout)
        except BaseException:
            pair.close()
            raise
        self._pair: _Pair | None = pair
        with _ACTIVE_LOCK:
            _ACTIVE = self

    def join(self, rank: int) -> Reply:
        """See :meth:`~.base.Transport.join`."""
        return self._reply(self._call(_Kind.JOIN, rank))

    def push(
        self,
        rank: int,
        grad: Tensor,
        version: int,
        loss: float,
        present: tuple[int, ...] | None = None,
        batch_size: int | None = None,
    ) -> Reply:
        """See :meth:`~.base.Transport.push`."""
        pair = self._open()
        if not isinstance(grad, Tensor) or grad.dim() != 1 or grad.numel() != pair.numel:
            found = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
            raise ValueError(
                f"push takes one flat gradient of {pair.numel} elements (transport.flatten), "
                f"got {found}"
            )
        extra = b""
        flags = 0
        if present is not None:
            extra = torch.tensor(list(present), dtype=torch.int64).numpy().tobytes()
            flags = _PARTIAL
        message = self._call(
            _Kind.PUSH,
            rank,
            version=version,
            loss=loss,
            payload=grad,
            flags=flags,
            extra=extra,
            layout=(batch_size or 0, 0),
        )
        return self._reply(message)

    def leave(self, rank: int) -> None:
        """See :meth:`~.base.Transport.leave`; then the connection closes (bounded wait)."""
        try:
            self._call(_Kind.LEAVE, rank, timeout=min(self.timeout, _LEAVE_TIMEOUT_S))
        finally:
            self.close()

    def checkpoint(self, path: str | None, timeout: float | None = None) -> str:
        """See :meth:`~.base.Transport.checkpoint`.

        Args:
            path: where to save (see there).
            timeout: seconds to wait for the save (``None``: this connection's timeout).
        """
        extra = b"" if path is None else str(path).encode()
        flags = 0 if path is None else _HAS_PATH
        message = self._call(_Kind.CHECKPOINT, self.rank, flags=flags, extra=extra, timeout=timeout)
        return message.extra.decode()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        global _ACTIVE
        pair, self._pair = self._pair, None
        with _ACTIVE_LOCK:
            if _ACTIVE is self:
                _ACTIVE = None
        if pair is not None:
            pair.close()

    def _open(self) -> _Pair:
        if self._pair is None:
            raise ConnectionError("this connection to the parameter server is closed")
        return self._pair

    def _call(
        self, kind: _Kind, rank: int, *, timeout: float | None = None, **message: Any
    ) -> _Message:
        limit = self.timeout if timeout is None else timeout
        with self._lock:
            pair = self._open()
            try:
                pair.send(kind, rank=rank, timeout=limit, **message)
                answer = pair.recv(limit, f"waiting for the server's reply to {kind.name.lower()}")
            except ConnectionError as error:
                self.close()
                raise ConnectionError(
                    f"lost the parameter server: {error}; the server process ended or cannot "
                    "be reached"
                ) from error.__cause__
        if answer.kind == _Kind.ERROR:
            if answer.extra.startswith(b"ConnectionError"):
                self.close()  # the server closed its end
            _raise_remote(answer.extra)
        return answer

    @staticmethod
    def _reply(message: _Message) -> Reply:
        stop = bool(message.flags & _STOP)
        params = message.payload
        if params is None or stop:
            params = torch.empty(0)
        return Reply(params, message.version, stop, bool(message.flags & _APPLIED))


# -- the server's side ---------------------------------------------------------------------------


class C10dHost:
    """Serves ``server`` to the workers of ``ranks``: one thread and one pair per connection.

    Args:
        server: the server to expose.
        store: the job's rendezvous store.
        ranks: the worker ranks to expect.
        like: a flat tensor with the dtype, device and size of the served parameters.
        address: the address the server's listeners bind (``MASTER_ADDR``).
        join_timeout: seconds every worker may take to connect, from :meth:`start`.
        worker_timeout: seconds a connection may stay silent before its worker is dropped.
        reply_timeout: seconds a reply may take to send.
    """

    def __init__(
        self,
        server: Servable,
        store: dist.Store,
        ranks: Iterable[int],
        like: Tensor,
        *,
        address: str,
        join_timeout: float,
        worker_timeout: float,
        reply_timeout: float = 120.0,
    ) -> None:
        self.server = server
        self.store = store
        self.ranks = tuple(ranks)
        self.numel, self.dtype, self.device = like.numel(), like.dtype, like.device
        self.address = address
        self.join_timeout = join_timeout
        self.worker_timeout = worker_timeout
        self.reply_timeout = reply_timeout
        self._joined = {rank: threading.Event() for rank in self.ranks}
        self._ended = {rank: threading.Event() for rank in self.ranks}
        self._left: set[int] = set()
        # Joins are answered once every rank has connected, so that no worker trains alone
        # while the others start (as a static group's rendezvous would).
        self._everyone = threading.Event()
        self._closed = threading.Event()
        self._awaited: dict[int, str] = {}  # the hello key each waiting connection waits for
        # One listener and one I/O thread for every connection.
        self._device = _device(address)
        self._lock = threading.Lock()
        self._started = 0.0

    def start(self) -> None:
        """Start waiting for every rank's connection."""
        self._started = time.monotonic()
        for rank in self.ranks:
            thread = threading.Thread(
                target=self._serve_rank, args=(rank,), name=f"asyncmomentum-c10d-{rank}",
                daemon=True,
            )  # fmt: skip
            thread.start()

    def await_joined(self) -> None:
        """Return once every rank has connected.

        Raises:
            TimeoutError: some did not within ``join_timeout``; the message names them.
        """
        deadline = self._started + self.join_timeout
        for event in self._joined.values():
            event.wait(max(deadline - time.monotonic(), 0.0))
        missing = [rank for rank, event in self._joined.items() if not event.is_set()]
        if missing:
            raise TimeoutError(
                f"rank(s) {missing} did not join the job within {self.join_timeout:g} s "
                "(ServerConfig.join_timeout); the server gives up"
            )

    def signed_off(self, rank: int, timeout_s: float) -> bool:
        """Whether worker ``rank`` has left (said so, and its connection ended) within the time.

        Args:
            rank: the worker's rank.
            timeout_s: how long to wait.
        """
        self._ended[rank].wait(max(timeout_s, 0.0))
        with self._lock:
            return rank in self._left

    def close(self) -> None:
        """Close the connections; waits for workers that have not connected end now.

        Each connection answers its worker's next message with a ConnectionError and closes
        (one whose worker is silent closes at ``worker_timeout``, one whose worker's process
        ended closes at once).
        """
        with self._lock:
            self._closed.set()
            awaited = list(self._awaited.values())
        for key in awaited:
            with contextlib.suppress(RuntimeError, dist.DistError):
                self.store.set(key, _CLOSED)

    # -- one connection --------------------------------------------------------------------

    def _serve_rank(self, rank: int) -> None:
        attempt = 0
        try:
            while not self._closed.is_set():
                attempt += 1
                pair = self._accept(rank, attempt)
                if pair is None:
                    return
                if self._handshake(rank, pair):
                    self._joined[rank].set()
                    if all(event.is_set() for event in self._joined.values()):
                        self._everyone.set()
                    self._loop(rank, pair)
                    return
        finally:
            self._ended[rank].set()

    def _accept(self, rank: int, attempt: int) -> _Pair | None:
        """The pair of the worker's next attempt, or None if it does not come in time."""
        # A store client serves one call at a time: each connection waits on its own.
        store = _clone(self.store)
        key = _hello_key(rank, attempt)
        with self._lock:
            if self._closed.is_set():
                return None
            self._awaited[rank] = key  # close() writes it, which ends the wait
        remaining = self._started + self.join_timeout - time.monotonic()
        try:
            store.wait([key], timedelta(seconds=max(remaining, 1e-3)))
            if self._closed.is_set():
                return None
            return _Pair(_pair_store(store, rank, attempt), 0, self._device, self.reply_timeout)
        except (RuntimeError, ConnectionError, dist.DistError):
            return None
        finally:
            with self._lock:
                self._awaited.pop(rank, None)

    def _handshake(self, rank: int, pair: _Pair) -> bool:
        """Check the worker's hello before anything else; refuse (and close) on any mismatch."""
        try:
            hello = pair.recv(self.reply_timeout, f"waiting for worker {rank}'s handshake")
        except ConnectionError:
            pair.close()
            return False
        try:
            check_secret(hello.extra.decode(errors="replace"))  # before anything else
            problem = self._mismatch(rank, hello)
            if problem is not None:
                raise ValueError(problem)
        except (PermissionError, ValueError) as error:
            with contextlib.suppress(ConnectionError):
                pair.send(_Kind.ERROR, extra=_error_text(error), timeout=self.reply_timeout)
            pair.close()
            return False
        try:
            pair.send(_Kind.REPLY, timeout=self.reply_timeout)
            pair.fit(self.numel, self.dtype, self.device, self.reply_timeout)
        except (ConnectionError, RuntimeError):
            pair.close()
            return False
        return True

    def _mismatch(self, rank: int, hello: _Message) -> str | None:
        """What in a worker's hello does not fit this server (``None``: all of it fits)."""
        if hello.kind != _Kind.HELLO or hello.version != PROTOCOL:
            return f"the worker speaks wire format {hello.version}, this server {PROTOCOL}"
        if hello.rank != rank:
            return f"the connection of rank {rank} announced rank {hello.rank}"
        numel, code = hello.header[_NUMEL], hello.header[_LAYOUT]
        if numel != self.numel:
            return (
                f"the worker's model has {numel} parameter elements, the server's {self.numel}; "
                "do worker and server build the same model?"
            )
        mine = _layout_code(self.dtype, self.device)
        if code != mine:
            theirs = _describe_layout(code)
            return (
                f"the worker's parameters are {theirs}, the server's {_describe_layout(mine)}; "
                "both ends of a connection use one dtype and one device type"
            )
        return None

    def _loop(self, rank: int, pair: _Pair) -> None:
        """Answer the worker's messages until it leaves, goes silent, or its link breaks."""
        released = False  # the last reply told the worker to stop
        while not self._closed.is_set():
            try:
                message = pair.recv(self.worker_timeout, f"waiting for worker {rank}")
            except ConnectionError:
                if released:  # told to stop, it closed without a goodbye: it left all the same
                    self.server.leave(rank)
                    with self._lock:
                        self._left.add(rank)
                elif not self._closed.is_set():
                    self.server.drop(rank)  # dead, or silent for worker_timeout
                break
            if self._closed.is_set():
                closing = ConnectionError("the parameter server has closed this connection")
                with contextlib.suppress(ConnectionError):
                    pair.send(_Kind.ERROR, extra=_error_text(closing), timeout=self.reply_timeout)
                break
            try:
                reply = self._handle(rank, message)
            except Exception as error:  # the server refused it; nothing changed
                reply = {"kind": _Kind.ERROR, "extra": _error_text(error)}
            try:
                pair.send(rank=rank, timeout=self.reply_timeout, **reply)
            except ConnectionError:
                self.server.drop(rank)
                break
            released = bool(reply.get("flags", 0) & _STOP)
            if message.kind == _Kind.LEAVE and reply["kind"] == _Kind.REPLY:
                with self._lock:
                    self._left.add(rank)
                break
        pair.close()

    def _handle(self, rank: int, message: _Message) -> dict[str, Any]:
        if message.rank != rank:
            raise ValueError(f"the connection of rank {rank} spoke for rank {message.rank}")
        if message.kind == _Kind.PUSH:
            if message.payload is None:
                raise ValueError("a push carries a gradient")
            present = None
            if message.flags & _PARTIAL:
                present = tuple(torch.frombuffer(bytearray(message.extra), dtype=torch.int64))
                present = tuple(int(i) for i in present)
            reply = self.server.push(
                rank, message.payload, message.version, message.loss, present, message.batch_size
            )
        elif message.kind == _Kind.JOIN:
            remaining = self._started + self.join_timeout - time.monotonic()
            if not self._everyone.wait(max(remaining, 0.0)):
                raise TimeoutError("not every worker joined the job within the join timeout")
            reply = self.server.join(rank)
        elif message.kind == _Kind.LEAVE:
            self.server.leave(rank)
            return {"kind": _Kind.REPLY}
        elif message.kind == _Kind.CHECKPOINT:
            path = message.extra.decode() if message.flags & _HAS_PATH else None
            written = self.server.checkpoint(self.server.requested_checkpoint_path(path))
            return {"kind": _Kind.REPLY, "extra": written.encode()}
        else:
            raise ValueError(f"unknown message kind {message.kind}")
        flags = (_STOP if reply.stop else 0) | (_APPLIED if reply.applied else 0)
        payload = None if reply.stop else reply.params
        return {"kind": _Kind.REPLY, "version": reply.version, "flags": flags, "payload": payload}
