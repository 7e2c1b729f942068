"""What a parameter-server job trains, how its server runs, and what they report."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asyncmomentum.core.measuring.staleness import (
    DEFAULT_HORIZON,
    DEFAULT_WARMUP,
    StalenessEstimator,
)
from asyncmomentum.core.validation import (
    MAX_COUNT,
    check_int,
    check_positive,
)
from asyncmomentum.runtimes.local_sgd.pseudo_gradient import check_sync_every
from asyncmomentum.runtimes.trace import TracePoint
from asyncmomentum.runtimes.transport import TRANSPORTS


def check_transport(transport: Any) -> str:
    """``transport`` if it names a transport, else a ValueError listing them."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {list(TRANSPORTS)}, got {transport!r}")
    return str(transport)


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs, stops, checkpoints and reports.

    Args:
        total_updates: stop once this many gradients have been applied (``None``: no limit).
        max_seconds: stop once this many seconds have passed since serving began (``None``:
            no limit). At least one of ``total_updates`` and ``max_seconds`` must be given, so
            that the job ends even when workers die.
        worker_timeout: a worker not heard from for this many seconds is dropped: its later
            gradients are refused and the server no longer waits for it at the end.
        rpc_timeout: seconds every call between a worker and the server may take (both
            transports; the name is the RPC transport's, kept for existing jobs).
        join_timeout: seconds every process may take to join the job at start-up (outside
            ``torchrun``); the server then fails with a message naming the missing ranks.
        checkpoint_path: where the server saves model and optimizer at the end and on request
            (``None``: only explicit requests with a path save).
        checkpoint_every: also save every this many applied updates (needs ``checkpoint_path``).
        trace_every: record one :class:`TracePoint` every this many applied updates.
        progress_every: call ``on_progress`` every this many applied updates (``None``: never).
        on_progress: called with the latest :class:`TracePoint` (in the server process, from a
            connection's thread; under :func:`launch_local` it must be picklable: a top-level
            function).
        horizon: horizon of the estimator that reports ``M`` for optimizers that do
            not estimate it themselves (e.g. ``torch.optim.SGD``); AsyncMomentumSGD uses its own.
        warmup: warm-up of that estimator, in observations.
        measure_after: the server's timers (time shares, CPU time, the measured rate) start
            once this many updates have been applied, so that start-up and warm-up (first
            connections, first allocations) stay outside them; 0: from the start of serving.
        transport: how workers reach the server: ``"c10d"`` (default: ``torch.distributed``
            process groups, one gloo pair per worker, nccl for CUDA payloads) or ``"rpc"``
            (``torch.distributed.rpc``, in maintenance mode in PyTorch; kept as an option).
    """

    total_updates: int | None = 1000
    max_seconds: float | None = None
    worker_timeout: float = 60.0
    rpc_timeout: float = 120.0
    join_timeout: float = 60.0
    checkpoint_path: str | None = None
    checkpoint_every: int | None = None
    trace_every: int = 1
    progress_every: int | None = None
    on_progress: Callable[[TracePoint], None] | None = None
    # The same names and defaults as AsyncMomentumSGD's.
    horizon: int = DEFAULT_HORIZON
    warmup: int = DEFAULT_WARMUP
    measure_after: int = 0
    transport: str = "c10d"

    def __post_init__(self) -> None:
        check_positive(self.total_updates, "total_updates", integer=True, optional=True)
        check_positive(self.max_seconds, "max_seconds", optional=True)
        if self.total_updates is None and self.max_seconds is None:
            raise ValueError(
                "give total_updates or max_seconds (or both): without either the server would "
                "wait forever for workers that may have died"
            )
        check_positive(self.worker_timeout, "worker_timeout")
        check_positive(self.rpc_timeout, "rpc_timeout")
        check_positive(self.join_timeout, "join_timeout")
        check_positive(self.checkpoint_every, "checkpoint_every", integer=True, optional=True)
        if self.checkpoint_every is not None and self.checkpoint_path is None:
            raise ValueError("checkpoint_every needs a checkpoint_path to save to")
        check_positive(self.trace_every, "trace_every", integer=True)
        check_positive(self.progress_every, "progress_every", integer=True, optional=True)
        if self.on_progress is not None and not callable(self.on_progress):
            raise ValueError(f"on_progress must be callable or None, got {self.on_progress!r}")
        # Validates horizon and warmup with the estimator's own messages.
        StalenessEstimator(horizon=self.horizon, warmup=self.warmup)
        check_int(self.measure_after, "measure_after", 0, maximum=MAX_COUNT)
        check_transport(self.transport)


@dataclass(frozen=True)
class ServerResult:
    """What the server did.

    Attributes:
        updates: gradients applied.
        updates_per_worker: applied gradients by worker rank.
        refused: gradients answered with "stop" (they arrived after the end, or from a dropped
            worker), not applied.
        dropped_workers: ranks dropped for silence (dead or stalled).
        left_workers: ranks that left by themselves.
        stop_reason: ``"total_updates"``, ``"max_seconds"`` or ``"no_workers"``.
        estimated_workers: final ``M_hat``.
        implicit_momentum: final implicit momentum.
        algorithmic_momentum: final momentum of the optimizer's first parameter group.
        mean_staleness: final moving average of the staleness.
        trace: one :class:`TracePoint` every ``trace_every`` updates.
        checkpoint_path: the final checkpoint, or ``None``.
        wall_time: seconds from the start of serving to the stop.
        measured_updates: updates applied while the timers ran (after
            ``ServerConfig.measure_after``); the time figures below cover these only.
        measured_seconds: wall time from the start of the timers to the stop.
        update_seconds: time spent in the locked section of pushes (the gradient installed,
            ``optimizer.step``, the parameters copied out for the reply, the bookkeeping).
        optimizer_seconds: the part of ``update_seconds`` spent in ``optimizer.step``.
        copy_seconds: the part of ``update_seconds`` spent copying parameters into replies.
        lock_wait_seconds: time pushes spent waiting for the lock, summed over pushes (they
            wait concurrently, so this can exceed ``wall_time``).
        cpu_seconds: CPU time of the server's whole process (every thread: I/O, (de)serialization,
            updates) from the start of serving to the stop. Under :func:`launch_local` the
            process does nothing else; a worker sharing the process is counted too.
    """

    updates: int
    updates_per_worker: dict[int, int]
    refused: int
    dropped_workers: tuple[int, ...]
    left_workers: tuple[int, ...]
    stop_reason: str
    estimated_workers: float
    implicit_momentum: float
    algorithmic_momentum: float
    mean_staleness: float
    trace: list[TracePoint]
    checkpoint_path: str | None
    wall_time: float
    update_seconds: float
    optimizer_seconds: float
    measured_updates: int = 0
    measured_seconds: float = 0.0
    copy_seconds: float = 0.0
    lock_wait_seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def updates_per_second(self) -> float:
        """Applied updates per second of wall time."""
        return _ratio(self.updates, self.wall_time)

    @property
    def measured_updates_per_second(self) -> float:
        """Applied updates per second while the timers ran (warm-up excluded)."""
        return _ratio(self.measured_updates, self.measured_seconds)

    @property
    def optimizer_share(self) -> float:
        """Share of the *locked section* (``update_seconds``) spent in ``optimizer.step``.

        Not a share of the server's wall time: see :meth:`wall_shares` for that.
        """
        return _ratio(self.optimizer_seconds, self.update_seconds)

    @property
    def cpu_seconds_per_update(self) -> float:
        """CPU time of the server's process per measured update (its I/O threads included)."""
        return _ratio(self.cpu_seconds, self.measured_updates)

    def wall_shares(self) -> dict[str, float]:
        """Where the server's wall time went while the timers ran, as shares that add up to 1.

        ``step``: ``optimizer.step``; ``copy_out``: copying parameters into replies;
        ``other_locked``: the rest of the locked section (installing the gradient,
        bookkeeping); ``outside_lock``: everything else: transfer and (de)serialization,
        the handlers' checks, and waiting for gradients to arrive. The server applies one
        update at a time, so the locked section never exceeds the wall time.
        """
        step = _ratio(self.optimizer_seconds, self.measured_seconds)
        copy_out = _ratio(self.copy_seconds, self.measured_seconds)
        locked = min(_ratio(self.update_seconds, self.measured_seconds), 1.0)
        other = max(locked - step - copy_out, 0.0)
        return {
            "step": step,
            "copy_out": copy_out,
            "other_locked": other,
            "outside_lock": max(1.0 - step - copy_out - other, 0.0),
        }


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0


@dataclass(frozen=True)
class WorkerResult:
    """What one worker did.

    Attributes:
        rank: the worker's global rank.
        steps: gradients of this worker the server applied.
        refused: gradients the server refused (sent after the end).
        stop_reason: ``"server"`` (told to stop), ``"max_steps"`` or ``"batches_exhausted"``.
        wall_time: seconds from joining to leaving.
        inner_steps: in local SGD, the inner optimizer's steps (``steps`` counts the
            pseudo-gradients applied); 0 otherwise.
    """

    rank: int
    steps: int
    refused: int
    stop_reason: str
    wall_time: float
    inner_steps: int = 0


@dataclass(frozen=True)
class ParameterServerJob:
    """What a job trains, as factories every process can call (picklable for spawned processes).

    Args:
        model_fn: builds the model (seed inside it: the server's copy is the one that counts).
        optimizer_fn: builds the server's optimizer from the model's parameters.
        batches_fn: ``batches_fn(worker_index, num_workers)`` gives the batches of one worker
            (index ``0 .. num_workers - 1``, i.e. rank - 1): its shard of the data.
        loss_fn: ``loss_fn(model(inputs), targets)`` is the scalar loss.
        seed: workers seed torch with ``seed + rank`` (dropout and the like).
        probe_fn: for an ``AsyncMomentumSGD(rule="stability")``: ``probe_fn(model)`` returns
            the curvature probe on the server's model (a loss on a batch the server holds; see
            ``AsyncMomentumSGD(curvature_probe=...)``). The server has no data of its own.
        sync_every: local SGD (the DiLoCo family): each worker takes this many steps of its own
            ``inner_optimizer_fn`` optimizer, then pushes the pseudo-gradient
            ``params_read - params_after`` (:mod:`asyncmomentum.runtimes.local_sgd.worker`);
            ``optimizer_fn`` is then the *outer* optimizer, over all of the model's parameters.
            ``None``: every worker pushes the gradient of each batch.
        inner_optimizer_fn: builds a worker's inner optimizer from its model's parameters (with
            ``sync_every``; e.g. ``lambda p: torch.optim.AdamW(p, lr=3e-3)``).
    """

    model_fn: Callable[[], nn.Module]
    optimizer_fn: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    batches_fn: Callable[[int, int], Iterable[tuple[Any, Tensor]]]
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    seed: int = 0
    probe_fn: Callable[[nn.Module], Callable[[], Tensor]] | None = None
    sync_every: int | None = None
    inner_optimizer_fn: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None

    def __post_init__(self) -> None:
        for name in ("model_fn", "optimizer_fn", "batches_fn", "loss_fn"):
            if not callable(getattr(self, name)):
                raise ValueError(f"{name} must be callable, got {getattr(self, name)!r}")
        if self.probe_fn is not None and not callable(self.probe_fn):
            raise ValueError(f"probe_fn must be callable or None, got {self.probe_fn!r}")
        check_local_sgd(self.sync_every, self.inner_optimizer_fn)

    @property
    def local_sgd(self) -> bool:
        """Whether workers push pseudo-gradients every ``sync_every`` inner steps."""
        return self.sync_every is not None


def check_local_sgd(sync_every: object, inner_optimizer_fn: object) -> None:
    """Refuse a half-given local-SGD set-up: both ``sync_every >= 1`` and a callable, or neither.

    Args:
        sync_every: inner steps between two pushes, or ``None``.
        inner_optimizer_fn: the workers' inner-optimizer factory, or ``None``.

    Raises:
        ValueError: ``sync_every < 1`` (or not an integer), or one given without the other.
    """
    if sync_every is None:
        if inner_optimizer_fn is not None:
            raise ValueError(
                "inner_optimizer_fn is for local SGD: give sync_every (inner steps between "
                "pushes) too"
            )
        return
    check_sync_every(sync_every)
    if not callable(inner_optimizer_fn):
        raise ValueError(
            "local SGD (sync_every set) needs inner_optimizer_fn, the workers' optimizer "
            f"(e.g. lambda p: torch.optim.AdamW(p, lr=3e-3)), got {inner_optimizer_fn!r}"
        )
