"""Hogwild: lock-free asynchronous training in several processes on one machine.

Each worker process reads the shared parameters, computes a gradient on its own shard of the data
and applies it without a lock, while the others do the same. The staleness of every applied
gradient (updates applied by others between the worker's read and its write) is measured by a
shared :class:`~asyncmomentum.core.tracker.AsynchronyTracker`: the version is marked when the
worker reads (right before the forward pass, where ``optimizer.zero_grad()`` goes) and its clock
ticks once per applied update.

Three lines train a model::

    model = SmallCNN()
    opt = AsyncMomentumSGD(model.parameters(), lr=0.05, momentum=0.9)
    result = train_hogwild(model, opt, classification_loss, (x, y), workers=4, steps_per_worker=200)

With :class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD`,
:meth:`~AsyncMomentumSGD.share_memory` puts
its momentum buffers and tracker in shared memory: all workers update **one global velocity**
(the paper's ``w_t - w_{t-1}``) and feed **one estimate** of ``M``. Any other optimizer works
too (``torch.optim.SGD(momentum=0.9)`` for comparison): staleness is then measured by a tracker
this module shares itself, the same way. Note that
``torch.optim.SGD`` creates its momentum buffers lazily at its first step, inside each worker, so
it keeps **one velocity per worker process** (buffers that already exist when training starts are
moved to shared memory by :mod:`torch.multiprocessing` and shared).

Processes are started with the ``spawn`` method, so ``loss_fn`` must be a module-level function
(it is pickled by reference) and a script must guard its entry point with
``if __name__ == "__main__":``. Workers report progress to the parent through one pipe each;
a worker that raises or dies is reported in the result and does not stop the others; an optional
global timeout terminates every worker; all processes are joined before :func:`train_hogwild`
returns, whatever happens.

The parts are public, so the same loop can be driven by hand: :func:`shard`, :func:`worker_seed`,
:func:`worker_loop` (the training loop of one worker) and the messages :class:`WorkerProgress`
and :class:`WorkerFailure`.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from asyncmomentum.core.tracker import AsynchronyTracker
from asyncmomentum.core.validation import check_int, check_positive
from asyncmomentum.runtimes.adapter import OptimizerView
from asyncmomentum.runtimes.batch_size import batch_size_of
from asyncmomentum.runtimes.supervision import end_processes
from asyncmomentum.runtimes.trace import TracePoint

__all__ = [
    "HogwildError",
    "HogwildResult",
    "LossFn",
    "TracePoint",
    "WorkerFailure",
    "WorkerProgress",
    "WorkerReady",
    "WorkerReport",
    "classification_loss",
    "shard",
    "train_hogwild",
    "worker_loop",
    "worker_rank",
    "worker_seed",
]

#: ``loss_fn(model, batch) -> scalar tensor``; ``batch`` is a tuple with one slice of each data
#: tensor. Must be a module-level function: spawned processes receive it pickled by reference.
LossFn = Callable[[nn.Module, tuple[Tensor, ...]], Tensor]

#: Seconds a worker that has finished (or was terminated) gets to exit before it is killed.
_EXIT_GRACE_S = 10.0

#: The rank of this process when it is a worker started by :func:`train_hogwild`.
_WORKER_RANK: int | None = None


class HogwildError(RuntimeError):
    """Some Hogwild workers failed or were stopped by the timeout.

    Raised by :meth:`HogwildResult.raise_if_failed`; the message lists each failed worker.
    """


def classification_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Cross entropy of ``model(x)`` against integer labels ``y``.

    Args:
        model: a classifier returning logits.
        batch: ``(x, y)``.
    """
    x, y = batch
    return F.cross_entropy(model(x), y)


def worker_rank() -> int | None:
    """The rank of the calling process if it is a worker of :func:`train_hogwild`, else ``None``.

    A ``loss_fn`` can use it, e.g. to log from one worker only.
    """
    return _WORKER_RANK


# -- data ---------------------------------------------------------------------------------------


def _check_data(data: Sequence[Tensor]) -> tuple[Tensor, ...]:
    if isinstance(data, Tensor) or not isinstance(data, (tuple, list)):
        raise ValueError(
            "data must be a tuple or list of tensors sharing their first dimension, e.g. (x, y); "
            f"got {type(data).__name__} (wrap a single tensor as (x,))"
        )
    if not data or not all(isinstance(t, Tensor) and t.dim() >= 1 for t in data):
        raise ValueError("data must hold at least one tensor, each with at least one dimension")
    lengths = {len(t) for t in data}
    if len(lengths) != 1:
        raise ValueError(f"data tensors must have the same first dimension, got {sorted(lengths)}")
    return tuple(data)


def shard(data: Sequence[Tensor], rank: int, workers: int) -> tuple[Tensor, ...]:
    """The part of ``data`` that worker ``rank`` of ``workers`` trains on: every ``workers``-th row.

    Strided rather than contiguous, so that data sorted by class still gives every worker every
    class. The shards are views (no copy), disjoint, and together cover ``data``.

    Args:
        data: tensors sharing their first dimension, e.g. ``(x, y)``.
        rank: the worker's index, in ``[0, workers)``.
        workers: number of workers (>= 1, at most the number of rows).
    """
    tensors = _check_data(data)
    check_int(workers, "workers", 1)
    check_int(rank, "rank", 0, maximum=workers - 1)
    if len(tensors[0]) < workers:
        raise ValueError(
            f"data has {len(tensors[0])} rows, fewer than workers={workers}: every worker needs "
            "at least one row; use fewer workers or more data"
        )
    return tuple(t[rank::workers] for t in tensors)


def worker_seed(seed: int, rank: int) -> int:
    """An independent seed for worker ``rank``, derived from the run's ``seed``.

    Uses :class:`numpy.random.SeedSequence` spawn keys, so workers' streams don't overlap.

    Args:
        seed: the run's seed (>= 0).
        rank: the worker's index (>= 0).
    """
    check_int(seed, "seed", 0)
    check_int(rank, "rank", 0)
    sequence = np.random.SeedSequence(seed, spawn_key=(rank,))
    # 63 bits: a valid seed for torch.manual_seed and for torch.Generator.
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _shuffled_batches(
    data: tuple[Tensor, ...], batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, ...]]:
    """Endless mini-batches, a new permutation of the rows each epoch."""
    rows = len(data[0])
    while True:
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows, batch_size):
            index = order[start : start + batch_size]
            yield tuple(t[index] for t in data)


# -- messages from the workers ------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerReady:
    """A worker has set itself up and waits for the start signal.

    Args:
        rank: the worker's index.
        pid: its process id.
    """

    rank: int
    pid: int


@dataclass(frozen=True)
class WorkerProgress:
    """What a worker reports every ``report_every`` steps and after its last step.

    Args:
        rank: the worker's index.
        step: training iterations done so far by this worker.
        steps: iterations it will do in all.
        updates: updates it applied so far (``step`` minus steps skipped for a non-finite
            gradient by ``AsyncMomentumSGD(nonfinite="skip")``).
        update: the shared clock's value right after this step: updates applied by all workers.
        loss: mean loss over this worker's steps since its previous report.
        staleness: mean staleness of its updates since its previous report.
        mean_staleness: mean staleness of all its updates so far.
        max_staleness: largest staleness of its updates so far.
        algorithmic_momentum: momentum its optimizer applies (first parameter group).
        implicit_momentum: ``1 - 1/M_hat`` from the shared staleness estimate.
        estimated_workers: ``M_hat`` from the shared staleness estimate.
        elapsed: seconds since this worker started training.
        done: whether this is its last report.
    """

    rank: int
    step: int
    steps: int
    updates: int
    update: int
    loss: float
    staleness: float
    mean_staleness: float
    max_staleness: int
    algorithmic_momentum: float
    implicit_momentum: float
    estimated_workers: float
    elapsed: float
    done: bool


@dataclass(frozen=True)
class WorkerFailure:
    """A worker raised; it reports this and stops.

    Args:
        rank: the worker's index.
        updates: updates it applied before the error.
        error: ``"ExceptionType: message"``.
        traceback: the formatted traceback, for debugging.
    """

    rank: int
    updates: int
    error: str
    traceback: str


# -- how staleness is measured ------------------------------------------------------------------


def _worker_view(optimizer: Optimizer, tracker: AsynchronyTracker | None) -> OptimizerView:
    """The view a worker steps through: its AsyncMomentumSGD's tracker, or the shared one."""
    view = OptimizerView(optimizer, tracker)
    if tracker is None and not view.is_async_momentum:
        raise ValueError(
            f"{view.name} does not measure staleness: pass the workers' shared tracker, "
            "AsynchronyTracker().share_memory(), created before the processes start"
        )
    return view


class _WindowStats:
    """Loss and staleness since the last report, and staleness since the start."""

    def __init__(self) -> None:
        self.updates = 0
        self.staleness_sum = 0
        self.max_staleness = 0
        self._window_loss = 0.0
        self._window_steps = 0
        self._window_staleness = 0
        self._window_updates = 0

    def add(self, loss: float, tau: int | None) -> None:
        self._window_loss += loss
        self._window_steps += 1
        if tau is not None:
            self.updates += 1
            self.staleness_sum += tau
            self.max_staleness = max(self.max_staleness, tau)
            self._window_staleness += tau
            self._window_updates += 1

    def take_window(self) -> tuple[float, float]:
        """Mean loss and mean staleness of the window; starts a new window."""
        loss = self._window_loss / max(self._window_steps, 1)
        staleness = self._window_staleness / max(self._window_updates, 1)
        self._window_loss, self._window_steps = 0.0, 0
        self._window_staleness, self._window_updates = 0, 0
        return loss, staleness

    @property
    def mean_staleness(self) -> float:
        return self.staleness_sum / self.updates if self.updates else 0.0


# -- one worker ---------------------------------------------------------------------------------


def _check_scalar_loss(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise TypeError(f"loss_fn must return a scalar tensor, got {shape}; reduce it (.mean())")
    return loss


def worker_loop(
    rank: int,
    model: nn.Module,
    optimizer: Optimizer,
    loss_fn: LossFn,
    data: Sequence[Tensor],
    *,
    steps: int,
    batch_size: int = 32,
    seed: int = 0,
    tracker: AsynchronyTracker | None = None,
    report: Callable[[WorkerProgress | WorkerFailure], Any] | None = None,
    report_every: int = 10,
    num_threads: int | None = 1,
) -> WorkerProgress:
    """The training loop of one Hogwild worker: ``steps`` lock-free updates of shared parameters.

    Every step: drop the gradients and mark the version read (``optimizer.zero_grad()``), run
    ``loss_fn`` on a batch of this worker's data, ``backward()``, ``optimizer.step()``, and
    count the update (the clock ticks once per applied update). Meant to run in its own process,
    on a ``model`` and ``optimizer`` that were put in shared memory before the process started
    (``model.share_memory()``, ``optimizer.share_memory()`` for AsyncMomentumSGD);
    :func:`train_hogwild` does all that.

    Args:
        rank: this worker's index; seeds its shuffling and ``torch`` with
            ``worker_seed(seed, rank)``.
        model: the shared model.
        optimizer: the shared optimizer over ``model``'s parameters. An AsyncMomentumSGD measures
            staleness itself; any other optimizer needs ``tracker``.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: this worker's data (see :func:`shard`), tensors sharing their first dimension.
        steps: training iterations to do (>= 1).
        batch_size: rows per batch (>= 1).
        seed: the run's seed, the same for all workers (>= 0).
        tracker: for an optimizer other than AsyncMomentumSGD, the tracker shared by all
            workers (``AsynchronyTracker().share_memory()``): marked before each forward pass,
            counting each applied update.
        report: called with a :class:`WorkerProgress` every ``report_every`` steps and after the
            last one, and with a :class:`WorkerFailure` if the loop raises (e.g. ``queue.put``
            of a ``multiprocessing`` queue, or ``Connection.send``).
        report_every: steps between reports (>= 1).
        num_threads: ``torch.set_num_threads`` for this process (1: workers share the cores,
            and more threads per worker only contend); ``None`` leaves it alone.

    Returns:
        The last :class:`WorkerProgress`.

    Raises:
        Whatever ``loss_fn`` or the optimizer raises, after reporting it as a WorkerFailure.
    """
    tensors = _check_data(data)
    check_int(steps, "steps", 1)
    check_int(batch_size, "batch_size", 1)
    check_int(report_every, "report_every", 1)
    view = _worker_view(optimizer, tracker)
    if num_threads is not None:
        torch.set_num_threads(check_int(num_threads, "num_threads", 1))
    own_seed = worker_seed(seed, rank)
    torch.manual_seed(own_seed)
    batches = _shuffled_batches(tensors, batch_size, torch.Generator().manual_seed(own_seed))
    stats = _WindowStats()
    started = time.perf_counter()
    try:
        for step in range(1, steps + 1):
            view.zero_grad()
            batch = next(batches)
            loss = _check_scalar_loss(loss_fn(model, batch))
            loss.backward()
            loss_value = float(loss.detach())
            stepped = view.step(loss=loss_value, batch_size=batch_size_of(batch))
            stats.add(loss_value, stepped.staleness)
            if step % report_every == 0 or step == steps:
                progress = _progress(rank, step, steps, stats, view, started)
                if report is not None:
                    report(progress)
    except Exception as error:
        if report is not None:
            # The parent may be gone (that may be the error); the original error matters more.
            with contextlib.suppress(Exception):
                report(_failure(rank, stats.updates, error))
        raise
    return progress


def _failure(rank: int, updates: int, error: BaseException) -> WorkerFailure:
    return WorkerFailure(
        rank=rank,
        updates=updates,
        error=f"{type(error).__name__}: {error}",
        traceback="".join(traceback.format_exception(error)),
    )


def _progress(
    rank: int,
    step: int,
    steps: int,
    stats: _WindowStats,
    view: OptimizerView,
    started: float,
) -> WorkerProgress:
    loss, staleness = stats.take_window()
    summary = view.summary()
    return WorkerProgress(
        rank=rank,
        step=step,
        steps=steps,
        updates=stats.updates,
        update=view.tracker.clock.value,
        loss=loss,
        staleness=staleness,
        mean_staleness=stats.mean_staleness,
        max_staleness=stats.max_staleness,
        algorithmic_momentum=summary.algorithmic_momentum,
        implicit_momentum=summary.implicit_momentum,
        estimated_workers=summary.estimated_workers,
        elapsed=time.perf_counter() - started,
        done=step == steps,
    )


@dataclass(frozen=True)
class _WorkerConfig:
    steps: int
    batch_size: int
    seed: int
    report_every: int
    tracker: AsynchronyTracker | None


class _Terminated(BaseException):
    """SIGTERM inside a worker, raised as an exception (not an ``Exception``: not a failure)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    # Unwinding (rather than dying on the spot) releases the process locks of the shared clock
    # and estimator if the worker held one. The kernel would release them anyway (flock), but
    # not the fallback lock of platforms without flock: there this keeps the others ticking.
    raise _Terminated


def _worker_process(
    conn: Connection,
    rank: int,
    model: nn.Module,
    optimizer: Optimizer,
    loss_fn: LossFn,
    data: tuple[Tensor, ...],
    config: _WorkerConfig,
) -> None:
    """Entry point of a worker process; exits 0 when done, 1 on an error, -SIGTERM if stopped.

    The process ends with ``os._exit`` once its streams are flushed, as forked children do:
    everything it produced is in shared memory or sent, and the interpreter's teardown of torch
    takes seconds on a busy machine. (So ``atexit`` handlers registered in a worker don't run.)
    """
    global _WORKER_RANK
    _WORKER_RANK = rank
    signal.signal(signal.SIGTERM, _raise_terminated)
    # Ctrl-C reaches the whole process group: let the parent handle it (it terminates us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    terminated = False
    try:
        code = _serve(conn, rank, model, optimizer, loss_fn, data, config)
    except _Terminated:
        terminated, code = True, 128 + signal.SIGTERM
    conn.close()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # end as killed by SIGTERM, which it was
    os._exit(code)


def _serve(
    conn: Connection,
    rank: int,
    model: nn.Module,
    optimizer: Optimizer,
    loss_fn: LossFn,
    data: tuple[Tensor, ...],
    config: _WorkerConfig,
) -> int:
    """Say ready, wait for the start signal, train; the exit code."""
    torch.set_num_threads(1)
    try:
        # torch's optimizers import torch._dynamo at their first zero_grad() or step() in a
        # process (1 to 3 s): pay for it before the start signal, so that all workers start
        # training together (AsyncMomentumSGD's zero_grad() is cheap). The training loop
        # begins with zero_grad() anyway.
        OptimizerView(optimizer).zero_grad()
    except Exception as error:
        with contextlib.suppress(OSError):
            conn.send(_failure(rank, 0, error))
        return 1
    try:
        conn.send(WorkerReady(rank=rank, pid=os.getpid()))
        # A start signal rather than "go when spawned": spawning is slow and staggered, and a
        # worker that starts alone would see no asynchrony. EOFError here: the parent is gone.
        conn.recv()
    except (EOFError, OSError):
        return 2
    try:
        worker_loop(
            rank,
            model,
            optimizer,
            loss_fn,
            data,
            steps=config.steps,
            batch_size=config.batch_size,
            seed=config.seed,
            tracker=config.tracker,
            report=conn.send,
            report_every=config.report_every,
            num_threads=1,
        )
    except Exception:
        return 1  # already reported to the parent, traceback included
    return 0


# -- the parent ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerReport:
    """How one worker's run ended.

    Args:
        rank: the worker's index.
        pid: its process id.
        steps: updates it applied, as of its last message (a worker that died without a word
            may have applied a few more since: they count on the shared clock and in
            :attr:`HogwildResult.total_updates`).
        last_loss: its mean loss over its last report window (NaN if it never reported).
        mean_staleness: mean staleness of its updates.
        max_staleness: largest staleness of its updates.
        exit_code: its process's exit code (negative: killed by that signal).
        finished: whether it did all its steps.
        error: what went wrong, or ``None``.
    """

    rank: int
    pid: int
    steps: int
    last_loss: float
    mean_staleness: float
    max_staleness: int
    exit_code: int | None
    finished: bool
    error: str | None

    @property
    def ok(self) -> bool:
        """Finished all its steps and exited cleanly."""
        return self.finished and self.exit_code == 0 and self.error is None


@dataclass(frozen=True)
class HogwildResult:
    """What :func:`train_hogwild` did.

    Args:
        workers: number of worker processes.
        steps_per_worker: iterations each worker was asked to do.
        total_updates: updates applied during the run by all workers, as the shared clock
            counts them: ``clock_value - clock_start``. It includes the updates of workers that
            died before reporting them (a killed worker's :attr:`WorkerReport.steps` stops at its
            last report), so it can exceed the sum of the reports' ``steps``.
        clock_start: the clock's value before training.
        clock_value: the clock's value after training. The clock is exact: no tick is lost or
            counted twice, also when a worker is killed inside the clock's critical section (its
            tick counts if its one store was done).
        reports: one :class:`WorkerReport` per worker, by rank.
        estimated_workers: final ``M_hat`` of the shared staleness estimate.
        mean_staleness: final moving average of the staleness.
        implicit_momentum: final ``1 - 1/M_hat``.
        algorithmic_momentum: momentum the optimizer applies at the end (first parameter group).
        total_momentum: the two composed (the optimizer's rule; additive for other optimizers).
        wall_time: seconds from the first process start to the last join.
        train_time: seconds from the start signal to the last worker's last report.
        timed_out: whether the global timeout stopped the run.
        trace: every progress report as a :class:`TracePoint`, ordered by ``update``.
        timeline: ``(seconds since the start signal, updates applied)`` at every progress
            report, in the order received: the rate of any part of the run (see
            :meth:`steady_updates_per_second`).
    """

    workers: int
    steps_per_worker: int
    total_updates: int
    clock_start: int
    clock_value: int
    reports: list[WorkerReport]
    estimated_workers: float
    mean_staleness: float
    implicit_momentum: float
    algorithmic_momentum: float
    total_momentum: float
    wall_time: float
    train_time: float
    timed_out: bool
    trace: list[TracePoint]
    timeline: list[tuple[float, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every worker finished and exited cleanly, within the timeout."""
        return not self.timed_out and all(r.ok for r in self.reports)

    @property
    def failures(self) -> list[WorkerReport]:
        """Reports of the workers that did not finish cleanly."""
        return [r for r in self.reports if not r.ok]

    @property
    def updates_per_second(self) -> float:
        """Applied updates per second of training (start signal to last report)."""
        return self.total_updates / self.train_time if self.train_time > 0 else 0.0

    def steady_updates_per_second(self, warmup_updates: int) -> float:
        """Updates per second after the first ``warmup_updates``: start-up costs left out.

        Measured between the first progress report at or past ``warmup_updates`` and the last
        one (the first steps of a fresh process allocate and warm caches).

        Args:
            warmup_updates: updates (of all workers) left out at the start.

        Raises:
            ValueError: fewer than two reports after the warm-up (run longer, or report more
                often with ``report_every``).
        """
        after = [(t, u) for t, u in self.timeline if u >= warmup_updates]
        if len(after) < 2 or after[-1][0] <= after[0][0]:
            raise ValueError(
                f"fewer than two progress reports after {warmup_updates} updates; run longer or "
                "lower report_every"
            )
        (t0, u0), (t1, u1) = after[0], max(after, key=lambda point: point[0])
        return (u1 - u0) / (t1 - t0)

    def raise_if_failed(self) -> None:
        """Raise :class:`HogwildError` describing the failures, if any."""
        if not self.ok:
            raise HogwildError(_describe_failures(self))


def _describe_failures(result: HogwildResult) -> str:
    lines = [f"hogwild training: {len(result.failures)} of {result.workers} workers failed"]
    if result.timed_out:
        lines[0] += " (global timeout reached)"
    lines += [
        f"  worker {r.rank}: {r.error} (exit code {r.exit_code}, {r.steps} updates)"
        for r in result.failures
    ]
    return "\n".join(lines)


class _WorkerState:
    """What the parent knows about one worker, and its end of the worker's pipe."""

    def __init__(self, rank: int, process: Any, conn: Connection) -> None:
        self.rank = rank
        self.process = process
        self.conn = conn
        self.open = True
        self.ready = False
        self.pid: int = process.pid
        self.last: WorkerProgress | None = None
        self.failure: WorkerFailure | None = None
        self.exit_code: int | None = None
        self.stopped_early = False

    def receive(self) -> Any:
        """Read and record one message; ``None`` at EOF (the worker exited)."""
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            self.open = False
            return None
        if isinstance(message, WorkerReady):
            self.ready = True
        elif isinstance(message, WorkerProgress):
            self.last = message
        elif isinstance(message, WorkerFailure):
            self.failure = message
        return message

    def close(self) -> None:
        """Record the exit code of the ended process and release its pipe."""
        self.exit_code = self.process.exitcode
        self.conn.close()
        if self.exit_code is not None:
            self.process.close()

    def report(self, timeout: float | None) -> WorkerReport:
        """The final :class:`WorkerReport`, once joined."""
        last, failure = self.last, self.failure
        steps = failure.updates if failure is not None else (last.updates if last else 0)
        finished = last is not None and last.done
        if failure is not None:
            error: str | None = failure.error
        elif self.stopped_early:
            error = f"terminated: still running when the global timeout of {timeout} s ran out"
        elif not finished:
            error = f"process exited with code {self.exit_code} before finishing its steps"
        elif self.exit_code != 0:
            error = f"finished its steps but its process exited with code {self.exit_code}"
        else:
            error = None
        return WorkerReport(
            rank=self.rank,
            pid=self.pid,
            steps=steps,
            last_loss=last.loss if last else math.nan,
            mean_staleness=last.mean_staleness if last else 0.0,
            max_staleness=last.max_staleness if last else 0,
            exit_code=self.exit_code,
            finished=finished,
            error=error,
        )


def _check_arguments(
    model: nn.Module,
    optimizer: Optimizer,
    loss_fn: LossFn,
    workers: int,
    steps_per_worker: int,
    timeout: float | None,
    seed: int,
) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
    check_int(workers, "workers", 1)
    check_int(steps_per_worker, "steps_per_worker", 1)
    check_int(seed, "seed", 0)
    check_positive(timeout, "timeout (seconds)", optional=True)
    _check_parameters(model, optimizer)
    view = OptimizerView(optimizer)
    if view.needs_every_update:
        raise ValueError(
            f"{view.describe()}{' with measure_momentum=True' if view.meter is not None else ''} "
            "cannot run in Hogwild workers: the momentum meter must see every update in order "
            "from one process, and the stability rule's histogram and curvature probe are per "
            "process. "
            "Use rule='additive' or 'compositional' here, or run the rule on the parameter "
            "server (asyncmomentum.runtimes.server), which applies every update in one place"
        )
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    try:
        pickle.dumps(loss_fn)
    except Exception as error:
        raise ValueError(
            "loss_fn must be picklable by reference (a module-level function) to reach spawned "
            f"processes; lambdas and nested functions are not ({error})"
        ) from None


def _check_parameters(model: nn.Module, optimizer: Optimizer) -> None:
    model_params = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in model_params:
                raise ValueError(
                    "the optimizer holds a parameter that is not one of model.parameters(); "
                    "the workers would update a copy. Build the optimizer from this model"
                )
            if p.device.type != "cpu":
                raise ValueError(
                    f"Hogwild shares parameters through CPU shared memory, got a parameter on "
                    f"{p.device}; move the model to the CPU first"
                )


def train_hogwild(
    model: nn.Module,
    optimizer: Optimizer,
    loss_fn: LossFn,
    data: Sequence[Tensor],
    *,
    workers: int = 4,
    steps_per_worker: int = 100,
    batch_size: int = 32,
    seed: int = 0,
    report_every: int = 10,
    timeout: float | None = None,
    on_progress: Callable[[WorkerProgress], Any] | None = None,
) -> HogwildResult:
    """Train ``model`` with ``workers`` lock-free asynchronous processes (Hogwild).

    Puts the model (and an AsyncMomentumSGD's buffers, clock and estimator) in shared memory,
    starts the workers with ``spawn``, gives each a strided :func:`shard` of ``data``, starts them
    together once all are ready, and collects their progress. The model's parameters are trained
    in place; the parent's AsyncMomentumSGD ends with the shared estimate's momentum and its
    version marked as read, ready to continue.

    A worker that raises or dies is reported in the result (and by a ``RuntimeWarning``) while
    the others finish; when ``timeout`` runs out every worker still running is terminated. Every
    process is joined before this returns, also if ``on_progress`` raises.

    Args:
        model: the model to train, on the CPU.
        optimizer: an optimizer over ``model``'s parameters: AsyncMomentumSGD (one shared
            velocity, momentum tuned to the measured asynchrony) or any ``torch.optim`` optimizer
            (momentum buffers per worker; staleness measured by a clock shared here).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, a module-level function.
        data: tensors sharing their first dimension, e.g. ``(x, y)``; at least ``workers`` rows.
        workers: number of worker processes (>= 1).
        steps_per_worker: training iterations of each worker (>= 1).
        batch_size: rows per batch (>= 1).
        seed: seeds every worker's shuffling and ``torch`` via :func:`worker_seed` (>= 0).
        report_every: steps between a worker's progress reports (>= 1); sets the trace's density.
        timeout: seconds for the whole run, start-up included; ``None`` for no limit.
        on_progress: called in this process with every :class:`WorkerProgress`, as it arrives.

    Returns:
        A :class:`HogwildResult`; check :attr:`HogwildResult.ok` or call
        :meth:`HogwildResult.raise_if_failed`.

    Raises:
        ValueError: bad arguments (nothing has been started or changed).
    """
    _check_arguments(model, optimizer, loss_fn, workers, steps_per_worker, timeout, seed)
    check_int(batch_size, "batch_size", 1)
    check_int(report_every, "report_every", 1)
    shards = [shard(data, rank, workers) for rank in range(workers)]
    if any(t.device.type != "cpu" for t in shards[0]):
        raise ValueError("data must be on the CPU, where the workers run; move it with .cpu()")

    model.share_memory()
    view = OptimizerView(optimizer).share_memory()
    clock = view.tracker.clock
    config = _WorkerConfig(
        steps=steps_per_worker,
        batch_size=batch_size,
        seed=seed,
        report_every=report_every,
        # AsyncMomentumSGD brings its own tracker; the workers share the view's otherwise.
        tracker=None if view.is_async_momentum else view.tracker,
    )
    clock_start = clock.value
    supervisor = _Supervisor(timeout, on_progress)
    try:
        for rank in range(workers):
            supervisor.start_worker(rank, model, optimizer, loss_fn, shards[rank], config)
        supervisor.collect()
    finally:
        supervisor.stop()

    reports = [state.report(timeout) for state in supervisor.states]
    # Counted by the clock, not summed from the reports: a killed worker's last updates never
    # reach a report, but they did tick the clock (every worker has been joined by now).
    clock_value = clock.value
    result = HogwildResult(
        workers=workers,
        steps_per_worker=steps_per_worker,
        total_updates=clock_value - clock_start,
        clock_start=clock_start,
        clock_value=clock_value,
        reports=reports,
        wall_time=supervisor.wall_time,
        train_time=supervisor.train_time,
        timeline=supervisor.timeline,
        timed_out=supervisor.timed_out,
        trace=sorted(supervisor.trace, key=lambda point: point.update),
        **_final_momenta(view),
    )
    if not result.ok:
        warnings.warn(_describe_failures(result), RuntimeWarning, stacklevel=2)
    return result


class _Supervisor:
    """Starts the worker processes, reads their messages, and always joins them."""

    def __init__(
        self, timeout: float | None, on_progress: Callable[[WorkerProgress], Any] | None
    ) -> None:
        self.context = mp.get_context("spawn")
        self.on_progress = on_progress
        self.started = time.perf_counter()
        self.deadline = None if timeout is None else self.started + timeout
        self.states: list[_WorkerState] = []
        self.trace: list[TracePoint] = []
        self.timeline: list[tuple[float, int]] = []
        self.timed_out = False
        self.train_started: float | None = None
        self.train_ended = self.started
        self.wall_time = 0.0

    @property
    def train_time(self) -> float:
        """Seconds from the start signal to the last progress report."""
        if self.train_started is None:
            return 0.0
        return max(self.train_ended - self.train_started, 0.0)

    def start_worker(
        self,
        rank: int,
        model: nn.Module,
        optimizer: Optimizer,
        loss_fn: LossFn,
        data: tuple[Tensor, ...],
        config: _WorkerConfig,
    ) -> None:
        """Spawn worker ``rank``; it says when it is ready and waits for the start signal."""
        parent_end, child_end = self.context.Pipe(duplex=True)
        process = self.context.Process(
            target=_worker_process,
            name=f"hogwild-worker-{rank}",
            # Model and optimizer travel in one pickle, so the optimizer's parameters stay the
            # model's (shared) parameters in the child.
            args=(child_end, rank, model, optimizer, loss_fn, data, config),
            daemon=True,
        )
        try:
            process.start()
        except BaseException:
            parent_end.close()
            raise
        finally:
            # Only the child may hold its end: when the child exits, the parent reads EOF.
            child_end.close()
        self.states.append(_WorkerState(rank, process, parent_end))

    def collect(self) -> None:
        """Read messages until every worker has hung up or the deadline has passed."""
        while any(state.open for state in self.states):
            ready = self._wait_for_messages()
            if ready is None:
                self.timed_out = True
                return
            for state in ready:
                message = state.receive()
                if isinstance(message, WorkerProgress):
                    self.train_ended = time.perf_counter()
                    since = 0.0
                    if self.train_started is not None:
                        since = self.train_ended - self.train_started
                        self.timeline.append((since, message.update))
                    self.trace.append(_trace_point(message, since))
                    if self.on_progress is not None:
                        self.on_progress(message)
            if self.train_started is None and all(s.ready or not s.open for s in self.states):
                self._send_start()

    def _wait_for_messages(self) -> list[_WorkerState] | None:
        """Workers with a message (or EOF) to read; ``None`` once the deadline has passed."""
        by_conn = {state.conn: state for state in self.states if state.open}
        remaining = None if self.deadline is None else self.deadline - time.perf_counter()
        if remaining is not None and remaining <= 0:
            return None
        ready = wait(list(by_conn), timeout=remaining)
        return [by_conn[conn] for conn in ready] if ready else None  # type: ignore[index]

    def _send_start(self) -> None:
        for state in self.states:
            if state.open:
                # A worker that died just now raises here; its EOF is read next.
                with contextlib.suppress(OSError):
                    state.conn.send("start")
        self.train_started = time.perf_counter()

    def stop(self) -> None:
        """Join every worker: terminate those still running, kill those that won't exit."""
        for state in self.states:
            if state.open and state.process.is_alive():
                # Still talking to us after collect() ended: the timeout, or an error in the
                # parent (on_progress raised, Ctrl-C).
                state.stopped_early = True
                state.process.terminate()
        # One grace period for all: workers exit concurrently, so join them against one deadline.
        end_processes(
            [state.process for state in self.states],
            time.monotonic() + _EXIT_GRACE_S,
            _EXIT_GRACE_S,
        )
        for state in self.states:
            state.close()
        self.wall_time = time.perf_counter() - self.started


def _trace_point(message: WorkerProgress, since: float) -> TracePoint:
    return TracePoint(
        update=message.update,
        loss=message.loss,
        staleness=message.staleness,
        algorithmic_momentum=message.algorithmic_momentum,
        implicit_momentum=message.implicit_momentum,
        worker=message.rank,
        estimated_workers=message.estimated_workers,
        time=since,
    )


def _final_momenta(view: OptimizerView) -> dict[str, float]:
    # Bring the parent's copy up to date with what the workers did in shared memory: the
    # estimate, clock and buffers are shared (the tuned momentum is read from the shared
    # estimate), but each process keeps its own "version read": set it as the next step would.
    view.mark_read()
    summary = view.summary()
    return {
        "estimated_workers": summary.estimated_workers,
        "mean_staleness": summary.mean_staleness,
        "implicit_momentum": summary.implicit_momentum,
        "algorithmic_momentum": summary.algorithmic_momentum,
        "total_momentum": summary.total_momentum,
    }
