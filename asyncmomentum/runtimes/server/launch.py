"""One whole job on this machine: :func:`launch_local` spawns the server and its workers."""

from __future__ import annotations

import ipaddress
import multiprocessing
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, cast

import torch

from asyncmomentum.core.validation import (
    check_positive,
)
from asyncmomentum.runtimes.server.config import (
    ParameterServerJob,
    ServerConfig,
    ServerResult,
    WorkerResult,
)
from asyncmomentum.runtimes.server.processes import run_from_env
from asyncmomentum.runtimes.supervision import end_processes
from asyncmomentum.runtimes.transport import (
    SECRET_ENV,
    SERVER_NAME,
    new_secret,
    worker_name,
)

# Seconds a child of launch_local gets to end after SIGTERM before SIGKILL.
_KILL_GRACE_S = 5.0

# Once the server has finished, seconds a worker still running gets to end by itself; then the
# launcher terminates it (and kills it _TERM_GRACE_S later if it ignores SIGTERM).
_WORKER_GRACE_S = 3.0
_TERM_GRACE_S = 1.0


@dataclass(frozen=True)
class WorkerOutcome:
    """How one worker process of a local job ended.

    Attributes:
        exitcode: the process's exit code (negative: killed by that signal, by the launcher too
            when it was still running a few seconds after the server finished, which ``error``
            then says; ``None``: it could not be ended).
        result: its :class:`WorkerResult`, if it finished normally.
        error: the traceback of the exception that ended it, if any.
    """

    exitcode: int | None
    result: WorkerResult | None = None
    error: str | None = None


@dataclass(frozen=True)
class LocalJobResult:
    """What :func:`launch_local` ran.

    Attributes:
        server: the server's result.
        workers: each worker's outcome, by rank.
        pids: process ids of server and workers (all ended by the time this is returned).
        port: the ``MASTER_PORT`` the job used.
        wind_down_s: seconds from the server's result to every process ended (workers that
            outlive the server get a short grace, then are killed).
    """

    server: ServerResult
    workers: dict[int, WorkerOutcome] = field(default_factory=dict)
    pids: tuple[int, ...] = ()
    port: int = 0
    wind_down_s: float = 0.0


def launch_local(
    job: ParameterServerJob,
    workers: int = 3,
    config: ServerConfig | None = None,
    *,
    worker_max_steps: int | None = None,
    timeout: float = 300.0,
    host: str = "127.0.0.1",
) -> LocalJobResult:
    """Run a whole job on this machine: 1 server and ``workers`` worker processes (spawned).

    Every process is ended before this returns, even on error or timeout.

    Args:
        job: what to train (its factories are pickled into the processes).
        workers: number of worker processes.
        config: the server's configuration.
        worker_max_steps: each worker leaves after this many applied gradients.
        timeout: seconds the whole job may take, start-up included; then every process is
            killed and ``TimeoutError`` raised.
        host: address to rendezvous on (loopback by default).

    Raises:
        RuntimeError: the server failed (its traceback is in the message).
        TimeoutError: the job did not finish within ``timeout``.
    """
    check_positive(workers, "workers", integer=True)
    check_positive(timeout, "timeout")
    if not isinstance(job, ParameterServerJob):
        raise ValueError(f"job must be a ParameterServerJob, got {type(job)!r}")
    config = ServerConfig() if config is None else config
    deadline = time.monotonic() + timeout
    port = _free_port(host)
    env = _local_env(host, port, world_size=workers + 1)
    env[SECRET_ENV] = new_secret()  # a fresh secret per job
    context = multiprocessing.get_context("spawn")
    processes, connections = [], []
    finished = False
    # TensorPipe warns on stderr of every peer that shuts down; the children read the level
    # from the environment they are spawned with. A level the user set wins.
    quiet = config.transport == "rpc" and "TORCH_CPP_LOG_LEVEL" not in os.environ
    if quiet:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    try:
        for rank in range(workers + 1):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_local_entry,
                args=(rank, env, job, config, worker_max_steps, sender),
                name=SERVER_NAME if rank == 0 else worker_name(rank),
                daemon=True,
            )
            process.start()
            sender.close()  # the child holds its end; ours must close so EOF shows a crash
            processes.append(process)
            connections.append(receiver)
        if quiet:
            del os.environ["TORCH_CPP_LOG_LEVEL"]
            quiet = False
        try:
            server = _collect_server(processes[0], connections[0], deadline)
        except RuntimeError as error:
            # The workers may say more (e.g. that they lost the server): add what they report.
            outcomes = _collect_workers(processes[1:], connections[1:], deadline)
            raise RuntimeError(f"{error}{_worker_errors(outcomes)}") from None
        server_done = time.monotonic()
        outcomes = _collect_workers(processes[1:], connections[1:], deadline)
        end_processes(processes, min(deadline, time.monotonic() + _WORKER_GRACE_S), _KILL_GRACE_S)
        finished = True
        return LocalJobResult(
            server,
            outcomes,
            tuple(cast(int, p.pid) for p in processes),  # all started: each has a pid
            port,
            wind_down_s=time.monotonic() - server_done,
        )
    finally:
        if quiet:
            os.environ.pop("TORCH_CPP_LOG_LEVEL", None)
        # After a failure the other children cannot finish their job: end them now.
        grace_end = min(deadline, time.monotonic() + _WORKER_GRACE_S)
        end_processes(processes, grace_end if finished else time.monotonic(), _KILL_GRACE_S)
        for connection in connections:
            connection.close()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _local_env(host: str, port: int, world_size: int) -> dict[str, str]:
    env = {"MASTER_ADDR": host, "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size)}
    interface = _loopback_interface() if _is_loopback(host) else None
    if interface is not None:
        # TensorPipe and Gloo pick an interface from the host name unless told: keep to loopback.
        env["TP_SOCKET_IFNAME"] = interface
        env["GLOO_SOCKET_IFNAME"] = interface
    return env


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    if "lo" in names:
        return "lo"
    return next((name for name in names if name.startswith("lo")), None)


def _local_entry(
    rank: int,
    env: dict[str, str],
    job: ParameterServerJob,
    config: ServerConfig,
    worker_max_steps: int | None,
    connection: Connection,
) -> None:
    """Body of one spawned process of :func:`launch_local`: its part, its result down the pipe."""
    os.environ.update(env)
    os.environ["RANK"] = str(rank)
    # A launcher that itself runs under torchrun must not send this job to torchrun's store.
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    torch.set_num_threads(1)
    try:
        result = run_from_env(job, config, worker_max_steps=worker_max_steps)
    except BaseException:
        connection.send(("error", traceback.format_exc()))
        connection.close()
        raise
    connection.send(("ok", result))
    connection.close()
    # The work is done and the link is down, but the interpreter's teardown of torch's RPC
    # and Gloo state takes seconds (measured: about 5 s per process on 2 cores). Skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _receive(connection: Connection, process: Any, deadline: float) -> tuple[str, Any] | None:
    """The message a child sends before it ends, or ``None`` if it ended without one."""
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not wait([connection, process.sentinel], timeout=remaining):
        raise TimeoutError(f"{process.name} did not finish within the launcher's timeout")
    try:
        return connection.recv() if connection.poll() else None
    except EOFError:
        return None


def _collect_server(process: Any, connection: Connection, deadline: float) -> ServerResult:
    message = _receive(connection, process, deadline)
    if message is None:
        process.join(timeout=max(deadline - time.monotonic(), 0.0))
        raise RuntimeError(
            f"the server process died without a result (exit code {process.exitcode})"
        )
    status, payload = message
    if status != "ok":
        raise RuntimeError(f"the parameter server failed:\n{payload}")
    return payload


def _collect_workers(
    processes: list[Any], connections: list[Connection], deadline: float
) -> dict[int, WorkerOutcome]:
    """Every worker's outcome, once the server has finished; the workers are read concurrently.

    A worker still running ``_WORKER_GRACE_S`` seconds from now (or at ``deadline``, if
    sooner) is terminated, then killed, and reported so.

    Args:
        processes: the worker processes, rank 1 first.
        connections: their result pipes, in the same order.
        deadline: the launcher's deadline (``time.monotonic()`` seconds).
    """
    grace_end = min(deadline, time.monotonic() + _WORKER_GRACE_S)
    messages: dict[int, tuple[str, Any] | None] = {}
    unread = dict(enumerate(connections, start=1))
    running = {process.sentinel: rank for rank, process in enumerate(processes, start=1)}
    while running:
        ready = wait([*unread.values(), *running], timeout=max(grace_end - time.monotonic(), 0))
        if not ready:
            break
        for rank, connection in list(unread.items()):
            if connection in ready:
                messages[rank] = _read(connection)
                del unread[rank]
        for sentinel in [s for s in ready if s in running]:
            rank = running.pop(sentinel)
            if rank in unread:  # it ended: what it sent, if anything, is in the pipe
                messages[rank] = _read(unread.pop(rank))
    stuck = set(running.values())
    end_processes([processes[rank - 1] for rank in sorted(stuck)], 0.0, _TERM_GRACE_S)
    outcomes = {}
    for rank, process in enumerate(processes, start=1):
        if rank in unread:  # killed before it sent anything
            messages[rank] = _read(unread.pop(rank))
        # Its sentinel fired, but the exit status may take a moment to be reapable.
        process.join(timeout=_TERM_GRACE_S)
        status, payload = messages.get(rank) or ("died", None)
        error = payload if status == "error" else None
        if rank in stuck:
            note = (
                f"still running {_WORKER_GRACE_S:g} s after the server finished; "
                f"killed by the launcher (exit code {process.exitcode})"
            )
            error = note if error is None else f"{error}\n{note}"
        outcomes[rank] = WorkerOutcome(
            exitcode=process.exitcode, result=payload if status == "ok" else None, error=error
        )
    return outcomes


def _read(connection: Connection) -> tuple[str, Any] | None:
    """The message waiting in ``connection``, or ``None`` if there is none (or it closed)."""
    try:
        return connection.recv() if connection.poll() else None
    except (EOFError, OSError):
        return None


def _worker_errors(outcomes: dict[int, WorkerOutcome]) -> str:
    """What the failed workers of ``outcomes`` report, to add to the launcher's error."""
    return "".join(
        f"\n\nworker {rank} (exit code {outcome.exitcode}):\n{outcome.error}"
        for rank, outcome in outcomes.items()
        if outcome.error is not None
    )
