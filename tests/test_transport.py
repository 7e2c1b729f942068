"""The transport: flat buffers, the in-process link, and the RPC link in a one-process group."""

from __future__ import annotations

import math
import socket

import pytest
import torch
from conftest import make_cnn

from asyncmomentum.core.optimizer import AsyncMomentumSGD
from asyncmomentum.runtimes.server import ParameterServer, ServerConfig
from asyncmomentum.runtimes.transport import (
    SERVER_NAME,
    LocalTransport,
    Reply,
    RpcTransport,
    Transport,
    flatten,
    init_rpc,
    load_flat,
    serving,
    shutdown_rpc,
)
from asyncmomentum.runtimes.transport import rpc as transport


def make_server(tmp_path=None, **config) -> ParameterServer:
    model = make_cnn(0)
    optimizer = AsyncMomentumSGD(model.parameters(), lr=0.05, momentum=0.9, warmup=0)
    config.setdefault("total_updates", 100)
    if tmp_path is not None:
        config.setdefault("checkpoint_path", str(tmp_path / "job" / "ps.pt"))
        (tmp_path / "job").mkdir()
    return ParameterServer(model, optimizer, 1, ServerConfig(**config))


def flat_gradient(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    loss = model(x).logsumexp(dim=1).mean()
    return flatten(torch.autograd.grad(loss, list(model.parameters())))


def test_flatten_and_load_flat_round_trip() -> None:
    source, target = make_cnn(0), make_cnn(1)
    flat = flatten(list(source.parameters()))
    assert flat.dim() == 1
    assert flat.numel() == sum(p.numel() for p in source.parameters())
    flat[0] += 0  # a fresh tensor, not a view of a parameter
    assert flat.untyped_storage().data_ptr() not in {
        p.untyped_storage().data_ptr() for p in source.parameters()
    }
    load_flat(list(target.parameters()), flat)
    assert all(
        torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters(), strict=True)
    )


def test_bad_flat_buffers_raise_and_change_nothing() -> None:
    model = make_cnn(0)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    flat = flatten(params)
    for bad, match in (
        (flat[:-1], "elements but the"),
        (flat.reshape(2, -1), "one 1-D tensor"),
        (flat.double(), "torch.float64"),
        ([flat], "one 1-D tensor, got list"),
    ):
        with pytest.raises(ValueError, match=match):
            load_flat(params, bad)
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    with pytest.raises(ValueError, match="non-empty"):
        flatten([])
    with pytest.raises(ValueError, match="one dtype"):
        flatten([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])


def test_small_flat_tensors_travel_as_bytes_and_large_ones_as_tensors() -> None:
    small = torch.randn(100)
    packed = transport._pack(small)
    assert isinstance(packed, transport._Packed)
    assert isinstance(packed.data, bytes)
    unpacked = transport._unpack(packed)
    assert torch.equal(unpacked, small)
    unpacked += 1  # fresh and writable: the receiver may keep it
    assert not torch.equal(unpacked, small)
    for dtype in (torch.float64, torch.bfloat16, torch.int64):
        value = torch.arange(5).to(dtype)
        assert torch.equal(transport._unpack(transport._pack(value)), value)
    empty = transport._unpack(transport._pack(torch.empty(0)))
    assert (empty.numel(), empty.dtype) == (0, torch.float32)
    large = torch.zeros(transport.INLINE_MAX_BYTES // 4 + 1)
    assert transport._pack(large) is large
    square = torch.zeros(3, 3)
    assert transport._pack(square) is square  # not flat: the receiver's checks refuse it
    for bad, match in (
        (transport._Packed("Tensor", b"1234"), "names no torch dtype"),
        (transport._Packed("float32", b"123"), "no whole number"),
    ):
        with pytest.raises(ValueError, match=match):
            transport._unpack(bad)


def test_both_transports_are_transports() -> None:
    assert isinstance(LocalTransport(make_server()), Transport)
    assert isinstance(RpcTransport(), Transport)
    with pytest.raises(ValueError, match="timeout"):
        RpcTransport(timeout=0)


def test_the_local_transport_drives_a_server(tmp_path) -> None:
    server = make_server(tmp_path)
    link = LocalTransport(server)
    joined = link.join(1)
    assert isinstance(joined, Reply)
    assert (joined.version, joined.stop, joined.applied) == (0, False, False)
    reply = link.push(1, flat_gradient(server.model), joined.version, 1.5)
    assert (reply.version, reply.applied) == (1, True)
    assert server.result().trace[-1].loss == 1.5
    assert link.checkpoint(None) == str(tmp_path / "job" / "ps.pt")
    with pytest.raises(ValueError, match="checkpoint folder"):
        link.checkpoint(str(tmp_path / "elsewhere.pt"))
    link.leave(1)
    assert link.join(1).stop


def test_serving_is_one_server_per_process_and_ends_with_its_block() -> None:
    server = make_server()
    with serving(server):
        assert transport._authorized("") is server
        with pytest.raises(RuntimeError, match="already runs"), serving(make_server()):
            pass
        assert transport._authorized("") is server
    with pytest.raises(RuntimeError, match="no parameter server runs in this process"):
        transport._remote_join(1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_rpc_transport_in_a_group_of_one(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TP_SOCKET_IFNAME", "lo")  # keep TensorPipe on loopback
    monkeypatch.setenv("ASYNCMOMENTUM_JOB_SECRET", "s3cret")
    server = make_server(tmp_path)
    server.start()
    with serving(server):
        init_rpc(SERVER_NAME, 0, 1, init_method=f"tcp://127.0.0.1:{_free_port()}", timeout=30)
        try:
            link = RpcTransport()
            joined = link.join(1)
            assert joined.params.dim() == 1
            grad = flat_gradient(server.model)
            reply = link.push(1, grad, joined.version, 1.0)
            assert (reply.version, reply.applied) == (1, True)
            assert torch.equal(reply.params, flatten(list(server.model.parameters())))
            again = link.push(1, grad, reply.version, 1.0, batch_size=16)
            assert again.version == 2
            assert torch.equal(again.params, flatten(list(server.model.parameters())))
            # An error the server raises passes through with its type.
            with pytest.raises(ValueError, match="pushed a gradient of version 7"):
                link.push(1, grad, 7, 1.0)
            # A wrong secret is the server's refusal, not a transport failure.
            with pytest.raises(PermissionError, match="secret"):
                RpcTransport(secret="wrong").join(1)
            # A server that cannot be reached is a ConnectionError.
            with pytest.raises(ConnectionError, match="lost the parameter server 'nobody'"):
                RpcTransport("nobody").join(1)
            assert link.checkpoint(None) == str(tmp_path / "job" / "ps.pt")
            link.leave(1)
            assert link.join(1).stop
            assert server.version == 2
            assert not math.isnan(server.result().trace[-1].loss)
        finally:
            shutdown_rpc()
