"""The server's and a worker's process: rendezvous, the training loop, the sign-off at the end."""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import vector_to_parameters

from asyncmomentum.core.validation import (
    check_int,
    check_positive,
)
from asyncmomentum.runtimes.adapter import OptimizerView
from asyncmomentum.runtimes.local_sgd.pseudo_gradient import check_outer_optimizer
from asyncmomentum.runtimes.local_sgd.worker import run_local_sgd_rounds
from asyncmomentum.runtimes.server.config import (
    ParameterServerJob,
    ServerConfig,
    ServerResult,
    WorkerResult,
    check_local_sgd,
)
from asyncmomentum.runtimes.server.state import ParameterServer
from asyncmomentum.runtimes.transport import (
    SERVER_NAME,
    Reply,
    RpcTransport,
    check_flat,
    init_rpc,
    serving,
    shutdown_rpc,
    worker_name,
)

# world_size as the messages name it.
_WORLD_SIZE = "world_size (one server and at least one worker)"


def request_checkpoint(path: str | None = None, timeout: float | None = None) -> str:
    """Ask the server to save a checkpoint now; returns the path it wrote (on the server's disk).

    Call it from any process of a running job (a worker, or a helper rank).

    Args:
        path: where to save; default the server's ``checkpoint_path``.
        timeout: seconds to wait for the save; default the RPC timeout.

    Raises:
        ConnectionError: the server cannot be reached.
    """
    return RpcTransport(timeout=timeout).checkpoint(path)


#: The rendezvous scheme of jobs this module starts itself: like torch's ``env://``, but the
#: server's store listens only on ``MASTER_ADDR`` (torch's binds every interface).
_BOUND_SCHEME = "asyncmomentum"
_bound_scheme_registered = False


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
    timeout = _seconds(float(query.get("timeout", ["300"])[0]))
    host, port = parsed.hostname, parsed.port
    if host is None or port is None:
        raise ValueError(f"rendezvous URL {url!r} needs a host and a port")
    if rank == 0:
        listener = socket.create_server((host, port))  # this interface only
        store = dist.TCPStore(
            host,
            port,
            world_size,
            is_master=True,
            timeout=timeout,
            wait_for_workers=False,
            master_listen_fd=listener.detach(),  # the store owns and closes the socket
        )
    else:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
        store.set(_joined_key(rank), "1")
    if rank == 0:
        _await_joins(store, world_size, timeout)
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


def _init_method_from_env(join_timeout: float) -> str:
    """The RPC rendezvous for a job started from environment variables.

    Under ``torchrun`` its agent already hosts the store on ``MASTER_PORT``: ``env://`` joins
    it. Otherwise the server hosts the store itself, listening only on ``MASTER_ADDR``.

    Args:
        join_timeout: seconds every rank may take to join.
    """
    global _bound_scheme_registered
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return "env://"
    if not _bound_scheme_registered:
        dist.register_rendezvous_handler(_BOUND_SCHEME, _bound_rendezvous)
        _bound_scheme_registered = True
    host = os.environ["MASTER_ADDR"]
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address in a URL
    return f"{_BOUND_SCHEME}://{host}:{os.environ['MASTER_PORT']}?timeout={join_timeout:g}"


def _signed_off_key(rank: int) -> str:
    return f"asyncmomentum/left/{rank}"


def run_server(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    world_size: int,
    config: ServerConfig | None = None,
    init_method: str = "env://",
) -> ServerResult:
    """Serve ``model`` as rank 0 of an RPC group of ``world_size`` until a stop condition holds.

    Saves a final checkpoint when ``config.checkpoint_path`` is set. Returns once every worker
    still alive has left, or timed out.

    Args:
        model: the model to train, on CPU.
        optimizer: an optimizer over the model's parameters.
        world_size: 1 server + the number of workers.
        config: stop conditions, timeouts, checkpoints, reporting.
        init_method: RPC rendezvous; ``"env://"`` reads ``MASTER_ADDR`` and ``MASTER_PORT``.
    """
    world_size = check_int(world_size, _WORLD_SIZE, 2)
    config = ServerConfig() if config is None else config
    control = _host_control_store(config.rpc_timeout)
    server = ParameterServer(model, optimizer, world_size - 1, config, control_port=control.port)
    with serving(server):
        init_rpc(SERVER_NAME, 0, world_size, init_method=init_method, timeout=config.rpc_timeout)
        try:
            server.start()
            server.serve()
            server.await_departures(lambda rank, timeout: _wait_key(control, rank, timeout))
        finally:
            shutdown_rpc()
    path = server.checkpoint() if config.checkpoint_path is not None else None
    return server.result(checkpoint_path=path)


def _wait_key(store: dist.Store, rank: int, timeout_s: float) -> bool:
    try:
        store.wait([_signed_off_key(rank)], _seconds(max(timeout_s, 1e-3)))
    except dist.DistStoreError:
        return False
    return True


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def run_worker(
    model: nn.Module,
    batches: Iterable[tuple[Any, Tensor]],
    *,
    rank: int,
    world_size: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    max_steps: int | None = None,
    rpc_timeout: float = 120.0,
    init_method: str = "env://",
    num_threads: int | None = 1,
    sync_every: int | None = None,
    inner_optimizer_fn: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
) -> WorkerResult:
    """Train as worker ``rank``: pull, compute a gradient on the next batch, push, repeat.

    With ``sync_every=H`` (local SGD): pull, take ``H`` steps of the worker's own optimizer
    (``inner_optimizer_fn(model.parameters())``, kept across rounds), push the pseudo-gradient
    ``params_read - params_after``, repeat (:mod:`asyncmomentum.runtimes.local_sgd.worker`).

    Only parameters travel; buffers (e.g. batch-norm statistics) stay each worker's own.

    Args:
        model: a model of the same architecture as the server's (its weights are overwritten).
        batches: this worker's ``(inputs, targets)`` batches.
        rank: the worker's global rank, in ``1 .. world_size - 1``.
        world_size: 1 server + the number of workers.
        loss_fn: ``loss_fn(model(inputs), targets)`` is the scalar loss.
        max_steps: leave after this many applied gradients (``None``: until the server stops);
            in local SGD, applied pseudo-gradients.
        rpc_timeout: timeout of every RPC, in seconds.
        init_method: RPC rendezvous; ``"env://"`` reads ``MASTER_ADDR`` and ``MASTER_PORT``.
        num_threads: torch intra-op threads of this process (``None``: leave as is); 1 keeps
            several workers on one machine from fighting over cores.
        sync_every: local SGD: inner steps between two pushes (``>= 1``); ``None``: one
            gradient per push.
        inner_optimizer_fn: local SGD: builds the inner optimizer from the model's parameters.
    """
    world_size = check_int(world_size, _WORLD_SIZE, 2)
    check_int(rank, "a worker's rank", 1, maximum=world_size - 1)
    check_positive(max_steps, "max_steps", integer=True, optional=True)
    check_positive(rpc_timeout, "rpc_timeout")
    inner = None
    if sync_every is not None or inner_optimizer_fn is not None:
        check_local_sgd(sync_every, inner_optimizer_fn)  # before anything runs
        assert inner_optimizer_fn is not None
        inner = inner_optimizer_fn(model.parameters())
    if num_threads is not None:
        torch.set_num_threads(check_int(num_threads, "num_threads", 1))
    init_rpc(worker_name(rank), rank, world_size, init_method=init_method, timeout=rpc_timeout)
    transport = RpcTransport()
    control: dist.TCPStore | None = None
    try:
        began = time.monotonic()
        reply = transport.join(rank)
        control = _connect_control(reply.control_port, rpc_timeout)
        if inner is not None:
            assert sync_every is not None
            rounds = run_local_sgd_rounds(
                model,
                iter(batches),
                loss_fn,
                inner,
                transport,
                rank,
                _fitting(reply, model),
                sync_every=sync_every,
                max_pushes=max_steps,
            )
            return WorkerResult(
                rank,
                rounds.pushes,
                rounds.refused,
                rounds.stop_reason,
                time.monotonic() - began,
                inner_steps=rounds.inner_steps,
            )
        pusher = _Pusher(model, transport, rank)
        steps, refused, reason = _train_loop(
            model, iter(batches), loss_fn, pusher, reply, max_steps
        )
        return WorkerResult(rank, steps, refused, reason, time.monotonic() - began)
    finally:
        # Leave, shut the agent down, then sign off: the server shuts its agent down only after
        # the sign-off, so none of this worker's calls is cut off.
        _try_leave(transport, rank)
        shutdown_rpc()
        if control is not None:
            _sign_off(control, rank)


class _Pusher:
    """Turns a worker's gradients into one flat push."""

    def __init__(self, model: nn.Module, transport: RpcTransport, rank: int) -> None:
        self.params = list(model.parameters())
        self.trainable = [i for i, p in enumerate(self.params) if p.requires_grad]
        self.transport = transport
        self.rank = rank

    def push(self, computed: Sequence[Tensor | None], version: int, loss: float) -> Reply:
        """Push the gradients of the trainable parameters (``None``: unused by the loss)."""
        grads: list[Tensor | None] = [None] * len(self.params)
        for i, grad in zip(self.trainable, computed, strict=True):
            grads[i] = grad
        present = tuple(i for i, grad in enumerate(grads) if grad is not None)
        pieces = [
            p.new_zeros(p.numel()) if grad is None else grad.reshape(-1)
            for p, grad in zip(self.params, grads, strict=True)
        ]
        everything = len(present) == len(self.params)
        return self.transport.push(
            self.rank, torch.cat(pieces), version, loss, None if everything else present
        )


def _fitting(reply: Reply, model: nn.Module) -> Reply:
    """``reply`` if its parameters fit ``model`` (or it says stop), else a clear RuntimeError."""
    if not reply.stop:
        try:
            check_flat(reply.params, list(model.parameters()))
        except ValueError as error:
            raise RuntimeError(
                f"the server's parameters do not fit this worker's model ({error}); build the "
                "same model on every rank"
            ) from None
    return reply


def _train_loop(
    model: nn.Module,
    batches: Iterator[tuple[Any, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    pusher: _Pusher,
    reply: Reply,
    max_steps: int | None,
) -> tuple[int, int, str]:
    """The worker's loop; returns (applied steps, refused pushes, why it stopped)."""
    params = pusher.params
    model.train()
    steps = refused = 0
    while not reply.stop:
        if max_steps is not None and steps >= max_steps:
            return steps, refused, "max_steps"
        try:
            # Each reply is a fresh tensor: the parameters become views of it (no copy).
            vector_to_parameters(check_flat(reply.params, params), params)
        except ValueError as error:
            raise RuntimeError(
                f"the server's parameters do not fit this worker's model ({error}); build the "
                "same model on every rank"
            ) from None
        try:
            inputs, targets = next(batches)
        except StopIteration:
            return steps, refused, "batches_exhausted"
        loss = loss_fn(model(inputs), targets)
        computed = torch.autograd.grad(
            loss, [params[i] for i in pusher.trainable], allow_unused=True
        )
        reply = pusher.push(computed, reply.version, float(loss.detach()))
        steps += int(reply.applied)
        refused += int(not reply.applied)
    return steps, refused, "server"


def _host_control_store(timeout_s: float) -> dist.TCPStore:
    """The store in which leaving workers sign off; its port travels in the server's replies."""
    host = _control_host()
    try:
        listener = socket.create_server((host, 0))  # only where the workers will connect
    except OSError:  # MASTER_ADDR is not an address of this machine: listen on all of them
        listener = socket.create_server(("", 0))
        host = "127.0.0.1"  # the store's own client connects here
    port = listener.getsockname()[1]
    return dist.TCPStore(
        host,
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=_seconds(timeout_s),
        master_listen_fd=listener.detach(),  # the store owns and closes the socket
    )


def _control_host() -> str:
    # The server runs where MASTER_ADDR points (torchrun puts rank 0 on the master node).
    return os.environ.get("MASTER_ADDR", "127.0.0.1")


def _connect_control(port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(_control_host(), port, is_master=False, timeout=_seconds(timeout_s))


def _try_leave(transport: RpcTransport, rank: int) -> None:
    """Tell the server this worker leaves; best effort, as the server may be gone already."""
    try:
        transport.leave(rank)
    except Exception as error:  # don't mask the error that ended the worker, if any
        warnings.warn(f"worker {rank} could not tell the server it leaves: {error}", stacklevel=2)


def _sign_off(control: dist.TCPStore, rank: int) -> None:
    try:
        control.set(_signed_off_key(rank), "1")
    except Exception as error:  # the server is gone: nobody waits for this key
        warnings.warn(f"worker {rank} could not sign off: {error}", stacklevel=2)


def _rank_from_env() -> tuple[int, int]:
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise RuntimeError(
            f"environment variables {missing} are not set: start this with torchrun, or set "
            "MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE, or use launch_local() on one machine"
        )
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise RuntimeError(
            f"RANK={os.environ['RANK']!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r} must be "
            "integers"
        ) from None
    check_int(world_size, _WORLD_SIZE, 2)
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} must lie in 0..WORLD_SIZE-1={world_size - 1}")
    return rank, world_size


def run_from_env(
    job: ParameterServerJob,
    config: ServerConfig | None = None,
    *,
    worker_max_steps: int | None = None,
) -> ServerResult | WorkerResult:
    """Run this process's part of a job: the server on rank 0, a worker on the others.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by ``torchrun``),
    so the same script runs on one machine or many.

    Args:
        job: what to train.
        config: the server's configuration (the workers use its ``rpc_timeout``).
        worker_max_steps: each worker leaves after this many applied gradients (in local SGD,
            pseudo-gradients).

    Returns:
        The :class:`ServerResult` on rank 0, a :class:`WorkerResult` elsewhere.
    """
    config = ServerConfig() if config is None else config
    rank, world_size = _rank_from_env()
    init_method = _init_method_from_env(config.join_timeout)
    if rank == 0:
        model = job.model_fn()
        optimizer = job.optimizer_fn(model.parameters())
        if job.probe_fn is not None:
            view = OptimizerView(optimizer)
            if not view.uses_curvature:
                raise ValueError(
                    "probe_fn feeds an AsyncMomentumSGD whose rule uses the curvature "
                    f"(rule='stability'); this job's optimizer_fn built {view.describe()}"
                )
            view.set_curvature_probe(job.probe_fn(model))
        if job.local_sgd:
            # The outer optimizer applies pseudo-gradients to every global parameter.
            check_outer_optimizer(optimizer, list(model.parameters()))
        return run_server(
            model, optimizer, world_size=world_size, config=config, init_method=init_method
        )
    torch.manual_seed(job.seed + rank)
    return run_worker(
        job.model_fn(),
        job.batches_fn(rank - 1, world_size - 1),
        rank=rank,
        world_size=world_size,
        loss_fn=job.loss_fn,
        max_steps=worker_max_steps,
        rpc_timeout=config.rpc_timeout,
        init_method=init_method,
        sync_every=job.sync_every,
        inner_optimizer_fn=job.inner_optimizer_fn,
    )
