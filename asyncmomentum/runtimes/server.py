"""An asynchronous parameter server on ``torch.distributed.rpc`` (TensorPipe).

Rank 0 is the server: it owns the model and the optimizer. Every other rank is a worker that
loops: compute a gradient from the parameters it holds, push ``(gradients, version)`` and receive
the parameters as they are right after the gradient was applied, with their version. The server
applies each gradient as it arrives, with ``optimizer.step(staleness=version_now - version)``
when the optimizer is an :class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD` (any other
optimizer
gets a plain ``step()``; staleness is measured and reported all the same).

Push and pull are one round trip, and the version a worker reads is the one right after its own
update. In the long run the mean staleness is then exactly ``M - 1`` for ``M`` workers whatever
their speeds (each worker sees the updates of the others during one of its cycles), which is what
the estimator of ``M`` assumes.

Fault tolerance. ``init_rpc`` forms a static group and ``rpc.shutdown(graceful=True)`` is a
barrier over every rank, which never completes once a worker is dead. So every process here
shuts its agent down locally (``graceful=False``) and the end of the job is agreed on separately:

* the server stops on the first of: ``total_updates`` applied, ``max_seconds`` elapsed, or no
  worker left; gradients that arrive after that are answered with "stop" and not applied;
* a worker that is not heard from for ``worker_timeout`` seconds is dropped: its later gradients
  are refused, and the server stops waiting for it;
* a leaving worker says so over RPC, shuts its agent down, then writes a key into a small
  ``TCPStore`` the server hosts; the server shuts its own agent down only once every worker
  still alive has written its key (or timed out), so no reply is cut off mid-flight.

Launch it with ``torchrun`` (rank 0 is the server) or with the usual environment variables
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``) through :func:`run_from_env`, or as
one local job of spawned processes on 127.0.0.1 with :func:`launch_local`. Note that torchrun's
agent ends every process of its group as soon as one of them dies (torch's policy, not this
module's): to keep training through dead workers, start the processes without torchrun (by hand,
by a cluster scheduler, or with :func:`launch_local`). A stalled worker is dropped either way.

Example::

    job = ParameterServerJob(model_fn=make_model, optimizer_fn=make_optimizer,
                             batches_fn=make_batches)      # top-level functions: picklable
    result = launch_local(job, workers=3, config=ServerConfig(total_updates=500))
    print(result.server.estimated_workers, result.server.algorithmic_momentum)
"""

from __future__ import annotations

import copy
import hmac
import ipaddress
import math
import multiprocessing
import os
import secrets
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlparse

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc
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
    check_optimizer_state,
    check_positive,
    check_state_tensor,
)
from asyncmomentum.runtimes.adapter import OptimizerView

__all__ = [
    "SERVER_NAME",
    "CheckpointInfo",
    "LocalJobResult",
    "ParameterServer",
    "ParameterServerJob",
    "ServerConfig",
    "ServerResult",
    "TracePoint",
    "WorkerOutcome",
    "WorkerResult",
    "launch_local",
    "load_checkpoint",
    "request_checkpoint",
    "run_from_env",
    "run_server",
    "run_worker",
    "worker_name",
]

#: RPC name of rank 0, the server.
SERVER_NAME = "server"

#: Layout version of the checkpoints this module writes.
CHECKPOINT_FORMAT = 1

# A worker that leaves says so over RPC; this bounds that last call when the server is gone.
_LEAVE_TIMEOUT_S = 5.0

# Seconds a child of launch_local gets to end after SIGTERM before SIGKILL.
_KILL_GRACE_S = 5.0

# Once the server has finished, seconds a worker still running gets to end by itself; then the
# launcher terminates it (and kills it _TERM_GRACE_S later if it ignores SIGTERM).
_WORKER_GRACE_S = 3.0
_TERM_GRACE_S = 1.0

# What torch's RPC puts in the message of an exception the remote side raised.
_REMOTE_ERROR_MARK = "On WorkerInfo("

#: Environment variable with the job's secret: when the server's process has one, every remote
#: call must carry the same (``launch_local`` sets a fresh one; with ``torchrun`` or plain
#: variables, export the same value to every process). It stops mistakes (a worker of another
#: job, a stray client), not attackers: the RPC transport itself unpickles what it receives.
SECRET_ENV = "ASYNCMOMENTUM_JOB_SECRET"

# world_size as the messages name it.
_WORLD_SIZE = "world_size (one server and at least one worker)"


def worker_name(rank: int) -> str:
    """RPC name of the worker of global rank ``rank`` (>= 1)."""
    return f"worker{rank}"


# -- configuration and results -------------------------------------------------------------------


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
        rpc_timeout: timeout of every RPC and of the store workers sign off in, in seconds.
        join_timeout: seconds every process may take to join the job at start-up (outside
            ``torchrun``); the server then fails with a message naming the missing ranks.
        checkpoint_path: where the server saves model and optimizer at the end and on request
            (``None``: only explicit requests with a path save).
        checkpoint_every: also save every this many applied updates (needs ``checkpoint_path``).
        trace_every: record one :class:`TracePoint` every this many applied updates.
        progress_every: call ``on_progress`` every this many applied updates (``None``: never).
        on_progress: called with the latest :class:`TracePoint` (in the server process, from an
            RPC thread; under :func:`launch_local` it must be picklable: a top-level function).
        horizon: horizon of the estimator that reports ``M`` for optimizers that do
            not estimate it themselves (e.g. ``torch.optim.SGD``); AsyncMomentumSGD uses its own.
        warmup: warm-up of that estimator, in observations.
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


class TracePoint(NamedTuple):
    """The state of training right after one applied update, for logs and plots."""

    #: Number of updates applied so far, this one included.
    update: int
    #: Rank of the worker whose gradient this was.
    worker: int
    #: The worker's loss on the batch it computed the gradient from (at stale parameters).
    loss: float
    #: Updates applied between the worker's read and this update.
    staleness: int
    #: Momentum the optimizer applies (first parameter group).
    algorithmic_momentum: float
    #: Implicit momentum ``1 - 1/M_hat`` of the measured asynchrony.
    implicit_momentum: float
    #: ``M_hat``, the estimated number of asynchronous workers.
    estimated_workers: float
    #: Seconds since serving began.
    time: float


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
        update_seconds: time spent applying updates (under the lock, parameter copy included).
        optimizer_seconds: the part of ``update_seconds`` spent in ``optimizer.step``.
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

    @property
    def updates_per_second(self) -> float:
        """Applied updates per second of wall time."""
        return self.updates / self.wall_time if self.wall_time > 0 else 0.0

    @property
    def optimizer_share(self) -> float:
        """Share of the server's update time spent in ``optimizer.step``."""
        return self.optimizer_seconds / self.update_seconds if self.update_seconds > 0 else 0.0


@dataclass(frozen=True)
class WorkerResult:
    """What one worker did.

    Attributes:
        rank: the worker's global rank.
        steps: gradients of this worker the server applied.
        refused: gradients the server refused (sent after the end).
        stop_reason: ``"server"`` (told to stop), ``"max_steps"`` or ``"batches_exhausted"``.
        wall_time: seconds from joining to leaving.
    """

    rank: int
    steps: int
    refused: int
    stop_reason: str
    wall_time: float


class CheckpointInfo(NamedTuple):
    """What :func:`load_checkpoint` read besides the state it loaded."""

    #: Updates the server had applied when it saved.
    updates: int
    #: Class name of the optimizer whose state the checkpoint holds.
    optimizer_class: str


# -- the server's state, without RPC ------------------------------------------------------------


class _Reply(NamedTuple):
    """The server's answer to a join or a push: parameters, their version, and whether to stop."""

    params: list[Tensor]
    version: int
    stop: bool
    applied: bool
    control_port: int


class ParameterServer:
    """The server's state and rules, callable in-process; :func:`run_server` puts it behind RPC.

    One lock serializes reading the parameters (a copy) and applying an update, so a worker never
    sees a half-applied update.

    Args:
        model: the model whose parameters are served (on CPU).
        optimizer: an optimizer over (some of) ``model``'s parameters; an
            :class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD` gets each gradient's staleness.
        num_workers: number of workers, with ranks ``1 .. num_workers``.
        config: stop conditions, timeouts, checkpoints, reporting.
        control_port: port of the store on which leaving workers sign off (sent to workers).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        num_workers: int,
        config: ServerConfig | None = None,
        *,
        control_port: int = 0,
    ) -> None:
        self.config = ServerConfig() if config is None else config
        check_positive(num_workers, "num_workers", integer=True)
        self.model = model
        self.optimizer = optimizer
        self.num_workers = num_workers
        self._params = list(model.parameters())
        _check_model_and_optimizer(self._params, optimizer)
        self._view = OptimizerView(optimizer)
        self._control_port = control_port
        self._cond = threading.Condition()  # guards everything below, and the parameters
        self._version = 0
        self._updates_per_worker = dict.fromkeys(range(1, num_workers + 1), 0)
        self._last_seen: dict[int, float] = {}
        self._left: set[int] = set()
        self._dropped: set[int] = set()
        self._refused = 0
        self._stop_reason: str | None = None
        self._started: float | None = None
        self._stopped: float | None = None
        self._update_seconds = 0.0
        self._optimizer_seconds = 0.0
        self._trace: list[TracePoint] = []
        # Optimizers that do not estimate M themselves get one, for reports only.
        self._monitor = (
            None
            if self._view.measures_staleness
            else StalenessEstimator(horizon=self.config.horizon, warmup=self.config.warmup)
        )

    # -- what workers call ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the clocks of ``max_seconds`` and of the worker timeouts (idempotent)."""
        with self._cond:
            self._start_locked()

    def join(self, rank: int) -> _Reply:
        """A worker's first read: the current parameters and their version.

        Args:
            rank: the worker's rank, in ``1 .. num_workers``.
        """
        rank = self._check_rank(rank)
        with self._cond:
            self._start_locked()
            self._last_seen[rank] = time.monotonic()
            if self._refuses_locked(rank):
                return self._reply_locked(stop=True, applied=False)
            return self._reply_locked(stop=False, applied=False)

    def push(
        self, rank: int, grads: Sequence[Tensor | None], version: int, loss: float = math.nan
    ) -> _Reply:
        """Apply a worker's gradient and answer with the parameters right after it.

        Args:
            rank: the worker's rank.
            grads: one gradient per parameter of the model, in ``model.parameters()`` order
                (``None`` for a parameter without gradient).
            version: the version of the parameters the gradient was computed from.
            loss: the worker's loss on its batch, for the trace.

        Returns:
            The parameters and version to compute the next gradient from, ``stop`` when the
            worker should leave, and ``applied`` whether this gradient was applied.
        """
        rank = self._check_rank(rank)
        grads = _check_gradients(grads, self._params)
        version = check_int(version, "version", 0, maximum=MAX_COUNT)
        loss = float(loss)
        point = None
        with self._cond:
            self._last_seen[rank] = time.monotonic()
            if self._refuses_locked(rank):
                self._refused += 1
                return self._reply_locked(stop=True, applied=False)
            if version > self._version:
                raise ValueError(
                    f"worker {rank} pushed a gradient of version {version}, but only "
                    f"{self._version} updates exist; versions come from this server's replies"
                )
            began = time.perf_counter()
            staleness = self._version - version
            applied = self._apply_locked(grads, staleness)
            if applied:
                point = self._record_locked(rank, loss, staleness)
            reply = self._reply_locked(stop=self._stop_reason is not None, applied=applied)
            self._update_seconds += time.perf_counter() - began
        if point is not None:
            self._after_update(point)
        return reply

    def leave(self, rank: int) -> None:
        """A worker says it is leaving; the server no longer expects its gradients.

        Args:
            rank: the worker's rank.
        """
        rank = self._check_rank(rank)
        with self._cond:
            self._left.add(rank)
            self._update_stop_locked(time.monotonic())
            self._cond.notify_all()

    # -- the server's own loop -----------------------------------------------------------------

    def serve(self) -> str:
        """Block until a stop condition holds, dropping silent workers; returns the reason."""
        with self._cond:
            self._start_locked()
            while True:
                now = time.monotonic()
                self._drop_silent_locked(now)
                if self._update_stop_locked(now):
                    return str(self._stop_reason)
                self._cond.wait(timeout=self._next_deadline_locked(now) - now)

    def await_departures(self, signed_off: Callable[[int, float], bool]) -> None:
        """After the stop, wait until every worker still alive has signed off, or drop it.

        Args:
            signed_off: ``signed_off(rank, timeout_s)`` is ``True`` once the worker has shut its
                RPC agent down, ``False`` if it did not within ``timeout_s``.
        """
        for rank in range(1, self.num_workers + 1):
            with self._cond:
                if rank in self._dropped:
                    continue
                last_seen = self._last_seen.get(rank, self._started or time.monotonic())
            remaining = last_seen + self.config.worker_timeout - time.monotonic()
            if not signed_off(rank, max(remaining, 0.0)):
                with self._cond:
                    self._dropped.add(rank)

    def checkpoint(self, path: str | os.PathLike[str] | None = None) -> str:
        """Save model and optimizer (tuner included) atomically; returns the path written.

        Args:
            path: where to save; default ``config.checkpoint_path``.
        """
        target = path if path is not None else self.config.checkpoint_path
        if target is None:
            raise ValueError("no checkpoint path: pass one or set ServerConfig.checkpoint_path")
        with self._cond:
            # Copies, so that the file is written outside the lock from a consistent snapshot.
            state = {
                "format": CHECKPOINT_FORMAT,
                "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "optimizer_class": type(self.optimizer).__name__,
                "updates": self._version,
            }
        target = os.fspath(target)
        partial = f"{target}.partial-{os.getpid()}-{threading.get_ident()}"
        torch.save(state, partial)
        os.replace(partial, target)  # a reader never sees a half-written checkpoint
        return target

    def requested_checkpoint_path(self, path: str | os.PathLike[str] | None) -> str | None:
        """Where a remote :func:`request_checkpoint` may write: inside the job's folder only.

        A process of the job (or anyone who reaches the RPC port) must not make the server
        write anywhere its rights allow: a requested path must resolve inside the folder of
        ``config.checkpoint_path``. The server's owner calls :meth:`checkpoint` directly.

        Args:
            path: the requested path; ``None`` means ``config.checkpoint_path``.

        Returns:
            The path to write, ``None`` for the default.
        """
        if path is None:
            return None
        if self.config.checkpoint_path is None:
            raise ValueError(
                "a requested checkpoint path must lie in the folder of "
                "ServerConfig.checkpoint_path, and this job has none"
            )
        folder = os.path.realpath(os.path.dirname(os.path.abspath(self.config.checkpoint_path)))
        target = os.path.realpath(os.path.abspath(os.fspath(path)))
        if os.path.commonpath([folder, target]) != folder or target == folder:
            raise ValueError(
                f"a requested checkpoint path must lie in the job's checkpoint folder {folder}, "
                f"got {os.fspath(path)!r}"
            )
        return target

    def result(self, checkpoint_path: str | None = None) -> ServerResult:
        """A summary of the run so far.

        Args:
            checkpoint_path: the final checkpoint's path, to report.
        """
        with self._cond:
            algorithmic, implicit, workers = self._momentum_locked()
            end = self._stopped if self._stopped is not None else time.monotonic()
            return ServerResult(
                updates=self._version,
                updates_per_worker=dict(self._updates_per_worker),
                refused=self._refused,
                dropped_workers=tuple(sorted(self._dropped)),
                left_workers=tuple(sorted(self._left - self._dropped)),
                stop_reason=self._stop_reason or "running",
                estimated_workers=workers,
                implicit_momentum=implicit,
                algorithmic_momentum=algorithmic,
                mean_staleness=self._mean_staleness_locked(),
                trace=list(self._trace),
                checkpoint_path=checkpoint_path,
                wall_time=end - self._started if self._started is not None else 0.0,
                update_seconds=self._update_seconds,
                optimizer_seconds=self._optimizer_seconds,
            )

    @property
    def version(self) -> int:
        """Number of updates applied."""
        with self._cond:
            return self._version

    # -- internals (the caller holds the lock where the name ends in _locked) -------------------

    def _check_rank(self, rank: Any) -> int:
        return check_int(rank, "worker rank", 1, maximum=self.num_workers)

    def _start_locked(self) -> None:
        if self._started is None:
            self._started = time.monotonic()

    def _refuses_locked(self, rank: int) -> bool:
        return self._stop_reason is not None or rank in self._dropped or rank in self._left

    def _apply_locked(self, grads: list[Tensor | None], staleness: int) -> bool:
        """Install the gradient, step, clear it; ``False`` if the optimizer skipped the step."""
        try:
            for param, grad in zip(self._params, grads, strict=True):
                param.grad = grad
            began = time.perf_counter()
            # AsyncMomentumSGD gets the staleness and checks gradients itself (it raises or
            # skips as configured); torch's optimizers would write NaN into the weights: a
            # non-finite gradient is refused before they step.
            applied = self._view.step(staleness, refuse_nonfinite=True)
            self._optimizer_seconds += time.perf_counter() - began
        finally:
            for param in self._params:
                param.grad = None
        if not applied:
            return False
        if self._monitor is not None:
            self._monitor.observe(staleness)
        self._version += 1
        return True

    def _record_locked(self, rank: int, loss: float, staleness: int) -> TracePoint:
        self._updates_per_worker[rank] += 1
        updates = self._version
        algorithmic, implicit, workers = self._momentum_locked()
        assert self._started is not None
        point = TracePoint(
            update=updates,
            worker=rank,
            loss=loss,
            staleness=staleness,
            algorithmic_momentum=algorithmic,
            implicit_momentum=implicit,
            estimated_workers=workers,
            time=time.monotonic() - self._started,
        )
        if updates % self.config.trace_every == 0:
            self._trace.append(point)
        total = self.config.total_updates
        if total is not None and updates >= total and self._stop_reason is None:
            self._set_stop_locked("total_updates")
        return point

    def _after_update(self, point: TracePoint) -> None:
        """Periodic checkpoint and progress report, outside the lock.

        Their failures are warnings: the update is applied, and a full disk or a broken progress
        printer must not turn into an error on the worker that happened to push.
        """
        config = self.config
        try:
            if config.checkpoint_every is not None and point.update % config.checkpoint_every == 0:
                self.checkpoint()
            if (
                config.on_progress is not None
                and config.progress_every is not None
                and point.update % config.progress_every == 0
            ):
                config.on_progress(point)
        except Exception as error:
            warnings.warn(f"after update {point.update}: {error!r}", stacklevel=2)

    def _momentum_locked(self) -> tuple[float, float, float]:
        """(algorithmic, implicit, estimated workers) as of now."""
        summary = self._view.summary(self._monitor)
        return summary.algorithmic_momentum, summary.implicit_momentum, summary.estimated_workers

    def _mean_staleness_locked(self) -> float:
        return self._view.summary(self._monitor).mean_staleness

    def _reply_locked(self, *, stop: bool, applied: bool) -> _Reply:
        # The copy is made under the lock: RPC serializes the reply after the lock is released.
        params = [] if stop else [p.detach().clone() for p in self._params]
        return _Reply(params, self._version, stop, applied, self._control_port)

    def _drop_silent_locked(self, now: float) -> None:
        assert self._started is not None
        for rank in range(1, self.num_workers + 1):
            if rank in self._left or rank in self._dropped:
                continue
            if now - self._last_seen.get(rank, self._started) > self.config.worker_timeout:
                self._dropped.add(rank)

    def _update_stop_locked(self, now: float) -> bool:
        if self._stop_reason is None and self._started is not None:
            if (
                self.config.max_seconds is not None
                and now - self._started >= self.config.max_seconds
            ):
                self._set_stop_locked("max_seconds")
            elif len(self._left | self._dropped) == self.num_workers:
                self._set_stop_locked("no_workers")
        return self._stop_reason is not None

    def _set_stop_locked(self, reason: str) -> None:
        self._stop_reason = reason
        self._stopped = time.monotonic()
        self._cond.notify_all()

    def _next_deadline_locked(self, now: float) -> float:
        assert self._started is not None
        deadlines = [
            self._last_seen.get(rank, self._started) + self.config.worker_timeout
            for rank in range(1, self.num_workers + 1)
            if rank not in self._left and rank not in self._dropped
        ]
        if self.config.max_seconds is not None:
            deadlines.append(self._started + self.config.max_seconds)
        # A small floor keeps a deadline that just passed from spinning the loop.
        return max(min(deadlines, default=now + 1.0), now + 1e-3)


def _check_model_and_optimizer(params: list[Tensor], optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)!r}")
    if not params:
        raise ValueError("the model has no parameters to serve")
    for p in params:
        if p.device.type != "cpu":
            raise ValueError(
                f"the served model must be on CPU, found a parameter on {p.device}: tensors "
                "travel over RPC without device maps; move the model with model.cpu()"
            )
    served = {id(p) for p in params}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in served:
                raise ValueError(
                    "the optimizer holds a parameter that is not one of the model's: build the "
                    "optimizer from model.parameters() of the same model object"
                )


def _check_gradients(grads: Any, params: list[Tensor]) -> list[Tensor | None]:
    """Return ``grads`` as a list if it matches ``params`` one to one, else raise ValueError."""
    if isinstance(grads, Tensor) or not isinstance(grads, (list, tuple)):
        raise ValueError(
            f"grads must be a list with one tensor (or None) per parameter, got {type(grads)!r}"
        )
    if len(grads) != len(params):
        raise ValueError(
            f"grads has {len(grads)} entries but the model has {len(params)} parameters; "
            "do worker and server build the same model?"
        )
    checked: list[Tensor | None] = []
    for index, (grad, param) in enumerate(zip(grads, params, strict=True)):
        if grad is None:
            checked.append(None)
            continue
        if not isinstance(grad, Tensor) or grad.shape != param.shape:
            found = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
            raise ValueError(
                f"gradient {index} has shape {found} but its parameter has shape "
                f"{tuple(param.shape)}; do worker and server build the same model?"
            )
        if grad.dtype != param.dtype or grad.device != param.device:
            raise ValueError(
                f"gradient {index} is {grad.dtype} on {grad.device} but its parameter is "
                f"{param.dtype} on {param.device}"
            )
        checked.append(grad)
    return checked


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> CheckpointInfo:
    """Load a checkpoint of :meth:`ParameterServer.checkpoint` into a model (and optimizer).

    The optimizer must be of the class that was trained (an AsyncMomentumSGD gets its tuner
    back, so the momentum continues where it was). The whole checkpoint is checked before
    anything is loaded, so a refused one leaves model and optimizer as they were: the file
    must unpickle with ``torch.load(weights_only=True)``; the model tensors must have this
    model's names and shapes, a loadable dtype and finite values; the optimizer state passes
    the optimizer's own ``check_state_dict`` (AsyncMomentumSGD) or
    :func:`~asyncmomentum.core.validation.check_optimizer_state`; ``updates`` is a count.

    Args:
        path: the checkpoint file.
        model: a model of the trained architecture.
        optimizer: an optimizer over ``model``'s parameters, or ``None`` to load weights only.

    Returns:
        The number of updates and the optimizer class the checkpoint records.

    Raises:
        ValueError: the file is not a readable checkpoint, or does not fit model or optimizer.
        OSError: the file cannot be opened.
    """
    state = _read_checkpoint(path)
    info = _check_checkpoint(state, model, optimizer)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    model.load_state_dict(state["model"])
    return info


def _read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Unpickle a checkpoint (tensors and plain containers only) and check its layout."""
    name = os.fspath(path)
    try:
        state = torch.load(name, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # corrupt bytes fail in many ways
        lines = str(error).splitlines() or [""]
        # weights_only names the refused global on a later line: the useful one.
        reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
        reason = reason.split(". Please use")[0]
        raise ValueError(
            f"{name!r} cannot be read as a checkpoint ({type(error).__name__}: {reason}); it is "
            "corrupt, truncated, or holds objects other than tensors and plain containers"
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{name!r} is not a parameter-server checkpoint of format "
            f"{CHECKPOINT_FORMAT} (found {found!r}); was it written by ParameterServer.checkpoint?"
        )
    missing = [k for k in ("model", "optimizer", "optimizer_class", "updates") if k not in state]
    if missing:
        raise ValueError(f"the checkpoint {name!r} lacks {missing}; it is corrupt")
    return state


def _check_checkpoint(
    state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> CheckpointInfo:
    """Check everything ``load_checkpoint`` would load; change nothing."""
    updates = check_int(state["updates"], "the checkpoint's 'updates'", 0, maximum=MAX_COUNT)
    optimizer_class = state["optimizer_class"]
    if not isinstance(optimizer_class, str):
        raise ValueError(f"the checkpoint's 'optimizer_class' is not a name: {optimizer_class!r}")
    if not isinstance(state["model"], dict):
        raise ValueError("the checkpoint's 'model' is not a state dict")
    _check_same_tensors(model.state_dict(), state["model"])
    if optimizer is not None:
        if type(optimizer).__name__ != optimizer_class:
            raise ValueError(
                f"the checkpoint holds the state of a {optimizer_class}, not of a "
                f"{type(optimizer).__name__}; build the optimizer the run used, or pass "
                "optimizer=None"
            )
        check = getattr(optimizer, "check_state_dict", None)
        if callable(check):
            check(state["optimizer"])
        else:
            check_optimizer_state(optimizer, state["optimizer"])
    return CheckpointInfo(updates, optimizer_class)


def _check_same_tensors(expected: dict[str, Tensor], found: dict[str, Any]) -> None:
    if expected.keys() != found.keys():
        missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
        raise ValueError(
            f"the checkpoint's model does not match this model: missing {sorted(missing)}, "
            f"unexpected {sorted(map(str, unexpected))}; build the model the run used"
        )
    for name, tensor in expected.items():
        try:
            check_state_tensor(tensor, found[name], f"the checkpoint's {name!r}")
        except ValueError as error:
            raise ValueError(f"{error}; build the model the run used") from None


# -- RPC glue ------------------------------------------------------------------------------------

# The server of this process, reached by the remote functions below (RPC calls module functions).
_SERVING: ParameterServer | None = None


def _serving() -> ParameterServer:
    if _SERVING is None:
        raise RuntimeError(f"no parameter server runs in this process; is this {SERVER_NAME!r}?")
    return _SERVING


def _job_secret() -> str:
    return os.environ.get(SECRET_ENV, "")


def _authorized(secret: Any) -> ParameterServer:
    """The serving server, if ``secret`` is the job's; refused before anything is read."""
    expected = _job_secret()
    if expected and not (
        isinstance(secret, str) and hmac.compare_digest(secret.encode(), expected.encode())
    ):
        raise PermissionError(
            f"this call does not carry the job's secret ({SECRET_ENV}); refused, nothing changed"
        )
    return _serving()


def _remote_join(rank: int, secret: str = "") -> _Reply:
    return _authorized(secret).join(rank)


def _remote_push(
    rank: int, grads: list[Tensor | None], version: int, loss: float, secret: str = ""
) -> _Reply:
    return _authorized(secret).push(rank, grads, version, loss)


def _remote_leave(rank: int, secret: str = "") -> None:
    _authorized(secret).leave(rank)


def _remote_checkpoint(path: str | None, secret: str = "") -> str:
    server = _authorized(secret)
    return server.checkpoint(server.requested_checkpoint_path(path))


def request_checkpoint(path: str | None = None, timeout: float | None = None) -> str:
    """Ask the server to save a checkpoint now; returns the path it wrote (on the server's disk).

    Call it from any process of a running job (a worker, or a helper rank).

    Args:
        path: where to save; default the server's ``checkpoint_path``.
        timeout: seconds to wait for the save; default the RPC timeout.
    """
    kwargs = {} if timeout is None else {"timeout": timeout}
    return rpc.rpc_sync(SERVER_NAME, _remote_checkpoint, args=(path, _job_secret()), **kwargs)


def _rpc_options(rpc_timeout: float, init_method: str) -> rpc.TensorPipeRpcBackendOptions:
    return rpc.TensorPipeRpcBackendOptions(rpc_timeout=rpc_timeout, init_method=init_method)


def _init_rpc(
    name: str, rank: int, world_size: int, options: rpc.TensorPipeRpcBackendOptions
) -> None:
    with warnings.catch_warnings():
        # torch's own init_rpc trips its own deprecation warning; nothing a user can act on.
        warnings.filterwarnings("ignore", message="You are using a Backend", category=UserWarning)
        rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)


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
    global _SERVING
    world_size = check_int(world_size, _WORLD_SIZE, 2)
    config = ServerConfig() if config is None else config
    if _SERVING is not None:
        raise RuntimeError("a parameter server already runs in this process")
    control = _host_control_store(config.rpc_timeout)
    server = ParameterServer(model, optimizer, world_size - 1, config, control_port=control.port)
    _SERVING = server
    try:
        _init_rpc(SERVER_NAME, 0, world_size, _rpc_options(config.rpc_timeout, init_method))
        try:
            server.start()
            server.serve()
            server.await_departures(lambda rank, timeout: _wait_key(control, rank, timeout))
        finally:
            rpc.shutdown(graceful=False)
        path = server.checkpoint() if config.checkpoint_path is not None else None
        return server.result(checkpoint_path=path)
    finally:
        _SERVING = None


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
) -> WorkerResult:
    """Train as worker ``rank``: pull, compute a gradient on the next batch, push, repeat.

    Only parameters travel; buffers (e.g. batch-norm statistics) stay each worker's own.

    Args:
        model: a model of the same architecture as the server's (its weights are overwritten).
        batches: this worker's ``(inputs, targets)`` batches.
        rank: the worker's global rank, in ``1 .. world_size - 1``.
        world_size: 1 server + the number of workers.
        loss_fn: ``loss_fn(model(inputs), targets)`` is the scalar loss.
        max_steps: leave after this many applied gradients (``None``: until the server stops).
        rpc_timeout: timeout of every RPC, in seconds.
        init_method: RPC rendezvous; ``"env://"`` reads ``MASTER_ADDR`` and ``MASTER_PORT``.
        num_threads: torch intra-op threads of this process (``None``: leave as is); 1 keeps
            several workers on one machine from fighting over cores.
    """
    world_size = check_int(world_size, _WORLD_SIZE, 2)
    check_int(rank, "a worker's rank", 1, maximum=world_size - 1)
    check_positive(max_steps, "max_steps", integer=True, optional=True)
    check_positive(rpc_timeout, "rpc_timeout")
    if num_threads is not None:
        torch.set_num_threads(check_int(num_threads, "num_threads", 1))
    _init_rpc(worker_name(rank), rank, world_size, _rpc_options(rpc_timeout, init_method))
    control: dist.TCPStore | None = None
    try:
        began = time.monotonic()
        reply = _ask_server(rank, _remote_join, rank, _job_secret())
        control = _connect_control(reply.control_port, rpc_timeout)
        steps, refused, reason = _train_loop(model, iter(batches), loss_fn, rank, reply, max_steps)
        return WorkerResult(rank, steps, refused, reason, time.monotonic() - began)
    finally:
        # Leave, shut the agent down, then sign off: the server shuts its agent down only after
        # the sign-off, so none of this worker's calls is cut off.
        _try_leave(rank)
        rpc.shutdown(graceful=False)
        if control is not None:
            _sign_off(control, rank)


def _train_loop(
    model: nn.Module,
    batches: Iterator[tuple[Any, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    rank: int,
    reply: _Reply,
    max_steps: int | None,
) -> tuple[int, int, str]:
    """The worker's loop; returns (applied steps, refused pushes, why it stopped)."""
    params = list(model.parameters())
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    model.train()
    steps = refused = 0
    while not reply.stop:
        if max_steps is not None and steps >= max_steps:
            return steps, refused, "max_steps"
        _load_parameters(params, reply.params)
        try:
            inputs, targets = next(batches)
        except StopIteration:
            return steps, refused, "batches_exhausted"
        loss = loss_fn(model(inputs), targets)
        computed = torch.autograd.grad(loss, [params[i] for i in trainable], allow_unused=True)
        grads: list[Tensor | None] = [None] * len(params)
        for i, grad in zip(trainable, computed, strict=True):
            grads[i] = grad
        reply = _ask_server(
            rank, _remote_push, rank, grads, reply.version, float(loss.detach()), _job_secret()
        )
        steps += int(reply.applied)
        refused += int(not reply.applied)
    return steps, refused, "server"


def _ask_server(rank: int, function: Callable[..., _Reply], *args: Any) -> _Reply:
    """Call ``function(*args)`` on the server; say so plainly when the server is lost.

    Args:
        rank: the calling worker's rank, for the message.
        function: the server-side function.
        *args: its arguments.

    Raises:
        ConnectionError: the call failed in transport (the server process ended, or it did
            not answer within the RPC timeout); the RPC layer's own error is chained.
    """
    try:
        return rpc.rpc_sync(SERVER_NAME, function, args=args)
    except RuntimeError as error:
        if _REMOTE_ERROR_MARK in str(error):  # the server raised it: pass it on as it is
            raise
        raise ConnectionError(
            f"worker {rank} lost the parameter server: its call {function.__name__} failed "
            f"({error!s:.200}); the server process ended or cannot be reached"
        ) from error


@torch.no_grad()
def _load_parameters(params: list[Tensor], values: list[Tensor]) -> None:
    if len(values) != len(params):
        raise RuntimeError(
            f"the server sent {len(values)} parameters but this worker's model has "
            f"{len(params)}; build the same model on every rank"
        )
    for param, value in zip(params, values, strict=True):
        param.copy_(value)


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


def _try_leave(rank: int) -> None:
    """Tell the server this worker leaves; best effort, as the server may be gone already."""
    try:
        rpc.rpc_sync(
            SERVER_NAME, _remote_leave, args=(rank, _job_secret()), timeout=_LEAVE_TIMEOUT_S
        )
    except Exception as error:  # don't mask the error that ended the worker, if any
        warnings.warn(f"worker {rank} could not tell the server it leaves: {error}", stacklevel=2)


def _sign_off(control: dist.TCPStore, rank: int) -> None:
    try:
        control.set(_signed_off_key(rank), "1")
    except Exception as error:  # the server is gone: nobody waits for this key
        warnings.warn(f"worker {rank} could not sign off: {error}", stacklevel=2)


# -- launching -----------------------------------------------------------------------------------


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
    """

    model_fn: Callable[[], nn.Module]
    optimizer_fn: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    batches_fn: Callable[[int, int], Iterable[tuple[Any, Tensor]]]
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    seed: int = 0
    probe_fn: Callable[[nn.Module], Callable[[], Tensor]] | None = None

    def __post_init__(self) -> None:
        for name in ("model_fn", "optimizer_fn", "batches_fn", "loss_fn"):
            if not callable(getattr(self, name)):
                raise ValueError(f"{name} must be callable, got {getattr(self, name)!r}")
        if self.probe_fn is not None and not callable(self.probe_fn):
            raise ValueError(f"probe_fn must be callable or None, got {self.probe_fn!r}")


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
        worker_max_steps: each worker leaves after this many applied gradients.

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
    )


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
    env[SECRET_ENV] = secrets.token_hex(16)  # a fresh secret per job
    context = multiprocessing.get_context("spawn")
    processes, connections = [], []
    finished = False
    # TensorPipe warns on stderr of every peer that shuts down; the children read the level
    # from the environment they are spawned with. A level the user set wins.
    quiet = "TORCH_CPP_LOG_LEVEL" not in os.environ
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
        _end_processes(processes, min(deadline, time.monotonic() + _WORKER_GRACE_S))
        finished = True
        return LocalJobResult(
            server,
            outcomes,
            tuple(p.pid for p in processes),
            port,
            wind_down_s=time.monotonic() - server_done,
        )
    finally:
        if quiet:
            os.environ.pop("TORCH_CPP_LOG_LEVEL", None)
        # After a failure the other children cannot finish their job: end them now.
        grace_end = min(deadline, time.monotonic() + _WORKER_GRACE_S)
        _end_processes(processes, grace_end if finished else time.monotonic())
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
    # The work is done and the RPC agent is down, but the interpreter's teardown of torch's RPC
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
    _end_processes([processes[rank - 1] for rank in sorted(stuck)], 0.0, _TERM_GRACE_S)
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


def _end_processes(processes: list[Any], deadline: float, grace: float = _KILL_GRACE_S) -> None:
    """Join every child until ``deadline``; terminate, then kill, the ones still running.

    Args:
        processes: the children.
        deadline: ``time.monotonic()`` until which they may end by themselves.
        grace: seconds between SIGTERM and SIGKILL (and after SIGKILL).
    """
    for process in processes:
        process.join(timeout=max(deadline - time.monotonic(), 0.0))
    alive = [process for process in processes if process.is_alive()]
    for process in alive:
        process.terminate()
    for process in alive:
        process.join(timeout=grace)
        if process.is_alive():
            process.kill()
            process.join(timeout=grace)
