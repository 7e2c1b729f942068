"""VersionClock exactness across processes, and the StalenessEstimator's accuracy and robustness.

Both stay usable when a process sharing them is killed inside their critical section.
"""

from __future__ import annotations

import copy
import gc
import os
import pickle
import signal
import threading
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.core.measuring import process_lock, staleness
from asyncmomentum.core.measuring.staleness import (
    StalenessEstimator,
    VersionClock,
)
from asyncmomentum.core.tracker import AsynchronyTracker
from asyncmomentum.core.validation import check_staleness

BUMPS = 5_000
PROCESSES = 4


def _bump(clock: VersionClock, times: int) -> None:
    for _ in range(times):
        clock.tick()


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_version_clock_loses_no_increment_across_processes(method):
    # fork: each child must lock through its own descriptor, not the one it inherited.
    clock = VersionClock().share_memory()
    ctx = mp.get_context(method)
    procs = [ctx.Process(target=_bump, args=(clock, BUMPS)) for _ in range(PROCESSES)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0] * PROCESSES
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert clock.value == PROCESSES * BUMPS


def test_version_clock_tick_returns_version_before_increment():
    clock = VersionClock(start=5)
    assert clock.tick() == 5
    assert clock.value == 6
    copy = pickle.loads(pickle.dumps(clock))
    copy.tick()
    assert (clock.value, copy.value) == (6, 7)


def _geometric(workers: float, n: int, seed: int) -> np.ndarray:
    # numpy's geometric counts trials (>= 1); staleness counts failures (>= 0).
    return np.random.default_rng(seed).geometric(1.0 / workers, size=n) - 1


@pytest.mark.parametrize("workers", [1, 2, 4, 8, 16, 32])
def test_estimate_within_ten_percent_on_geometric_staleness(workers):
    est = StalenessEstimator()
    for tau in _geometric(workers, 5_000, seed=workers):
        est.observe(int(tau))
    assert est.estimated_workers == pytest.approx(workers, rel=0.10)
    assert est.implicit_momentum == pytest.approx(1 - 1 / workers, abs=0.02)


def test_estimate_follows_a_step_change_within_three_horizons():
    est = StalenessEstimator(horizon=200)
    for tau in _geometric(8, 2_000, seed=1):
        est.observe(int(tau))
    assert est.estimated_workers == pytest.approx(8, rel=0.15)
    for tau in _geometric(2, 3 * 200, seed=2):
        est.observe(int(tau))
    assert est.estimated_workers == pytest.approx(2, rel=0.10)


@pytest.mark.parametrize("workers", [2, 4, 8])
def test_one_straggler_moves_the_estimate_by_less_than_ten_percent(workers):
    est = StalenessEstimator(horizon=100)
    for tau in _geometric(workers, 1_000, seed=3):
        est.observe(int(tau))
    before = est.estimated_workers
    est.observe(10_000)
    assert abs(est.estimated_workers - before) < 0.10 * before
    # Without winsorizing the same straggler would have moved it a lot: the test can fail.
    naive_shift = 2 / (100 + 1) * (10_000 - est.mean)
    assert naive_shift > before


def test_a_real_regime_change_is_not_winsorized_away():
    est = StalenessEstimator(horizon=50)
    for _ in range(600):
        est.observe(0)
    for _ in range(300):
        est.observe(15)
    assert est.estimated_workers == pytest.approx(16, rel=0.05)


def test_warmup_reports_one_worker_and_known_workers_skip_estimation():
    est = StalenessEstimator(warmup=10)
    for _ in range(9):
        est.observe(7)
    assert est.estimated_workers == 1.0
    assert est.implicit_momentum == 0.0
    est.observe(7)
    assert est.estimated_workers == pytest.approx(8)
    known = StalenessEstimator(workers=4)
    known.observe(100)
    assert known.estimated_workers == 4
    assert known.mean == pytest.approx(100)


def test_state_dict_round_trip_continues_identically():
    a, b = StalenessEstimator(horizon=30), StalenessEstimator(horizon=30)
    taus = _geometric(6, 700, seed=5)
    for tau in taus[:400]:
        a.observe(int(tau))
    b.load_state_dict(a.state_dict())
    for tau in taus[400:]:
        a.observe(int(tau))
        b.observe(int(tau))
    assert a.estimated_workers == b.estimated_workers
    assert a.state_dict()["ema"] == b.state_dict()["ema"]


def test_bad_state_and_bad_staleness_raise_and_change_nothing():
    est = StalenessEstimator(warmup=0)
    est.observe(3)
    before = est.state_dict()
    with pytest.raises(ValueError, match="format"):
        est.load_state_dict({"format": 999, "count": 1, "ema": [0, 0], "window": []})
    with pytest.raises(ValueError, match="state_dict"):
        est.load_state_dict([1, 2, 3])
    for bad in (-1, 2.5, "3", True):
        with pytest.raises(ValueError, match="staleness"):
            est.observe(bad)
    assert est.state_dict()["ema"] == before["ema"]
    assert est.count == 1
    assert check_staleness(np.int64(4)) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"horizon": 0}, "horizon"),
        ({"warmup": -1}, "warmup"),
        ({"workers": 0.5}, "workers"),
        ({"straggler_quantile": 0.1}, "straggler_quantile"),
        ({"window": 0}, "window"),
    ],
)
def test_estimator_refuses_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StalenessEstimator(**kwargs)


def _observe_many(est: StalenessEstimator, tau: int, times: int) -> None:
    for _ in range(times):
        est.observe(tau)


def test_shared_estimator_counts_observations_from_all_processes():
    est = StalenessEstimator(warmup=0).share_memory()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_observe_many, args=(est, 3, 500)) for _ in range(2)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert est.count == 1_000
    assert est.estimated_workers == pytest.approx(4)


def test_tuner_applies_the_rule_to_the_estimate():
    tuner = AsynchronyTracker(warmup=0, horizon=10)
    for _ in range(200):
        tuner.observe(19)  # M = 20: implicit 0.95, additive wants -0.05
    assert tuner.estimated_workers == pytest.approx(20)
    assert tuner.algorithmic_momentum(0.9) == pytest.approx(-0.05)
    assert tuner.total_momentum(tuner.algorithmic_momentum(0.9)) == pytest.approx(0.9)
    assert tuner.algorithmic_momentum(0.99) == pytest.approx(0.04)


@pytest.mark.parametrize(
    ("file_lock", "match"),
    [(True, "stopped or stuck while holding it"), (False, "probably died while holding it")],
)
def test_a_lock_held_for_too_long_fails_loudly_instead_of_hanging(monkeypatch, file_lock, match):
    # file_lock=False: the fallback of platforms without flock, a multiprocessing.Lock.
    monkeypatch.setattr(process_lock, "AVAILABLE", file_lock)
    monkeypatch.setattr(staleness, "LOCK_TIMEOUT_S", 0.05)
    clock = VersionClock().share_memory()
    assert isinstance(clock._lock, process_lock.FileLock) == file_lock
    clock._lock.acquire()  # as if a process stopped (or, fallback: died) inside tick()
    try:
        with pytest.raises(RuntimeError, match=match):
            clock.tick()
    finally:
        clock._lock.release()
    assert clock.tick() == 0


def _hold_the_lock_until_killed(shared, held, forever) -> None:
    """Enter the critical section as tick() does, store a tick, say so, never leave."""
    shared._acquire()
    if isinstance(shared, VersionClock):
        shared._np("_count")[0] += 1  # the tick's store is done, its release never comes
    held.set()
    forever.wait()


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("kind", "holder_method"), [("clock", "spawn"), ("clock", "fork"), ("estimator", "spawn")]
)
def test_a_holder_killed_inside_the_critical_section_blocks_nobody(
    monkeypatch, kind, holder_method
):
    # If the lock stayed taken, the parent's tick would raise after 5 s (not hang).
    monkeypatch.setattr(staleness, "LOCK_TIMEOUT_S", 5.0)
    if kind == "clock":
        shared, work = VersionClock(start=10).share_memory(), _bump
    else:
        shared, work = StalenessEstimator(warmup=0).share_memory(), _observe_threes
    spawn = mp.get_context("spawn")
    held, forever, ready = spawn.Event(), spawn.Event(), spawn.Event()
    holder = mp.get_context(holder_method).Process(
        target=_hold_the_lock_until_killed, args=(shared, held, forever)
    )
    other = spawn.Process(target=_signal_then, args=(ready, work, shared, 1_000))
    try:
        holder.start()
        assert held.wait(timeout=90), "the holder never took the lock"
        assert not shared._lock.acquire(timeout=0.05)  # really held, by the holder
        other.start()
        assert ready.wait(timeout=90), "the other process never started"
        os.kill(holder.pid, signal.SIGKILL)  # inside the critical section
        holder.join(timeout=30)
        assert holder.exitcode == -signal.SIGKILL
        started = time.monotonic()
        work(shared, 1)
        assert time.monotonic() - started < 2.0
        other.join(timeout=60)
        assert other.exitcode == 0
    finally:
        for process in (holder, other):
            if process.pid is not None and process.is_alive():
                process.kill()
                process.join()
    if kind == "clock":
        assert shared.value == 10 + 1 + 1 + 1_000  # the holder's store, the parent, the other
    else:
        assert shared.count == 1 + 1_000


def _observe_threes(est: StalenessEstimator, times: int) -> None:
    _observe_many(est, 3, times)


def _signal_then(ready, work, shared, times: int) -> None:
    ready.set()
    work(shared, times)


def test_the_lock_file_lives_as_long_as_the_shared_object():
    clock = VersionClock().share_memory()
    path = clock._lock.path
    assert os.path.exists(path)
    copy = pickle.loads(pickle.dumps(clock))  # an independent copy: its own thread lock
    assert not copy.is_shared
    assert isinstance(copy._lock, type(threading.Lock()))
    del clock
    gc.collect()
    assert not os.path.exists(path)


class _CountingLock:
    """A thread lock that counts its acquisitions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acquired = 0

    def acquire(self, timeout: float = -1) -> bool:
        self.acquired += 1
        return self._lock.acquire(timeout=timeout)

    def release(self) -> None:
        self._lock.release()


def test_a_step_takes_one_lock_for_the_clock_and_the_estimator():
    param = torch.nn.Parameter(torch.zeros(3))
    opt = AsyncMomentumSGD([param], lr=0.1, momentum=0.9)
    assert opt.tracker.estimator._lock is opt.tracker.clock._lock
    counting = _CountingLock()
    opt.tracker.clock._own_lock = counting  # the estimator takes its clock's lock, whatever it is
    param.grad = torch.ones(3)
    opt.step(staleness=3)
    assert counting.acquired == 1
    assert opt.tracker.clock.value == 1
    assert opt.tracker.estimator.count == 1
    copied = copy.deepcopy(opt)  # a copy gets fresh locks, linked again
    assert copied.tracker.estimator._lock is copied.tracker.clock._lock
    assert copied.tracker.clock._lock is not counting
    opt.share_memory()
    assert opt.tracker.estimator._lock is opt.tracker.clock._lock


def test_tick_and_observe_without_a_shared_lock_still_counts_and_records():
    clock, estimator = VersionClock(start=5), StalenessEstimator(warmup=0)
    assert clock.tick_and_observe(estimator, version_read=2, staleness=None) == (5, 3)
    assert clock.tick_and_observe(estimator, version_read=0, staleness=1) == (6, 1)
    assert clock.value == 7
    assert estimator.count == 2
