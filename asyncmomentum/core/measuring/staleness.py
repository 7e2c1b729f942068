"""Where staleness comes from, and what it says about the number of workers.

:class:`VersionClock` counts applied updates exactly, across threads and (after
:meth:`~VersionClock.share_memory`) across processes. :class:`StalenessEstimator` turns the
staleness of each applied gradient into an estimate of the number of asynchronous workers ``M``
and of the implicit momentum ``1 - 1/M`` they add.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from asyncmomentum.core import formulas
from asyncmomentum.core.measuring import process_lock
from asyncmomentum.core.validation import (
    MAX_COUNT,
    check_int,
    check_real,
    check_staleness,
    check_state,
)

__all__ = [
    "DEFAULT_HORIZON",
    "DEFAULT_WARMUP",
    "StalenessEstimator",
    "VersionClock",
]

#: Seconds to wait for the clock's or estimator's lock before concluding its holder is stuck
#: (or, with the fallback lock of platforms without ``flock``, died while holding it).
LOCK_TIMEOUT_S = 60.0

#: Layout version of the state dicts of the clock and the estimator.
STATE_FORMAT = 1

#: Default span of the staleness moving average, in updates: the one default of every
#: ``horizon`` argument of the package (estimator, tuner, optimizer, server, Lightning).
DEFAULT_HORIZON = 1000
#: Default number of observations before the estimate leaves ``M = 1``: the one default of every
#: ``warmup`` argument of the package.
DEFAULT_WARMUP = 20


class _SharableState:
    """State in tensors (so it can move to shared memory) behind a lock.

    The lock is a thread lock until ``share_memory()`` and a process lock after. On POSIX the
    process lock is a :class:`~asyncmomentum.core.measuring.process_lock.FileLock` (``flock`` on
    a temporary file), which the kernel releases when a process dies holding it: a worker killed
    inside the critical section (SIGKILL included) blocks nobody. Platforms without ``flock``
    (Windows) fall back to ``multiprocessing.Lock``, which stays taken if its holder dies: every
    other process then fails after :data:`LOCK_TIMEOUT_S` (loudly, rather than hanging).
    A holder that dies mid-update leaves what it wrote: the clock's update is one store (done or
    not), the estimator's observation can be half recorded (a slightly off moving average).

    The hot path reads and writes through cached numpy views of the tensors: a numpy scalar
    access costs about a tenth of a torch one. A process lock can only travel to a child when the
    child is created (pickled while spawning); pickled any other way the object becomes an
    independent, unshared copy with a fresh lock.
    """

    #: Names of the tensor attributes that hold the state.
    _TENSORS: tuple[str, ...] = ()
    _shared: bool
    _own_lock: Any
    _guard: _SharableState | None
    _views: dict[str, np.ndarray] | None

    def _init_lock(self, guard: _SharableState | None = None) -> None:
        self._shared = False
        self._guard = guard
        self._own_lock = threading.Lock()
        self._views = None

    @property
    def _lock(self) -> Any:
        # A guarded object always takes its guard's current lock: moving the guard to shared
        # memory (a process lock) needs no re-linking.
        return self._own_lock if self._guard is None else self._guard._lock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self._acquire()
        try:
            yield
        finally:
            lock.release()

    def _acquire(self) -> Any:
        """Take the lock; the caller releases it.

        Returns:
            The lock taken, for the caller to release (the same one even if ``_lock`` changes).

        Raises:
            RuntimeError: the lock could not be taken within :data:`LOCK_TIMEOUT_S`.
        """
        lock = self._lock
        if lock.acquire(timeout=LOCK_TIMEOUT_S):
            return lock
        # A holder that never lets go (stopped, stuck; with the fallback lock, also killed):
        # fail loudly instead of hanging every other process.
        if isinstance(lock, process_lock.FileLock):
            cause = (
                "a process or thread sharing it is stopped or stuck while holding it (a dead "
                "holder would have released it). Resume or end that process to go on."
            )
        else:
            cause = (
                "a process sharing it probably died while holding it. Recreate the shared "
                "state (or restart the job) to go on."
            )
        raise RuntimeError(
            f"{type(self).__name__}: could not take its lock within {LOCK_TIMEOUT_S:.0f} s; "
            + cause
        )

    def _np(self, name: str) -> np.ndarray:
        if self._views is None:
            self._views = {t: getattr(self, t).numpy() for t in self._TENSORS}
        return self._views[name]

    def _share_memory(self) -> None:
        for name in self._TENSORS:
            getattr(self, name).share_memory_()  # moves the storage: old views are stale
        self._views = None
        if not self._shared:
            if self._guard is None:
                if process_lock.AVAILABLE:
                    self._own_lock = process_lock.FileLock()
                else:
                    self._own_lock = multiprocessing.get_context("spawn").Lock()
            self._shared = True

    @property
    def is_shared(self) -> bool:
        """Whether the state lives in shared memory, visible to child processes."""
        return self._shared

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_views"] = None
        spawning = multiprocessing.context.get_spawning_popen() is not None
        if not (self._shared and spawning):
            # Plain pickling (copy, save) yields an independent copy: it must not share the lock.
            state["_own_lock"] = None
            state["_shared"] = False
            state["_detach"] = True
        elif self._guard is not None:
            state["_own_lock"] = None  # unused: the guard's lock travels with the guard
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        detach = state.pop("_detach", False)
        self.__dict__.update(state)
        if self._own_lock is None:
            self._own_lock = threading.Lock()
        if detach:
            self._detach_storage()

    def _detach_storage(self) -> None:
        # Plain pickling already copied the tensors; clone anyway so nothing aliases a sender.
        for name in self._TENSORS:
            setattr(self, name, getattr(self, name).clone())


class VersionClock(_SharableState):
    """Monotonic count of applied updates, exact under threads and processes.

    Every applied update calls :meth:`tick`, which returns the version the update was applied
    at and advances the clock by one. A worker notes :attr:`value` when it reads the parameters;
    the staleness of its gradient is the version at apply time minus the version it read.

    Args:
        start: initial version.
    """

    _TENSORS = ("_count",)

    def __init__(self, start: int = 0) -> None:
        # A tensor, not an int, so that share_memory() can put it where child processes see it.
        start = check_int(start, "start", 0, maximum=MAX_COUNT)
        self._count = torch.tensor([start], dtype=torch.int64)
        self._init_lock()

    @property
    def value(self) -> int:
        """The current version: the number of updates applied so far."""
        return int(self._np("_count")[0])

    def tick(self) -> int:
        """Atomically advance the clock by one; return the version before the increment."""
        lock = self._acquire()  # not the _locked() context manager: it doubles the cost
        try:
            return self._tick_locked()
        finally:
            lock.release()

    def _tick_locked(self) -> int:
        # A plain `tensor += 1` from several processes loses increments: read-modify-write races.
        count = self._np("_count")
        version = int(count[0])
        count[0] = version + 1
        return version

    def tick_and_observe(
        self, estimator: StalenessEstimator, version_read: int, staleness: int | None
    ) -> tuple[int, int]:
        """Claim the next version and record in ``estimator`` the staleness of its update.

        With an estimator guarded by this clock (``StalenessEstimator(lock_of=clock)``) both
        happen in one critical section: one lock per update instead of two (each a system call
        once the lock is a process lock), and no other update comes between count and record.

        Args:
            estimator: the estimator of ``M``.
            version_read: the version the gradient's parameters were read at.
            staleness: the staleness if the caller knows it (a parameter server does), else
                ``None``: measured as the version claimed minus ``version_read``.

        Returns:
            The version the update is applied at, and its staleness.
        """
        if estimator._guard is not self:
            version = self.tick()
            tau = staleness if staleness is not None else max(version - version_read, 0)
            estimator.observe(tau)
            return version, tau
        lock = self._acquire()
        try:
            version = self._tick_locked()
            tau = staleness if staleness is not None else max(version - version_read, 0)
            estimator._observe_locked(tau)
        finally:
            lock.release()
        return version, tau

    def share_memory(self) -> VersionClock:
        """Move the counter to shared memory and guard it with a process lock; returns self."""
        self._share_memory()
        return self

    def state_dict(self) -> dict[str, Any]:
        """The clock's state: ``{"format", "value"}``."""
        return {"format": STATE_FORMAT, "value": self.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the clock from :meth:`state_dict`.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        check_state(state_dict, "VersionClock", expected_format=STATE_FORMAT, keys=("value",))
        try:
            value = check_int(state_dict["value"], "value", 0, maximum=MAX_COUNT)
        except ValueError as error:
            raise ValueError(f"VersionClock state is corrupt: {error}") from None
        with self._locked():
            self._np("_count")[0] = value

    def __repr__(self) -> str:
        return f"VersionClock(value={self.value}, shared={self.is_shared})"


class StalenessEstimator(_SharableState):
    """Estimates the number of asynchronous workers ``M`` from observed staleness.

    Keeps an exponential moving average of the staleness ``tau`` of applied gradients and reports
    ``M_hat = 1 + mean(tau)`` (exact for the geometric staleness of ``M`` memoryless workers).
    Each observation is first winsorized at a high quantile of a recent window of raw
    observations, so that one straggler (``tau = 10_000`` among small ones) barely moves the
    estimate, while a real change of regime soon moves the quantile itself.

    Args:
        horizon: span of the moving average, in updates: an observation's weight is
            ``2 / (horizon + 1)``, and the estimate follows a change of ``M`` within about
            ``3 * horizon`` updates. Smaller reacts faster; larger is less noisy.
        warmup: number of observations before which the estimate stays ``M = 1``
            (no implicit momentum), so the first few gradients don't set the momentum.
        workers: the known number of workers; if given, estimation is skipped and ``M`` is this.
            Observations are still recorded for :attr:`mean`.
        straggler_quantile: quantile of the recent window at which observations are winsorized.
        window: number of recent raw observations kept for the quantile.
        lock_of: a clock whose lock guards this estimator too, so that
            :meth:`VersionClock.tick_and_observe` counts an update and records its staleness in
            one critical section.
    """

    #: Fewer recent observations than this give no reliable quantile: no winsorizing before it.
    MIN_WINDOW_FOR_QUANTILE = 32
    #: The winsorizing cap is recomputed every this many observations (it moves slowly; a
    #: partial sort of the window every update would dominate the tuner's cost).
    CAP_EVERY = 8

    _TENSORS = ("_stats", "_counts", "_window")

    def __init__(
        self,
        horizon: int = DEFAULT_HORIZON,
        warmup: int = DEFAULT_WARMUP,
        workers: float | None = None,
        straggler_quantile: float = 0.99,
        window: int = 512,
        lock_of: VersionClock | None = None,
    ) -> None:
        horizon = check_int(horizon, "horizon", 1)
        warmup = check_int(warmup, "warmup", 0)
        self.workers = None if workers is None else check_real(workers, "workers", minimum=1.0)
        self.straggler_quantile = check_real(
            straggler_quantile, "straggler_quantile", minimum=0.5, maximum=1.0
        )
        window = check_int(window, "window", 1)
        self.horizon = horizon
        self.warmup = warmup
        self._alpha = 2.0 / (horizon + 1.0)
        # Tensors so share_memory() can make one estimate for all Hogwild processes.
        # [weighted sum, total weight, winsorizing cap (inf: none yet)]
        self._stats = torch.tensor([0.0, 0.0, math.inf], dtype=torch.float64)
        self._counts = torch.zeros(2, dtype=torch.int64)  # [observations, ring cursor]
        self._window = torch.zeros(window, dtype=torch.int64)
        self._init_lock(guard=lock_of)

    # -- observations -------------------------------------------------------------------------

    def observe(self, tau: int) -> None:
        """Record the staleness of one applied gradient.

        Args:
            tau: updates applied between the worker's read and this gradient's application (>= 0).
        """
        tau = check_staleness(tau)
        lock = self._acquire()  # not the _locked() context manager: it costs a microsecond
        try:
            self._observe_locked(tau)
        finally:
            lock.release()

    def _observe_locked(self, tau: int) -> None:
        stats, counts, window = self._np("_stats"), self._np("_counts"), self._np("_window")
        count, cursor = int(counts[0]), int(counts[1])
        size = window.shape[0]
        window[cursor] = tau
        filled = min(count + 1, size)
        if filled >= min(self.MIN_WINDOW_FOR_QUANTILE, size) and (
            count % self.CAP_EVERY == 0 or math.isinf(stats[2])
        ):
            k = min(filled - 1, math.ceil(self.straggler_quantile * (filled - 1)))
            stats[2] = float(np.partition(window[:filled], k)[k])
        value = min(float(tau), float(stats[2]))
        decay = 1.0 - self._alpha
        stats[0] = decay * stats[0] + self._alpha * value
        stats[1] = decay * stats[1] + self._alpha
        counts[0] = count + 1
        counts[1] = (cursor + 1) % size

    # -- estimates ----------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Number of observations so far."""
        return int(self._np("_counts")[0])

    @property
    def mean(self) -> float:
        """Moving average of the (winsorized) staleness; 0 before any observation."""
        stats = self._np("_stats")
        weight = float(stats[1])
        return float(stats[0]) / weight if weight > 0 else 0.0

    @property
    def estimated_workers(self) -> float:
        """``M_hat``: the known ``workers``, else 1 during warm-up, else ``1 + mean``."""
        if self.workers is not None:
            return self.workers
        if self.count < self.warmup:
            return 1.0
        return formulas.workers_from_staleness(self.mean)

    @property
    def implicit_momentum(self) -> float:
        """Implicit momentum ``1 - 1/M_hat`` of the observed asynchrony."""
        return formulas.implicit_momentum(self.estimated_workers)

    # -- lifecycle ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every observation."""
        with self._locked():
            self._stats.copy_(torch.tensor([0.0, 0.0, math.inf], dtype=torch.float64))
            self._counts.zero_()
            self._window.zero_()

    def share_memory(self) -> StalenessEstimator:
        """Move the estimate to shared memory, guarded by a process lock; returns self."""
        self._share_memory()
        return self

    def state_dict(self) -> dict[str, Any]:
        """The estimator's state (observations, not configuration), as plain values and tensors."""
        with self._locked():
            count, cursor = (int(v) for v in self._counts)
            size = self._window.numel()
            filled = min(count, size)
            # Oldest first, so a window of another size can take the most recent entries.
            order = [(cursor - filled + i) % size for i in range(filled)]
            return {
                "format": STATE_FORMAT,
                "count": count,
                "ema": self._stats[:2].tolist(),
                "cap": float(self._stats[2]),
                "window": self._window[order].clone(),
            }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore observations from :meth:`state_dict`; the configuration stays this object's.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        check_state(
            state_dict,
            "StalenessEstimator",
            expected_format=STATE_FORMAT,
            keys=("count", "ema", "window"),
        )
        try:
            count = check_int(state_dict["count"], "count", 0, maximum=MAX_COUNT)
        except ValueError as error:
            raise ValueError(f"StalenessEstimator state is corrupt: {error}") from None
        ema = torch.as_tensor(state_dict["ema"], dtype=torch.float64)
        cap = float(state_dict.get("cap", math.inf))
        recent = torch.as_tensor(state_dict["window"], dtype=torch.int64).flatten()
        bad_cap = math.isnan(cap) or cap < 0
        if ema.shape != (2,) or not torch.isfinite(ema).all() or bad_cap or (recent < 0).any():
            raise ValueError("StalenessEstimator state is corrupt: bad 'ema' or 'window' values")
        size = self._window.numel()
        recent = recent[-size:]
        with self._locked():
            self._stats[:2] = ema
            self._stats[2] = cap
            self._window.zero_()
            self._window[: recent.numel()] = recent
            self._counts[0] = count
            self._counts[1] = recent.numel() % size

    def __repr__(self) -> str:
        return (
            f"StalenessEstimator(count={self.count}, mean={self.mean:.3g}, "
            f"estimated_workers={self.estimated_workers:.3g}, horizon={self.horizon}, "
            f"warmup={self.warmup}, workers={self.workers}, shared={self.is_shared})"
        )
