"""The server's state and rules, callable in-process: :class:`ParameterServer`."""

from __future__ import annotations

import copy
import itertools
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import vector_to_parameters

from asyncmomentum.core.optimizer import AsyncMomentumSGD
from asyncmomentum.core.tracker import AsynchronyTracker
from asyncmomentum.core.validation import (
    MAX_COUNT,
    check_int,
    check_positive,
)
from asyncmomentum.runtimes.adapter import OptimizerView
from asyncmomentum.runtimes.server.checkpoints import CHECKPOINT_FORMAT
from asyncmomentum.runtimes.server.config import ServerConfig, ServerResult, TracePoint
from asyncmomentum.runtimes.transport import (
    Reply,
    check_flat,
    flatten,
)


class ParameterServer:
    """The server's state and rules, callable in-process; :func:`run_server` serves it.

    One lock serializes reading the parameters (a copy) and applying an update, so a worker never
    sees a half-applied update.

    The model's parameters are moved into one flat buffer (each parameter becomes a view of
    it, the same ``nn.Parameter`` objects, so the optimizer and the caller keep theirs): a reply
    is one clone of that buffer, and a push one flat gradient (:meth:`push`). The model's
    parameters must therefore share one dtype.

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
        self._params: list[Tensor] = list(model.parameters())
        _check_model_and_optimizer(self._params, optimizer)
        self._flat = _into_one_buffer(self._params)
        # Pushed flat gradients are copied here (under the lock), so that each parameter's
        # gradient is a view made once, not per push.
        self._grad = torch.zeros_like(self._flat)
        self._grad_views = _views(self._grad, self._params)
        # An optimizer that does not measure staleness gets a tracker with the server's
        # estimate settings, for reports.
        tracker = (
            None
            if isinstance(optimizer, AsyncMomentumSGD)
            else AsynchronyTracker(horizon=self.config.horizon, warmup=self.config.warmup)
        )
        self._view = OptimizerView(optimizer, tracker)
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
        self._copy_seconds = 0.0
        self._lock_wait_seconds = 0.0
        self._cpu_started: float | None = None
        self._cpu_stopped: float | None = None
        self._measured_from: float | None = None  # monotonic start of the timers
        self._measured_base = 0  # updates applied when they started
        self._trace: list[TracePoint] = []

    # -- what workers call ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the clocks of ``max_seconds`` and of the worker timeouts (idempotent)."""
        with self._cond:
            self._start_locked()

    def join(self, rank: int) -> Reply:
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
        self,
        rank: int,
        grad: Tensor,
        version: int,
        loss: float = math.nan,
        present: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> Reply:
        """Apply a worker's gradient and answer with the parameters right after it.

        Everything is checked before anything changes.

        Args:
            rank: the worker's rank.
            grad: one flat 1-D gradient for all parameters, in ``model.parameters()`` order
                (:func:`~asyncmomentum.runtimes.transport.flatten`).
            version: the version of the parameters the gradient was computed from.
            loss: the worker's loss on its batch, for the trace.
            present: indices of the parameters that have a gradient, increasing; the others
                get none (their slice of ``grad`` is ignored). ``None``: all of them.
            batch_size: the number of samples the gradient averages, for a rule that reads it
                (``rule="auto"``); ``None``: not known.

        Returns:
            The parameters (one flat tensor) and version to compute the next gradient from,
            ``stop`` when the worker should leave, and ``applied`` whether this gradient was
            applied.
        """
        rank = self._check_rank(rank)
        if not isinstance(grad, Tensor):
            raise ValueError(
                f"push takes one flat gradient tensor (transport.flatten), got "
                f"{type(grad).__name__}"
            )
        grad = check_flat(grad, self._params, "the gradient")
        present = _check_present(present, len(self._params))
        if batch_size is not None:
            batch_size = check_int(batch_size, "batch_size", 1)
        return self._push(rank, grad, present, version, loss, batch_size)

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

    def drop(self, rank: int) -> None:
        """The link to worker ``rank`` is lost (its process ended): drop it now.

        Its later gradients are refused and the server no longer waits for it, as for a worker
        silent for ``worker_timeout``. A worker that has left already stays left.

        Args:
            rank: the worker's rank.
        """
        rank = self._check_rank(rank)
        with self._cond:
            if rank not in self._left:
                self._dropped.add(rank)
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
                link down, ``False`` if it did not within ``timeout_s``.
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
        state = self.snapshot()  # the file is written outside the lock
        target = os.fspath(target)
        partial = f"{target}.partial-{os.getpid()}-{threading.get_ident()}"
        torch.save(state, partial)
        os.replace(partial, target)  # a reader never sees a half-written checkpoint
        return target

    def snapshot(self) -> dict[str, Any]:
        """The server's checkpoint state, in memory: what :meth:`checkpoint` writes.

        A consistent copy, taken under the lock between two updates: ``"format"``
        (:data:`~.checkpoints.CHECKPOINT_FORMAT`), ``"model"`` (a state dict of copies),
        ``"optimizer"`` (the optimizer's state dict, tuner included, deep-copied),
        ``"optimizer_class"`` and ``"updates"`` (updates applied).
        """
        with self._cond:
            return {
                "format": CHECKPOINT_FORMAT,
                "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "optimizer_class": type(self.optimizer).__name__,
                "updates": self._version,
            }

    def requested_checkpoint_path(self, path: str | os.PathLike[str] | None) -> str | None:
        """Where a remote :func:`request_checkpoint` may write: inside the job's folder only.

        A process of the job (or anyone who reaches its port) must not make the server
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
            cpu_end = self._cpu_stopped if self._cpu_stopped is not None else time.process_time()
            timed = self._measured_from is not None and self._cpu_started is not None
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
                copy_seconds=self._copy_seconds,
                lock_wait_seconds=self._lock_wait_seconds,
                measured_updates=self._version - self._measured_base if timed else 0,
                measured_seconds=(
                    end - self._measured_from if timed and self._measured_from is not None else 0.0
                ),
                cpu_seconds=(
                    cpu_end - self._cpu_started if timed and self._cpu_started is not None else 0.0
                ),
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
            if self.config.measure_after == 0:
                self._start_timers_locked()

    def _start_timers_locked(self) -> None:
        self._measured_from = time.monotonic()
        self._cpu_started = time.process_time()
        self._measured_base = self._version
        self._update_seconds = self._optimizer_seconds = self._copy_seconds = 0.0
        self._lock_wait_seconds = 0.0

    def _push(
        self,
        rank: int,
        grad: Tensor,
        present: tuple[int, ...] | None,
        version: int,
        loss: Any,
        batch_size: int | None = None,
    ) -> Reply:
        """Apply a checked flat gradient; the reply.

        Args:
            rank: the worker's rank, checked.
            grad: the flat gradient, checked.
            present: indices of the parameters that have a gradient (``None``: all), checked.
            version: the version the gradient was computed from.
            loss: the worker's loss.
            batch_size: the size of the gradient's batch, checked (``None``: not known).
        """
        version = check_int(version, "version", 0, maximum=MAX_COUNT)
        loss = float(loss)
        point = None
        waited = time.perf_counter()
        with self._cond:
            began = time.perf_counter()
            self._lock_wait_seconds += began - waited
            self._last_seen[rank] = time.monotonic()
            if self._refuses_locked(rank):
                self._refused += 1
                return self._reply_locked(stop=True, applied=False)
            if version > self._version:
                raise ValueError(
                    f"worker {rank} pushed a gradient of version {version}, but only "
                    f"{self._version} updates exist; versions come from this server's replies"
                )
            staleness = self._version - version
            grads = self._install_flat_locked(grad, present)
            applied = self._apply_locked(grads, staleness, loss, batch_size)
            if applied:
                point = self._record_locked(rank, loss, staleness)
            copying = time.perf_counter()
            reply = self._reply_locked(stop=self._stop_reason is not None, applied=applied)
            ended = time.perf_counter()
            self._copy_seconds += ended - copying
            self._update_seconds += ended - began
            if applied and self._version == self.config.measure_after:
                self._start_timers_locked()  # the warm-up ends with this update
        if point is not None:
            self._after_update(point)
        return reply

    def _install_flat_locked(
        self, grad: Tensor, present: tuple[int, ...] | None
    ) -> list[Tensor | None]:
        """Copy a flat gradient into the server's buffer; each parameter's gradient (or None)."""
        self._grad.copy_(grad)
        if present is None:
            return list(self._grad_views)
        wanted = set(present)
        return [view if i in wanted else None for i, view in enumerate(self._grad_views)]

    def _refuses_locked(self, rank: int) -> bool:
        return self._stop_reason is not None or rank in self._dropped or rank in self._left

    def _apply_locked(
        self, grads: list[Tensor | None], staleness: int, loss: float, batch_size: int | None
    ) -> bool:
        """Install the gradient, step, clear it; ``False`` if the optimizer skipped the step.

        The worker's loss goes to the optimizer too, for a rule that watches it (a worker that
        sends none sends NaN, which the rule ignores).
        """
        try:
            for param, grad in zip(self._params, grads, strict=True):
                param.grad = grad
            began = time.perf_counter()
            # AsyncMomentumSGD gets the staleness and checks gradients itself (it raises or
            # skips as configured); torch's optimizers would write NaN into the weights: a
            # non-finite gradient is refused before they step.
            report = self._view.step(
                staleness, refuse_nonfinite=True, loss=loss, batch_size=batch_size
            )
            self._optimizer_seconds += time.perf_counter() - began
        finally:
            for param in self._params:
                param.grad = None
        if not report.applied:
            return False
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
        summary = self._view.summary()
        return summary.algorithmic_momentum, summary.implicit_momentum, summary.estimated_workers

    def _mean_staleness_locked(self) -> float:
        return self._view.summary().mean_staleness

    def _reply_locked(self, *, stop: bool, applied: bool) -> Reply:
        # The copy is made under the lock: the transport sends it after the lock is released.
        flat = self._flat.new_empty(0) if stop else self._flat.clone()
        return Reply(flat, self._version, stop, applied, self._control_port)

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
        self._cpu_stopped = time.process_time()
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
    served = {id(p) for p in params}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in served:
                raise ValueError(
                    "the optimizer holds a parameter that is not one of the model's: build the "
                    "optimizer from model.parameters() of the same model object"
                )


def _into_one_buffer(params: list[Tensor]) -> Tensor:
    """Move ``params`` into one new flat buffer, each becoming a view of it; returns the buffer.

    The ``nn.Parameter`` objects stay the same (their ``.data`` is re-pointed, as torch's own
    flat-parameter wrappers do), so the optimizer and the model keep working unchanged.
    """
    if len({p.dtype for p in params}) > 1:
        found = sorted({str(p.dtype) for p in params})
        raise ValueError(
            f"the server holds the parameters in one flat buffer, so they must share one dtype; "
            f"this model has {found}: convert it (e.g. model.float()) before serving it"
        )
    flat = flatten(params)
    vector_to_parameters(flat, params)
    return flat


def _check_present(present: Any, count: int) -> tuple[int, ...] | None:
    """``present`` as a tuple of increasing indices below ``count`` (or None), else ValueError."""
    if present is None:
        return None
    if isinstance(present, (str, bytes, Tensor)) or not isinstance(present, (list, tuple)):
        raise ValueError(
            f"present must be a tuple of parameter indices or None, got {type(present)!r}"
        )
    checked = tuple(check_int(i, "an index in present", 0, maximum=count - 1) for i in present)
    if any(a >= b for a, b in itertools.pairwise(checked)):
        raise ValueError(f"present must list parameter indices in increasing order, got {checked}")
    return checked


def _views(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    """One view of ``flat`` per parameter, shaped like it, in order."""
    views, offset = [], 0
    for param in params:
        count = param.numel()
        views.append(flat[offset : offset + count].view_as(param))
        offset += count
    return views
