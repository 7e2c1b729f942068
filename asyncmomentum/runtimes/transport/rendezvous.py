"""Where a job's processes meet: a ``TCPStore`` that listens on one interface only.

torch's own ``env://`` and ``tcp://`` stores listen on every interface of the host; a job's
store here listens only on the address the user chose (``MASTER_ADDR``, loopback for local
jobs), and every other listener of a connection (:mod:`.c10d`) binds the address that reaches it.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch.distributed as dist

__all__ = ["connect_store", "host_store", "local_address_toward"]


def host_store(host: str, port: int, *, timeout: float) -> dist.TCPStore:
    """Host a store listening on ``host`` only.

    Args:
        host: the address to listen on (``MASTER_ADDR``).
        port: the port (0: a free one; read it from ``store.port``).
        timeout: seconds every wait on the store may take.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family)  # this interface only
    return dist.TCPStore(
        host,
        listener.getsockname()[1],
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=timeout),
        master_listen_fd=listener.detach(),  # the store owns and closes the socket
    )


def connect_store(host: str, port: int, *, timeout: float) -> dist.TCPStore:
    """Connect to the store at ``host:port``.

    Args:
        host: the store's address.
        port: its port.
        timeout: seconds to wait for it to answer, and for every wait on it.

    Raises:
        ConnectionError: no store answered within ``timeout``.
    """
    try:
        return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout))
    except (RuntimeError, dist.DistError) as error:
        raise ConnectionError(
            f"no store of the job answered at {host}:{port} within {timeout:g} s ({error!s:.200})"
        ) from error


def local_address_toward(host: str) -> str:
    """The address of this machine that reaches ``host`` (``host`` itself if it is local).

    A connection's listener binds this address: loopback for a loopback ``host``, else the
    interface the routing table picks for it, never every interface.

    Args:
        host: the address of the peer (``MASTER_ADDR``).
    """
    try:
        info = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0]
    except OSError:
        return host
    family, _, _, _, address = info
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((address[0], 9))  # UDP: no packet is sent, the route picks an address
            return str(probe.getsockname()[0])
        except OSError:
            return host
