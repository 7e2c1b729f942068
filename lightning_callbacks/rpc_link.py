"""The RPC group of an asynchronous Lightning job: its rendezvous and the leaders' sign-off.

Lightning's process group already holds ``MASTER_PORT``; the RPC group between the server (in
rank 0) and the leaders of the other compute groups needs a rendezvous of its own. Rank 0 hosts
a ``TCPStore`` on a fresh port of ``MASTER_ADDR`` only (torch's ``tcp://`` store listens on every
interface) and tells the others the port over Lightning's process group. The same store carries
the leaders' sign-off: the server shuts its RPC agent down only once every leader still alive has
shut its own down, so no reply is cut off.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch.distributed as dist

__all__ = ["RpcLink", "keep_transport_on_loopback"]

_SCHEME = "asyncmomentum-lightning"
_STORES: dict[tuple[str, int], dist.TCPStore] = {}
_registered = False


def _rendezvous(url: str, **kwargs: Any) -> Iterator[tuple[dist.Store, int, int]]:
    """Torch rendezvous handler: the store this process already holds for ``url``'s address.

    Args:
        url: ``asyncmomentum-lightning://HOST:PORT`` with torch's ``rank`` and ``world_size``.
        **kwargs: what torch's rendezvous passes on (unused).
    """
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    rank, world_size = int(query["rank"][0]), int(query["world_size"][0])
    key = (str(parsed.hostname), int(parsed.port or 0))
    if key not in _STORES:
        raise RuntimeError(f"no store was opened for {url!r} in this process")
    yield _STORES[key], rank, world_size
    raise RuntimeError("an asynchronous Lightning job does not rendezvous twice")


def _register() -> None:
    global _registered
    if not _registered:
        dist.register_rendezvous_handler(_SCHEME, _rendezvous)
        _registered = True


class RpcLink:
    """One process's handle on the job's RPC rendezvous store.

    Args:
        host: ``MASTER_ADDR``; the store listens on this address only.
        port: the store's port (0 on rank 0: a free one is chosen).
        host_it: whether this process hosts the store (rank 0).
        timeout: how long store operations wait.
    """

    def __init__(self, host: str, port: int, *, host_it: bool, timeout: timedelta) -> None:
        _register()
        self.host = host
        self.timeout = timeout
        if host_it:
            listener = socket.create_server((host, port))  # this interface only
            self.port = listener.getsockname()[1]
            self.store = dist.TCPStore(
                host,
                self.port,
                is_master=True,
                timeout=timeout,
                wait_for_workers=False,
                master_listen_fd=listener.detach(),  # the store owns and closes the socket
            )
        else:
            self.port = port
            self.store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        _STORES[(self.host, self.port)] = self.store

    @property
    def init_method(self) -> str:
        """The URL to give ``init_rpc``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{_SCHEME}://{host}:{self.port}"

    def sign_off(self, group: int) -> None:
        """Say that the leader of ``group`` has shut its RPC agent down.

        Args:
            group: the group's index.
        """
        self.store.set(_left_key(group), "1")

    def signed_off(self, group: int, timeout_s: float) -> bool:
        """Whether the leader of ``group`` signs off within ``timeout_s`` seconds.

        Args:
            group: the group's index.
            timeout_s: how long to wait.
        """
        try:
            self.store.wait([_left_key(group)], timedelta(seconds=max(timeout_s, 1e-3)))
        except dist.DistStoreError:
            return False
        return True

    def close(self) -> None:
        """Forget the store (the rendezvous is over)."""
        _STORES.pop((self.host, self.port), None)


def _left_key(group: int) -> str:
    return f"asyncmomentum/lightning/left/{group}"


def keep_transport_on_loopback(host: str) -> None:
    """Keep TensorPipe on the loopback interface when the job's address is a loopback one.

    TensorPipe picks an interface from the host name unless told; a user's setting wins.

    Args:
        host: ``MASTER_ADDR``.
    """
    try:
        loopback = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return
    names = [name for _, name in socket.if_nameindex()]
    interface = "lo" if "lo" in names else next((n for n in names if n.startswith("lo")), None)
    if loopback and interface is not None:
        os.environ.setdefault("TP_SOCKET_IFNAME", interface)
