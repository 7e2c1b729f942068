"""What a transport costs by itself: one round trip, and the CPU of processes that only wait.

Two processes on loopback: a host serving an echo server (a push is answered with the pushed
tensor, no optimizer) and one worker. The worker times ``round_trips`` pushes of a flat tensor
of ``numel`` float32 elements (after a warm-up), then both sit idle, connected, for
``idle_seconds`` while each measures its own process's CPU time. Used by
:mod:`asyncmomentum.applications.benchmarks.server_throughput`, which prints the figures of every
transport side by side.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from typing import Any

import torch
from torch import Tensor

from asyncmomentum.runtimes.transport import (
    SERVER_NAME,
    C10dHost,
    C10dTransport,
    Reply,
    RpcTransport,
    connect_store,
    host_store,
    init_rpc,
    serving,
    shutdown_rpc,
    worker_name,
)

_WARMUP = 200
_TIMEOUT_S = 120.0


class _Echo:
    """A server that answers a push with the pushed tensor: the link's cost, nothing else."""

    def __init__(self, numel: int) -> None:
        self.params = torch.zeros(numel)
        self.version = 0

    def join(self, rank: int) -> Reply:
        return Reply(self.params.clone(), self.version, False, False)

    def push(
        self,
        rank: int,
        grad: Tensor,
        version: int,
        loss: float,
        present: tuple[int, ...] | None = None,
        batch_size: int | None = None,
    ) -> Reply:
        self.version += 1
        return Reply(grad.clone(), self.version, False, True)

    def leave(self, rank: int) -> None:
        pass

    def drop(self, rank: int) -> None:
        pass

    def checkpoint(self, path: str | None = None) -> str:
        raise ValueError("the echo server saves nothing")

    def requested_checkpoint_path(self, path: str | None) -> str | None:
        raise ValueError("the echo server saves nothing")


def measure(transport: str, numel: int, round_trips: int, idle_seconds: float) -> dict[str, Any]:
    """Round-trip time and idle CPU of ``transport`` between two fresh processes.

    Args:
        transport: ``"c10d"`` or ``"rpc"``.
        numel: float32 elements per message.
        round_trips: timed round trips.
        idle_seconds: how long both processes wait, connected, while their CPU is measured.

    Returns:
        ``round_trip_us`` (median of 5 blocks), ``idle_worker_cpu`` and ``idle_server_cpu``
        (CPU seconds per wall second while idle).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    timed = context.Event()  # the worker's round trips are done: both sides idle from now
    args = (transport, port, numel, round_trips, idle_seconds, results, timed)
    processes = [context.Process(target=_side, args=(rank, *args)) for rank in (0, 1)]
    # TensorPipe warns on stderr of every peer that shuts down, and a spawned child reads the
    # level when it imports torch, before its own code runs: set it for the children here.
    quiet = transport == "rpc" and "TORCH_CPP_LOG_LEVEL" not in os.environ
    if quiet:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    try:
        for process in processes:
            process.start()
    finally:
        if quiet:
            del os.environ["TORCH_CPP_LOG_LEVEL"]
    try:
        found = dict(results.get(timeout=_TIMEOUT_S) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=10.0)
            if process.is_alive():
                process.kill()
                process.join()
    if "error" in found:
        raise RuntimeError(found["error"])
    return {**found["server"], **found["worker"]}


def _side(
    rank: int,
    transport: str,
    port: int,
    numel: int,
    round_trips: int,
    idle_seconds: float,
    results: Any,
    timed: Any,
) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        if rank == 0:
            results.put(("server", _host(transport, port, numel, idle_seconds, timed)))
        else:
            figures = _work(transport, port, numel, round_trips, idle_seconds, timed)
            results.put(("worker", figures))
    except Exception as error:
        results.put(("error", f"{transport} rank {rank}: {error!r}"))
    results.close()
    results.join_thread()  # the result is in the pipe before the process ends
    os._exit(0)  # skip the seconds-long teardown of torch's distributed state


def _idle_cpu(seconds: float) -> float:
    began, cpu = time.monotonic(), time.process_time()
    time.sleep(seconds)
    return (time.process_time() - cpu) / (time.monotonic() - began)


def _host(
    transport: str, port: int, numel: int, idle_seconds: float, timed: Any
) -> dict[str, float]:
    echo = _Echo(numel)
    if transport == "rpc":
        with serving(echo):
            init_rpc(SERVER_NAME, 0, 2, init_method=f"tcp://127.0.0.1:{port}", timeout=_TIMEOUT_S)
            idle = _await_idle(timed, idle_seconds)
            shutdown_rpc()
        return {"idle_server_cpu": idle}
    store = host_store("127.0.0.1", port, timeout=_TIMEOUT_S)
    host = C10dHost(
        echo,
        store,
        [1],
        torch.zeros(numel),
        address="127.0.0.1",
        join_timeout=_TIMEOUT_S,
        worker_timeout=_TIMEOUT_S,
    )
    host.start()
    idle = _await_idle(timed, idle_seconds)
    host.signed_off(1, _TIMEOUT_S)
    return {"idle_server_cpu": idle}


def _await_idle(timed: Any, idle_seconds: float) -> float:
    """Wait until the worker's timed pushes are done (it then idles too), measure idle CPU."""
    if not timed.wait(_TIMEOUT_S):
        raise TimeoutError("the worker did not finish its round trips")
    return _idle_cpu(idle_seconds)


def _work(
    transport: str, port: int, numel: int, round_trips: int, idle_seconds: float, timed: Any
) -> dict[str, float]:
    if transport == "rpc":
        init_rpc(worker_name(1), 1, 2, init_method=f"tcp://127.0.0.1:{port}", timeout=_TIMEOUT_S)
        link: Any = RpcTransport()
    else:
        store = connect_store("127.0.0.1", port, timeout=_TIMEOUT_S)
        link = C10dTransport(store, 1, torch.zeros(numel), timeout=_TIMEOUT_S)
    reply = link.join(1)
    grad = torch.randn(numel)
    for _ in range(_WARMUP):
        reply = link.push(1, grad, reply.version, 0.0)
    blocks = []
    per_block = max(round_trips // 5, 1)
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(per_block):
            reply = link.push(1, grad, reply.version, 0.0)
        blocks.append((time.perf_counter() - began) / per_block)
    timed.set()
    idle = _idle_cpu(idle_seconds)
    if transport == "rpc":
        shutdown_rpc()
    else:
        link.leave(1)
    return {"round_trip_us": sorted(blocks)[2] * 1e6, "idle_worker_cpu": idle}
