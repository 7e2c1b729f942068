"""The c10d link: a real server host and real worker connections (gloo pairs) on loopback.

Both sides run in this process (each in its own threads, on its own store clients).
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import make_cnn

from asyncmomentum.core.optimizer import AsyncMomentumSGD
from asyncmomentum.runtimes.server import ParameterServer, ServerConfig
from asyncmomentum.runtimes.transport import (
    SECRET_ENV,
    C10dHost,
    C10dTransport,
    Transport,
    c10d,
    flatten,
    host_store,
)

SECRET = "the-job-secret"


def make_server(tmp_path: Path | None = None, workers: int = 2, **config) -> ParameterServer:
    model = make_cnn(0)
    optimizer = AsyncMomentumSGD(model.parameters(), lr=0.05, momentum=0.9, warmup=0)
    config.setdefault("total_updates", 1000)
    if tmp_path is not None:
        (tmp_path / "job").mkdir()
        config.setdefault("checkpoint_path", str(tmp_path / "job" / "ps.pt"))
    return ParameterServer(model, optimizer, workers, ServerConfig(**config))


def flat_params(server: ParameterServer) -> torch.Tensor:
    return flatten([p.detach() for p in server.model.parameters()])


def flat_gradient(server: ParameterServer) -> torch.Tensor:
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    loss = server.model(x).logsumexp(dim=1).mean()
    return flatten(torch.autograd.grad(loss, list(server.model.parameters())))


class Job:
    """A server behind a C10dHost on loopback, and a way to connect workers to it."""

    def __init__(self, server: ParameterServer, **host_options) -> None:
        self.server = server
        self.store = host_store("127.0.0.1", 0, timeout=20)
        self.like = flat_params(server)
        options = {"join_timeout": 20.0, "worker_timeout": 20.0, "reply_timeout": 20.0}
        options.update(host_options)
        self.host = C10dHost(
            server,
            self.store,
            range(1, server.num_workers + 1),
            self.like,
            address="127.0.0.1",
            **options,
        )
        self.host.start()
        self.links: list[C10dTransport] = []
        server.start()

    def connect(self, rank: int, like: torch.Tensor | None = None, **options) -> C10dTransport:
        options.setdefault("timeout", 20.0)
        options.setdefault("secret", SECRET)
        link = C10dTransport(self.store, rank, self.like if like is None else like, **options)
        self.links.append(link)
        return link

    def close(self) -> None:
        """Close every worker's end (the host's threads then end at once), then the host."""
        for link in self.links:
            link.close()
        self.host.close()
        for rank in self.host.ranks:
            self.host._ended[rank].wait(10.0)


@pytest.fixture
def job(monkeypatch, tmp_path) -> Iterator[Job]:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    opened = Job(make_server(tmp_path))
    try:
        yield opened
    finally:
        opened.close()


def test_a_connection_joins_pushes_checkpoints_and_leaves(job: Job, tmp_path: Path) -> None:
    server = job.server
    link = job.connect(1)
    other = job.connect(2)
    assert isinstance(link, Transport)
    job.host.await_joined()
    joined, other_joined = link.join(1), other.join(2)
    assert (joined.version, joined.stop, joined.applied) == (0, False, False)
    assert torch.equal(joined.params, flat_params(server))
    grad = flat_gradient(server)
    reply = link.push(1, grad, joined.version, 1.5)
    assert (reply.version, reply.applied, reply.stop) == (1, True, False)
    assert torch.equal(reply.params, flat_params(server))
    # Staleness is the server's: rank 2 read version 0, one update happened since.
    other_reply = other.push(2, grad, other_joined.version, 2.5)
    assert other_reply.version == 2
    assert [p.staleness for p in server.result().trace] == [0, 1]
    assert [p.loss for p in server.result().trace] == [1.5, 2.5]
    # A push with gradients for some parameters only: the others get none.
    reply = link.push(1, grad, reply.version, 1.0, present=(0, 1))
    assert reply.applied
    # The server's own errors pass through with their type; nothing changed.
    before = flat_params(server)
    with pytest.raises(ValueError, match="pushed a gradient of version 99"):
        link.push(1, grad, 99, 1.0)
    with pytest.raises(ValueError, match="increasing"):
        link.push(1, grad, reply.version, 1.0, present=(1, 0))
    with pytest.raises(ValueError, match="flat gradient of"):
        link.push(1, grad[:-1], reply.version, 1.0)
    assert torch.equal(flat_params(server), before)
    assert server.version == 3
    # Checkpoints: inside the job's folder only.
    assert link.checkpoint(None) == str(tmp_path / "job" / "ps.pt")
    assert link.checkpoint(str(tmp_path / "job" / "mid.pt")) == str(tmp_path / "job" / "mid.pt")
    with pytest.raises(ValueError, match="checkpoint folder"):
        link.checkpoint(str(tmp_path / "elsewhere.pt"))
    assert os.path.exists(tmp_path / "job" / "mid.pt")
    # Leaving: the server stops expecting the worker, and the connection is closed.
    link.leave(1)
    assert job.host.signed_off(1, 5.0)
    with pytest.raises(ConnectionError, match="closed"):
        link.push(1, grad, 3, 1.0)
    other.leave(2)
    assert job.host.signed_off(2, 5.0)
    assert server.result().left_workers == (1, 2)
    assert server.result().stop_reason == "no_workers"


def test_a_wrong_secret_is_refused_changes_nothing_and_the_rank_can_join_after(
    job: Job,
) -> None:
    before = flat_params(job.server)
    for wrong in ("", "another-secret"):
        with pytest.raises(PermissionError, match="secret"):
            job.connect(1, secret=wrong)
    assert job.server.version == 0
    assert torch.equal(flat_params(job.server), before)
    assert job.server.result().dropped_workers == ()
    link = job.connect(1)  # the rank's next attempt, with the secret
    job.connect(2)
    assert link.push(1, flat_gradient(job.server), link.join(1).version, 1.0).applied


def test_a_worker_of_another_model_is_refused_by_name(job: Job) -> None:
    with pytest.raises(ValueError, match=r"has 10 parameter elements, the server's \d+"):
        job.connect(1, like=job.like[:10])
    with pytest.raises(ValueError, match=r"float64 on cpu, the server's torch\.float32 on cpu"):
        job.connect(1, like=job.like.double())
    with pytest.raises(ValueError, match="carries"):
        job.connect(1, like=job.like.long())
    assert job.server.version == 0


def _listening_addresses(pid: int | str = "self") -> set[str]:
    """The local addresses the process's listening TCP sockets are bound to (Linux)."""
    return {address for address, _ in _listeners(pid)}


def _listeners(pid: int | str = "self") -> set[tuple[str, int]]:
    """``(address, port)`` of every listening TCP socket of the process (Linux)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            raw_address, raw_port = local.split(":")
            raw = bytes.fromhex(raw_address)
            if family == socket.AF_INET:
                address = socket.inet_ntop(family, raw[::-1])
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                address = socket.inet_ntop(family, words)
            found.add((address, int(raw_port, 16)))
    return found


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="reads Linux's /proc")
def test_the_store_and_every_connection_listen_on_loopback_only(monkeypatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    before = _listeners()  # other tests' listeners in this process are not this job's
    job = Job(make_server())
    try:
        links = [job.connect(1), job.connect(2)]
        job.host.await_joined()
        opened = _listeners() - before
        # The store, the server's device, and each worker's device.
        assert len(opened) >= 4, opened
        assert {address for address, _ in opened} <= {"127.0.0.1", "::ffff:127.0.0.1"}, opened
        for rank, link in enumerate(links, start=1):
            link.leave(rank)
    finally:
        job.close()


def test_a_worker_whose_server_is_gone_gets_a_connection_error_in_time(job: Job) -> None:
    link = job.connect(1)
    job.connect(2)
    reply = link.join(1)
    job.host.close()  # the server closes: the next message learns it, then the link closes
    began = time.monotonic()
    with pytest.raises(ConnectionError, match="lost the parameter server"):
        link.push(1, flat_gradient(job.server), reply.version, 1.0)
    with pytest.raises(ConnectionError, match="closed"):
        link.push(1, flat_gradient(job.server), reply.version, 1.0)
    assert time.monotonic() - began < 10.0
    assert job.server.version == 0


def test_a_worker_whose_connection_breaks_is_dropped_at_once(job: Job) -> None:
    dead, alive = job.connect(1), job.connect(2)
    dead.join(1)
    dead.close()  # as a killed process's sockets close: no goodbye
    assert not job.host.signed_off(1, 10.0)  # its connection ended, without leaving
    assert job.server.result().dropped_workers == (1,)
    assert alive.push(2, flat_gradient(job.server), alive.join(2).version, 1.0).applied


def test_a_silent_worker_is_dropped_after_the_worker_timeout(monkeypatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    job = Job(make_server(workers=1), worker_timeout=1.0)
    try:
        link = job.connect(1)
        link.join(1)
        began = time.monotonic()
        assert not job.host.signed_off(1, 10.0)
        assert 0.9 < time.monotonic() - began < 5.0
        assert job.server.result().dropped_workers == (1,)
    finally:
        job.close()


def test_a_rank_that_never_connects_is_named_within_the_join_timeout(monkeypatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    job = Job(make_server(workers=2), join_timeout=2.0)
    try:
        job.connect(1)
        began = time.monotonic()
        with pytest.raises(TimeoutError, match=r"rank\(s\) \[2\] did not join the job within 2 s"):
            job.host.await_joined()
        assert time.monotonic() - began < 5.0
    finally:
        job.close()


def test_large_payloads_travel_apart_from_their_header(monkeypatch) -> None:
    # A model above INLINE_MAX_BYTES: header and payload are two messages each way.
    monkeypatch.setenv(SECRET_ENV, SECRET)
    model = torch.nn.Linear(300, 300)
    assert sum(p.numel() for p in model.parameters()) * 4 > c10d.INLINE_MAX_BYTES
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    server = ParameterServer(model, optimizer, 1, ServerConfig(total_updates=10))
    job = Job(server)
    try:
        link = job.connect(1)
        reply = link.join(1)
        grad = torch.full_like(job.like, 0.5)
        reply = link.push(1, grad, reply.version, math.pi)
        assert reply.applied
        assert torch.allclose(reply.params, job.like - 0.05)
        assert server.result().trace[-1].loss == math.pi
        link.leave(1)
    finally:
        job.close()


def test_the_loss_travels_bit_for_bit(job: Job) -> None:
    link = job.connect(1)
    job.connect(2)
    reply = link.join(1)
    grad = flat_gradient(job.server)
    for value in (0.0, -1.5, math.pi, 1e-300, math.inf, math.nan):
        reply = link.push(1, grad, reply.version, value)
    losses = [point.loss for point in job.server.result().trace]
    assert losses[:5] == [0.0, -1.5, math.pi, 1e-300, math.inf]
    assert math.isnan(losses[5])


def test_the_batch_size_travels_with_a_push_and_a_bad_one_is_refused(job: Job) -> None:
    link = job.connect(1)
    job.connect(2)
    reply = link.join(1)
    received = []
    push = job.server.push

    def recording(*args):
        received.append(args[5])  # (rank, grad, version, loss, present, batch_size)
        return push(*args)

    job.server.push = recording
    grad = flat_gradient(job.server)
    for size in (32, None, 4):
        reply = link.push(1, grad, reply.version, 1.0, batch_size=size)
    assert received == [32, None, 4]
    # A negative batch size is the server's ValueError, raised on the worker; nothing applied.
    version = job.server.version
    with pytest.raises(ValueError, match="batch_size"):
        link.push(1, grad, reply.version, 1.0, batch_size=-3)
    assert job.server.version == version


def test_a_worker_told_to_stop_that_closes_without_a_goodbye_has_left(monkeypatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    job = Job(make_server(workers=1, total_updates=2))
    try:
        link = job.connect(1)
        reply = link.join(1)
        grad = flat_gradient(job.server)
        while not reply.stop:
            reply = link.push(1, grad, reply.version, 1.0)
        link.close()  # no leave message: the server had released it
        assert job.host.signed_off(1, 10.0)
        result = job.server.result()
        assert (result.left_workers, result.dropped_workers) == ((1,), ())
    finally:
        job.close()


def test_a_cuda_payload_goes_over_its_own_nccl_pair_and_never_inline(monkeypatch) -> None:
    # No GPU here: the nccl group is replaced, the choice of the path is what is checked.
    opened = []
    monkeypatch.setattr(
        c10d, "_nccl_pair", lambda store, rank, timeout: opened.append(rank) or "nccl"
    )
    store = host_store("127.0.0.1", 0, timeout=20)
    pairs: dict[int, c10d._Pair] = {}

    def build(rank: int) -> None:
        own = c10d._clone(store)  # one store client per side, as in two processes
        pairs[rank] = c10d._Pair(c10d._pair_store(own, 9, 1), rank, c10d._device("127.0.0.1"), 20)

    import threading

    other = threading.Thread(target=build, args=(0,))
    other.start()
    build(1)
    other.join()
    small = torch.device("cuda")  # even a payload far below INLINE_MAX_BYTES
    for pair in pairs.values():
        pair.fit(10, torch.float32, small, 20.0)
        assert (pair.inline, pair.data) == (False, "nccl")
        assert pair.control is not pair.data  # the header still goes over gloo
        pair.close()
    assert sorted(opened) == [0, 1]
    cpu = c10d._Pair.__new__(c10d._Pair)
    cpu._store, cpu._rank, cpu.control = store, 0, "gloo"
    cpu.data = cpu.control
    cpu.fit(10, torch.float32, torch.device("cpu"), 20.0)
    assert (cpu.inline, cpu.data) == (True, "gloo")
