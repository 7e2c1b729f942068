"""The server's and a worker's process: rendezvous, the training loop, the sign-off at the end."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import vector_to_parameters

from asyncmomentum.core.validation import (
    check_int,
    check_positive,
)
from asyncmomentum.runtimes.adapter import OptimizerView
from asyncmomentum.runtimes.batch_size import batch_size_of
from asyncmomentum.runtimes.local_sgd.pseudo_gradient import check_outer_optimizer
from asyncmomentum.runtimes.local_sgd.worker import run_local_sgd_rounds
from asyncmomentum.runtimes.server.config import (
    ParameterServerJob,
    ServerConfig,
    ServerResult,
    WorkerResult,
    check_local_sgd,
    check_transport,
)
from asyncmomentum.runtimes.server.links import connect_worker, host_server
from asyncmomentum.runtimes.transport import (
    Reply,
    RpcTransport,
    Transport,
    active_transport,
    check_flat,
    rpc_joined,
)

# world_size as the messages name it.
_WORLD_SIZE = "world_size (one server and at least one worker)"


def request_checkpoint(path: str | None = None, timeout: float | None = None) -> str:
    """Ask the server to save a checkpoint now; returns the path it wrote (on the server's disk).

    Call it from a worker process of a running job (e.g. from its batches); on the RPC
    transport, from any process of the job's RPC group.

    Args:
        path: where to save, inside the folder of the server's ``checkpoint_path``; default
            that path.
        timeout: seconds to wait for the save; default the link's timeout.

    Raises:
        ConnectionError: the server cannot be reached.
        RuntimeError: this process has no link to a server.
    """
    link = active_transport()
    if link is not None:
        return link.checkpoint(path, timeout)
    if rpc_joined():
        return RpcTransport(timeout=timeout).checkpoint(path)
    raise RuntimeError(
        "request_checkpoint() runs in a worker process of a running job: this process has no "
        "link to a parameter server"
    )


def run_server(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    world_size: int,
    config: ServerConfig | None = None,
    init_method: str = "env://",
) -> ServerResult:
    """Serve ``model`` as rank 0 of a job of ``world_size`` until a stop condition holds.

    Saves a final checkpoint when ``config.checkpoint_path`` is set. Returns once every worker
    still alive has left, or timed out.

    Args:
        model: the model to train.
        optimizer: an optimizer over the model's parameters.
        world_size: 1 server + the number of workers.
        config: stop conditions, timeouts, checkpoints, reporting, the transport.
        init_method: the rendezvous; ``"env://"`` reads ``MASTER_ADDR`` and ``MASTER_PORT``,
            ``"tcp://HOST:PORT"`` names them.

    Raises:
        TimeoutError: a worker did not join within ``config.join_timeout`` (the message names
            it).
    """
    world_size = check_int(world_size, _WORLD_SIZE, 2)
    config = ServerConfig() if config is None else config
    server = host_server(model, optimizer, world_size, config, init_method)
    path = server.checkpoint() if config.checkpoint_path is not None else None
    return server.result(checkpoint_path=path)


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
    transport: str = "c10d",
    join_timeout: float = 60.0,
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
        rpc_timeout: seconds every call to the server may take (whatever the transport).
        init_method: the rendezvous; ``"env://"`` reads ``MASTER_ADDR`` and ``MASTER_PORT``,
            ``"tcp://HOST:PORT"`` names them.
        num_threads: torch intra-op threads of this process (``None``: leave as is); 1 keeps
            several workers on one machine from fighting over cores.
        sync_every: local SGD: inner steps between two pushes (``>= 1``); ``None``: one
            gradient per push.
        inner_optimizer_fn: local SGD: builds the inner optimizer from the model's parameters.
        transport: ``"c10d"`` (default) or ``"rpc"``: the server's (``ServerConfig.transport``).
        join_timeout: seconds to wait for the server at start-up.

    Raises:
        ConnectionError: the server cannot be reached, or was lost.
    """
    world_size = check_int(world_size, _WORLD_SIZE, 2)
    check_transport(transport)
    check_positive(join_timeout, "join_timeout")
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
    link = connect_worker(
        model,
        rank,
        world_size,
        transport=transport,
        timeout=rpc_timeout,
        join_timeout=join_timeout,
        init_method=init_method,
    )
    try:
        began = time.monotonic()
        reply = link.joined
        if inner is not None:
            assert sync_every is not None
            rounds = run_local_sgd_rounds(
                model,
                iter(batches),
                loss_fn,
                inner,
                link.transport,
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
        pusher = _Pusher(model, link.transport, rank)
        steps, refused, reason = _train_loop(
            model, iter(batches), loss_fn, pusher, reply, max_steps
        )
        return WorkerResult(rank, steps, refused, reason, time.monotonic() - began)
    finally:
        link.close()


class _Pusher:
    """Turns a worker's gradients into one flat push."""

    def __init__(self, model: nn.Module, transport: Transport, rank: int) -> None:
        self.params = list(model.parameters())
        self.trainable = [i for i, p in enumerate(self.params) if p.requires_grad]
        self.transport = transport
        self.rank = rank

    def push(
        self,
        computed: Sequence[Tensor | None],
        version: int,
        loss: float,
        batch_size: int | None = None,
    ) -> Reply:
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
            self.rank,
            torch.cat(pieces),
            version,
            loss,
            None if everything else present,
            batch_size,
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
        reply = pusher.push(computed, reply.version, float(loss.detach()), batch_size_of(inputs))
        steps += int(reply.applied)
        refused += int(not reply.applied)
    return steps, refused, "server"


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
        return run_server(model, optimizer, world_size=world_size, config=config)
    torch.manual_seed(job.seed + rank)
    return run_worker(
        job.model_fn(),
        job.batches_fn(rank - 1, world_size - 1),
        rank=rank,
        world_size=world_size,
        loss_fn=job.loss_fn,
        max_steps=worker_max_steps,
        rpc_timeout=config.rpc_timeout,
        sync_every=job.sync_every,
        inner_optimizer_fn=job.inner_optimizer_fn,
        transport=config.transport,
        join_timeout=config.join_timeout,
    )
