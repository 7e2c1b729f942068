"""How a job's server and workers reach each other, per transport: rendezvous, serving, the end.

:func:`host_server` serves a :class:`~.state.ParameterServer` until it stops and every worker
still alive has left; :func:`connect_worker` opens a worker's link. Both read the rendezvous
(``MASTER_ADDR``, ``MASTER_PORT``) from ``init_method`` and take the transport's name
(:data:`~asyncmomentum.runtimes.transport.TRANSPORTS`):

* ``"c10d"`` (default): rank 0 hosts the job's ``TCPStore`` on ``MASTER_ADDR`` only (under
  ``torchrun`` its agent hosts it already, and every rank connects); each worker then opens a
  two-rank process group with the server (:mod:`~asyncmomentum.runtimes.transport.c10d`). A
  leaving worker says so over its connection, and the server waits for every worker still
  alive to have left (or to time out) before it ends.
* ``"rpc"``: one static RPC group over the same rendezvous; a leaving worker says so over
  RPC, shuts its agent down, then writes a key into a small store the server hosts, so that
  the server shuts its own agent down without cutting a reply off.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch
import torch.distributed as dist
from torch import nn

from asyncmomentum.runtimes.server.config import ServerConfig
from asyncmomentum.runtimes.server.state import ParameterServer
from asyncmomentum.runtimes.transport import (
    SERVER_NAME,
    C10dHost,
    C10dTransport,
    Reply,
    RpcTransport,
    Transport,
    connect_store,
    flatten,
    host_store,
    init_rpc,
    local_address_toward,
    serving,
    shutdown_rpc,
    worker_name,
)

__all__ = ["connect_worker", "host_server"]


def host_server(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    world_size: int,
    config: ServerConfig,
    init_method: str,
) -> ParameterServer:
    """Serve ``model`` to ranks ``1 .. world_size - 1`` until the job ends; the server.

    Args:
        model: the model to train.
        optimizer: an optimizer over its parameters.
        world_size: 1 server + the number of workers.
        config: the server's configuration (``config.transport`` picks the link).
        init_method: the rendezvous (``"env://"``, ``"tcp://HOST:PORT"``).

    Raises:
        TimeoutError: a worker did not join within ``config.join_timeout`` (named).
    """
    if config.transport == "rpc":
        return _host_server_rpc(model, optimizer, world_size, config, init_method)
    host, port, agent = _address(init_method)
    if agent:  # torchrun's agent hosts the store on MASTER_PORT
        store = connect_store(host, port, timeout=config.join_timeout)
    else:
        store = host_store(host, port, timeout=config.join_timeout)
    server = ParameterServer(model, optimizer, world_size - 1, config)
    link = C10dHost(
        server,
        store,
        range(1, world_size),
        flatten(list(model.parameters())),
        address=local_address_toward(host),
        join_timeout=config.join_timeout,
        worker_timeout=config.worker_timeout,
        reply_timeout=config.rpc_timeout,
    )
    try:
        link.start()
        link.await_joined()
        server.start()
        server.serve()
        server.await_departures(link.signed_off)
    finally:
        link.close()
    return server


class WorkerLink:
    """A worker's open link: its :attr:`transport`, the :attr:`joined` reply, :meth:`close`.

    Args:
        transport: the link to the server.
        joined: the server's reply to the worker's join (its first parameters and version).
        close: leaves the server and closes the link.
    """

    def __init__(self, transport: Transport, joined: Reply, close: Callable[[], None]) -> None:
        self.transport = transport
        self.joined = joined
        self._close = close

    def close(self) -> None:
        """Leave the server (best effort: it may be gone already) and close the link."""
        self._close()


def connect_worker(
    model: nn.Module,
    rank: int,
    world_size: int,
    *,
    transport: str,
    timeout: float,
    join_timeout: float,
    init_method: str,
) -> WorkerLink:
    """Open worker ``rank``'s link to the server of the job, and join it.

    Args:
        model: the worker's model (its parameters' size, dtype and device shape the messages).
        rank: the worker's rank.
        world_size: 1 server + the number of workers.
        transport: the transport's name.
        timeout: seconds every call to the server may take.
        join_timeout: seconds to wait for the job's store and the server at start-up.
        init_method: the rendezvous.

    Raises:
        ConnectionError: the server could not be reached.
    """
    if transport == "rpc":
        return _connect_worker_rpc(rank, world_size, timeout, init_method)
    host, port, _ = _address(init_method)
    store = connect_store(host, port, timeout=join_timeout)
    with torch.no_grad():
        like = flatten([p.detach() for p in model.parameters()])
    link = C10dTransport(store, rank, like, timeout=timeout, server_address=host)
    try:
        joined = link.join(rank)
    except BaseException:
        link.close()
        raise

    def close() -> None:
        _try_leave(link, rank)
        link.close()

    return WorkerLink(link, joined, close)


def _address(init_method: str) -> tuple[str, int, bool]:
    """``(host, port, torchrun's agent hosts the store)`` of a rendezvous URL."""
    if init_method == "env://":
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), agent
    parsed = urlparse(init_method)
    if parsed.scheme != "tcp" or parsed.hostname is None or parsed.port is None:
        raise ValueError(f"init_method must be 'env://' or 'tcp://HOST:PORT', got {init_method!r}")
    return parsed.hostname, parsed.port, False


def _try_leave(transport: Transport, rank: int) -> None:
    """Tell the server this worker leaves; best effort, as the server may be gone already."""
    try:
        transport.leave(rank)
    except Exception as error:  # don't mask the error that ended the worker, if any
        warnings.warn(f"worker {rank} could not tell the server it leaves: {error}", stacklevel=2)


# -- over torch.distributed.rpc ------------------------------------------------------------------

#: The rendezvous scheme of RPC jobs: like torch's ``env://``, but the server's store listens
#: only on ``MASTER_ADDR`` (torch's binds every interface).
_BOUND_SCHEME = "asyncmomentum"
_bound_scheme_registered = False


def _host_server_rpc(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    world_size: int,
    config: ServerConfig,
    init_method: str,
) -> ParameterServer:
    for param in model.parameters():
        if param.device.type != "cpu":
            raise ValueError(
                f"the RPC transport serves a model on CPU, found a parameter on {param.device}: "
                "tensors travel over RPC without device maps; use the c10d transport (nccl "
                "carries CUDA tensors) or move the model with model.cpu()"
            )
    control = _host_control_store(config.rpc_timeout)
    server = ParameterServer(model, optimizer, world_size - 1, config, control_port=control.port)
    with serving(server):
        init_rpc(
            SERVER_NAME,
            0,
            world_size,
            init_method=_rpc_init_method(init_method, config.join_timeout),
            timeout=config.rpc_timeout,
        )
        try:
            server.start()
            server.serve()
            server.await_departures(lambda rank, timeout: _wait_key(control, rank, timeout))
        finally:
            shutdown_rpc()
    return server


def _connect_worker_rpc(rank: int, world_size: int, timeout: float, init_method: str) -> WorkerLink:
    init_rpc(
        worker_name(rank),
        rank,
        world_size,
        init_method=_rpc_init_method(init_method, timeout),
        timeout=timeout,
    )
    transport = RpcTransport()
    try:
        joined = transport.join(rank)  # the control store's port comes with it
        control = _connect_control(joined.control_port, timeout)
    except BaseException:
        shutdown_rpc()
        raise

    def close() -> None:
        # Leave, shut the agent down, then sign off: the server shuts its agent down only after
        # the sign-off, so none of this worker's calls is cut off.
        _try_leave(transport, rank)
        shutdown_rpc()
        try:
            control.set(_signed_off_key(rank), "1")
        except Exception as error:  # the server is gone: nobody waits for this key
            warnings.warn(f"worker {rank} could not sign off: {error}", stacklevel=2)

    return WorkerLink(transport, joined, close)


def _rpc_init_method(init_method: str, join_timeout: float) -> str:
    """RPC's rendezvous: torchrun's store as it is, else one the server hosts on MASTER_ADDR."""
    global _bound_scheme_registered
    if init_method != "env://" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return init_method
    if not _bound_scheme_registered:
        dist.register_rendezvous_handler(_BOUND_SCHEME, _bound_rendezvous)
        _bound_scheme_registered = True
    host = os.environ["MASTER_ADDR"]
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address in a URL
    return f"{_BOUND_SCHEME}://{host}:{os.environ['MASTER_PORT']}?timeout={join_timeout:g}"


def _bound_rendezvous(url: str, **kwargs: Any) -> Iterator[tuple[dist.Store, int, int]]:
    """Rendezvous (a torch handler) for ``asyncmomentum://HOST:PORT?timeout=S``.

    Rank 0 hosts the store on ``HOST`` only, the others connect; ``timeout`` bounds the wait for
    every rank.

    Args:
        url: the rendezvous URL, with ``rank`` and ``world_size`` added by torch.
        **kwargs: what torch's rendezvous passes on (unused).
    """
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    rank, world_size = int(query["rank"][0]), int(query["world_size"][0])
    timeout = float(query.get("timeout", ["300"])[0])
    host, port = parsed.hostname, parsed.port
    if host is None or port is None:
        raise ValueError(f"rendezvous URL {url!r} needs a host and a port")
    if rank == 0:
        store = host_store(host, port, timeout=timeout)
        _await_joins(store, world_size, timedelta(seconds=timeout))
    else:
        store = dist.TCPStore(
            host, port, world_size, is_master=False, timeout=timedelta(seconds=timeout)
        )
        store.set(_joined_key(rank), "1")
    yield store, rank, world_size
    raise RuntimeError("an asyncmomentum job does not rendezvous twice")


def _joined_key(rank: int) -> str:
    return f"asyncmomentum/joined/{rank}"


def _await_joins(store: dist.Store, world_size: int, timeout: timedelta) -> None:
    """Wait until every rank has joined; name the missing ones when the timeout runs out."""
    keys = [_joined_key(rank) for rank in range(1, world_size)]
    if not keys:
        return
    try:
        store.wait(keys, timeout)
    except (RuntimeError, dist.DistStoreError) as error:
        missing = [rank for rank, key in enumerate(keys, start=1) if not store.check([key])]
        if not missing:
            return
        raise TimeoutError(
            f"rank(s) {missing} did not join the job within {timeout.total_seconds():g} s "
            "(ServerConfig.join_timeout); the server gives up"
        ) from error


def _signed_off_key(rank: int) -> str:
    return f"asyncmomentum/left/{rank}"


def _wait_key(store: dist.Store, rank: int, timeout_s: float) -> bool:
    try:
        store.wait([_signed_off_key(rank)], timedelta(seconds=max(timeout_s, 1e-3)))
    except dist.DistStoreError:
        return False
    return True


def _control_host() -> str:
    # The server runs where MASTER_ADDR points (torchrun puts rank 0 on the master node).
    return os.environ.get("MASTER_ADDR", "127.0.0.1")


def _host_control_store(timeout_s: float) -> dist.TCPStore:
    """The store in which leaving workers sign off; its port travels in the server's replies."""
    host = _control_host()
    try:
        return host_store(host, 0, timeout=timeout_s)  # only where the workers will connect
    except OSError:  # MASTER_ADDR is not an address of this machine: listen on all of them
        listener = socket.create_server(("", 0))
        return dist.TCPStore(
            "127.0.0.1",  # the store's own client connects here
            listener.getsockname()[1],
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=timeout_s),
            master_listen_fd=listener.detach(),
        )


def _connect_control(port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(
        _control_host(), port, is_master=False, timeout=timedelta(seconds=timeout_s)
    )
