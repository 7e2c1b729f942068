"""Hogwild training in real worker processes (spawned), and its parts driven by hand.

The tests that start processes keep them few and short: on a 2-core machine shared with other
test runs, most of their time is each worker importing torch. Every such run has a global timeout
and a pytest timeout, and checks afterwards that no worker process is left.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
import signal
import threading

import pytest
import torch
from conftest import make_cnn

from asyncmomentum import AsynchronyTracker, AsyncMomentumSGD, VersionClock
from asyncmomentum.runtimes.hogwild import (
    HogwildError,
    WorkerFailure,
    WorkerProgress,
    classification_loss,
    shard,
    train_hogwild,
    worker_loop,
    worker_rank,
    worker_seed,
)

# Seconds a whole train_hogwild run may take, start-up of every worker included.
RUN_TIMEOUT_S = 45.0


def _dataset(rows: int = 384, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable synthetic 8x8 images: the label is which of 10 fixed patterns was noised."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (rows,), generator=gen)
    x = patterns[y] + 0.5 * torch.randn(rows, 1, 8, 8, generator=gen)
    return x, y


@torch.no_grad()
def _full_loss(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    return classification_loss(model, data).item()


def _assert_all_processes_gone(result) -> None:
    assert multiprocessing.active_children() == []
    for report in result.reports:
        assert report.exit_code is not None, f"worker {report.rank} was never joined"
        assert not os.path.exists(f"/proc/{report.pid}"), f"worker {report.rank} still exists"


# -- loss functions the workers run (module level: spawn pickles them by reference) --------------

_calls = itertools.count()


def _die_holding_the_shared_clock() -> None:
    """SIGKILL this process inside the shared clock's critical section, as in an unlucky kill."""
    (clock,) = (o for o in gc.get_objects() if isinstance(o, VersionClock) and o.is_shared)
    clock._acquire()
    os.kill(os.getpid(), signal.SIGKILL)


def loss_raising_on_rank_2_killed_on_rank_1(model, batch):
    """Rank 1 is killed holding the clock's lock at its 8th step; rank 2 raises at its 6th."""
    rank, call = worker_rank(), next(_calls)
    if rank == 1 and call >= 7:
        _die_holding_the_shared_clock()  # after 7 updates, 5 of them reported
    if rank == 2 and call >= 5:
        raise RuntimeError("injected failure on rank 2")
    return classification_loss(model, batch)


def loss_hanging_on_rank_0(model, batch):
    """Rank 0 blocks forever at its first step, as a deadlocked worker would."""
    if worker_rank() == 0:
        threading.Event().wait()
    return classification_loss(model, batch)


def vector_loss(model, batch):
    """Forgets to reduce: a (N,) tensor instead of a scalar."""
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


# -- real processes --------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_four_workers_measure_asynchrony_and_train():
    data = _dataset()
    model = make_cnn(seed=0)
    opt = AsyncMomentumSGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_before = _full_loss(model, data)
    progress: list[WorkerProgress] = []

    result = train_hogwild(
        model,
        opt,
        classification_loss,
        data,
        workers=4,
        steps_per_worker=150,
        batch_size=16,
        seed=0,
        report_every=10,
        timeout=RUN_TIMEOUT_S,
        on_progress=progress.append,
    )

    _assert_all_processes_gone(result)
    assert result.ok, result.failures
    assert [r.exit_code for r in result.reports] == [0, 0, 0, 0]
    # Every update is counted: the shared clock agrees with what the workers report.
    assert [r.steps for r in result.reports] == [150] * 4
    assert result.total_updates == 600
    assert result.clock_value - result.clock_start == 600
    assert opt.tracker.clock.value == 600
    # Four processes on fewer cores: the optimizer saw stale gradients and estimated M from them.
    assert max(r.max_staleness for r in result.reports) > 0
    assert result.mean_staleness > 0
    assert result.estimated_workers > 1.5
    assert result.estimated_workers == pytest.approx(1 + result.mean_staleness)
    assert result.implicit_momentum == pytest.approx(1 - 1 / result.estimated_workers)
    # The parent's optimizer follows the shared estimate: algorithmic = target - implicit.
    assert opt.estimated_workers == result.estimated_workers
    assert opt.algorithmic_momentum == pytest.approx(0.9 - result.implicit_momentum)
    assert result.total_momentum == pytest.approx(0.9)
    # One global velocity: the workers' updates landed in the parent's shared momentum buffers.
    buffers = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(b.is_shared() for b in buffers)
    assert sum(b.abs().sum().item() for b in buffers) > 0
    # The shared parameters were trained in place.
    assert _full_loss(model, data) < 0.5 * loss_before
    # Progress: every report reached on_progress and the trace, each worker ended with done.
    assert len(progress) == len(result.trace) == 4 * 15
    assert sorted(m.rank for m in progress if m.done) == [0, 1, 2, 3]
    for rank in range(4):
        steps = [m.step for m in progress if m.rank == rank]
        assert steps == list(range(10, 151, 10))
    updates = [point.update for point in result.trace]
    assert updates == sorted(updates)
    assert updates[-1] <= 600
    assert result.train_time > 0
    assert result.updates_per_second > 0
    # The timeline has one point per report, in time order, within the training time; the
    # steady rate leaves the warm-up out and needs reports after it.
    assert len(result.timeline) == len(progress)
    times = [t for t, _ in result.timeline]
    assert times == sorted(times)
    assert 0 < times[-1] <= result.train_time + 1e-9
    assert [u for _, u in result.timeline] == [m.update for m in progress]
    assert result.steady_updates_per_second(warmup_updates=200) > 0
    with pytest.raises(ValueError, match="fewer than two progress reports"):
        result.steady_updates_per_second(warmup_updates=601)


@pytest.mark.timeout(120)
def test_failing_workers_are_reported_while_the_others_finish():
    data = _dataset(rows=192)
    model = make_cnn(seed=1)
    opt = AsyncMomentumSGD(model.parameters(), lr=0.05, momentum=0.9)

    with pytest.warns(RuntimeWarning, match="2 of 3 workers failed"):
        result = train_hogwild(
            model,
            opt,
            loss_raising_on_rank_2_killed_on_rank_1,
            data,
            workers=3,
            steps_per_worker=60,
            batch_size=16,
            report_every=5,
            timeout=RUN_TIMEOUT_S,
        )

    _assert_all_processes_gone(result)
    survivor, dead, raised = result.reports
    assert survivor.ok
    assert survivor.steps == 60
    assert survivor.exit_code == 0
    assert dead.exit_code == -signal.SIGKILL
    assert not dead.finished
    assert dead.steps == 5  # as of its last report; it applied 2 more before it was killed
    assert "exited with code -9" in dead.error
    assert raised.exit_code == 1
    assert not raised.finished
    assert raised.steps == 5
    assert raised.error == "RuntimeError: injected failure on rank 2"
    assert not result.timed_out
    assert not result.ok
    assert result.failures == [dead, raised]
    # Every applied update counts, also the killed worker's unreported ones: the clock is exact.
    assert sum(r.steps for r in result.reports) == 60 + 5 + 5
    assert result.clock_value - result.clock_start == result.total_updates == 60 + 7 + 5
    # The killed worker held the clock's lock: the kernel released it, the parent can tick.
    assert opt.tracker.clock.tick() == result.clock_value
    with pytest.raises(HogwildError, match="worker 2: RuntimeError: injected failure"):
        result.raise_if_failed()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.timeout(120)
def test_torch_sgd_runs_with_a_clock_shared_by_the_module():
    data = _dataset(rows=192)
    model = make_cnn(seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_before = _full_loss(model, data)

    result = train_hogwild(
        model,
        opt,
        classification_loss,
        data,
        workers=2,
        steps_per_worker=150,
        batch_size=16,
        seed=3,
        timeout=RUN_TIMEOUT_S,
    )

    _assert_all_processes_gone(result)
    assert result.ok, result.failures
    assert result.clock_start == 0
    assert result.clock_value == result.total_updates == 300
    assert max(r.max_staleness for r in result.reports) > 0
    assert result.estimated_workers == pytest.approx(1 + result.mean_staleness)
    # torch's SGD: fixed momentum, the implicit one comes on top of it.
    assert result.algorithmic_momentum == 0.9
    assert result.total_momentum == pytest.approx(0.9 + result.implicit_momentum)
    # Its momentum buffers were created inside each worker: the parent's optimizer has none.
    assert len(opt.state) == 0
    assert _full_loss(model, data) < loss_before


@pytest.mark.timeout(90)
def test_global_timeout_terminates_a_hung_worker():
    data = _dataset(rows=64)
    model = make_cnn(seed=3)
    opt = AsyncMomentumSGD(model.parameters(), lr=0.05)
    timeout = 6.0

    with pytest.warns(RuntimeWarning, match="global timeout"):
        result = train_hogwild(
            model,
            opt,
            loss_hanging_on_rank_0,
            data,
            workers=1,
            steps_per_worker=20,
            batch_size=8,
            timeout=timeout,
        )

    _assert_all_processes_gone(result)
    assert result.timed_out
    assert not result.ok
    hung = result.reports[0]
    assert not hung.finished
    assert hung.steps == 0
    assert hung.exit_code is not None
    assert hung.exit_code < 0  # terminated by a signal
    assert "timeout of 6.0 s" in hung.error
    assert result.wall_time < timeout + 15.0  # the timeout, then a bounded shutdown
    # The shared clock's process lock is free: the parent can go on training.
    assert opt.tracker.clock.tick() == result.clock_value


@pytest.mark.timeout(90)
def test_an_error_in_on_progress_stops_and_joins_every_worker():
    data = _dataset(rows=64)
    model = make_cnn(seed=4)
    opt = AsyncMomentumSGD(model.parameters(), lr=0.01)
    seen: list[WorkerProgress] = []
    running: list[int] = []

    def fail_on_first_report(message: WorkerProgress) -> None:
        seen.append(message)
        running.extend(p.pid for p in multiprocessing.active_children())
        raise KeyError("progress bar broke")

    with pytest.raises(KeyError, match="progress bar broke"):
        train_hogwild(
            model,
            opt,
            classification_loss,
            data,
            workers=1,
            steps_per_worker=100_000,  # far more than can run before the first report
            batch_size=8,
            report_every=1,
            timeout=RUN_TIMEOUT_S,
            on_progress=fail_on_first_report,
        )

    assert len(seen) == 1
    assert seen[0].step == 1
    assert len(running) == 1  # the worker was running when the callback raised ...
    assert multiprocessing.active_children() == []
    assert not os.path.exists(f"/proc/{running[0]}")  # ... and is gone now


# -- argument checks (no process is started) -------------------------------------------------------


BAD_ARGUMENTS = [
    ("workers", {"workers": 0}),
    ("workers", {"workers": 2.0}),
    ("steps_per_worker", {"steps_per_worker": 0}),
    ("batch_size", {"batch_size": 0}),
    ("report_every", {"report_every": -1}),
    ("timeout", {"timeout": 0}),
    ("seed", {"seed": -1}),
    ("fewer than workers", {"workers": 17}),
    ("same first dimension", {"data": "mismatched"}),
    ("tuple or list", {"data": "bare tensor"}),
    ("on the CPU", {"data": "on the meta device"}),
    ("picklable", {"loss_fn": lambda model, batch: model(batch[0]).sum()}),
    ("not one of model.parameters", {"optimizer": "of another model"}),
    ("torch.optim.Optimizer", {"optimizer": "not an optimizer"}),
]


@pytest.mark.parametrize(("match", "overrides"), BAD_ARGUMENTS)
def test_bad_arguments_raise_before_anything_starts(match, overrides):
    x, y = _dataset(rows=16)
    model = make_cnn()
    opt = AsyncMomentumSGD(model.parameters(), lr=0.05)
    named = {
        "mismatched": (x, y[:8]),
        "bare tensor": x,
        "on the meta device": (x.to("meta"), y.to("meta")),
        "of another model": torch.optim.SGD(make_cnn().parameters(), lr=0.05),
        "not an optimizer": "sgd",
    }
    call = {"optimizer": opt, "loss_fn": classification_loss, "data": (x, y), "workers": 2}
    call.update({k: named.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()})
    before = [p.detach().clone() for p in model.parameters()]

    with pytest.raises(ValueError, match=match):
        train_hogwild(model, call.pop("optimizer"), call.pop("loss_fn"), call.pop("data"), **call)

    assert multiprocessing.active_children() == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not any(p.is_shared() for p in model.parameters())
    assert opt.tracker.clock.value == 0
    assert not opt.tracker.clock.is_shared


# -- the parts, by hand ----------------------------------------------------------------------------


def test_shard_is_a_strided_partition_of_the_rows():
    x = torch.arange(10).unsqueeze(1)
    y = torch.arange(10) * 10
    shards = [shard((x, y), rank, 3) for rank in range(3)]
    assert [s[0].squeeze(1).tolist() for s in shards] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert all(torch.equal(sy, sx.squeeze(1) * 10) for sx, sy in shards)
    assert shards[0][0].data_ptr() == x.data_ptr()  # a view, not a copy
    with pytest.raises(ValueError, match="rank"):
        shard((x, y), 3, 3)
    with pytest.raises(ValueError, match="fewer than workers"):
        shard((x, y), 0, 11)


def test_worker_seeds_are_reproducible_and_distinct():
    seeds = [worker_seed(7, rank) for rank in range(64)]
    assert seeds == [worker_seed(7, rank) for rank in range(64)]
    assert len(set(seeds)) == 64
    assert worker_seed(8, 0) != worker_seed(7, 0)
    assert all(0 <= s < 2**63 for s in seeds)
    torch.Generator().manual_seed(seeds[0])  # a valid torch seed
    with pytest.raises(ValueError, match="seed"):
        worker_seed(-1, 0)


def test_worker_loop_by_hand_reports_progress_and_counts_updates():
    data = _dataset(rows=64)
    model = make_cnn(seed=5)
    opt = AsyncMomentumSGD(model.parameters(), lr=0.05, momentum=0.9, warmup=0)
    messages: list = []

    last = worker_loop(
        0,
        model,
        opt,
        classification_loss,
        data,
        steps=25,
        batch_size=8,
        report=messages.append,
        report_every=10,
        num_threads=None,
    )

    assert [m.step for m in messages] == [10, 20, 25]
    assert messages[-1] is last
    assert last.done
    assert not messages[0].done
    assert last.updates == 25
    assert opt.tracker.clock.value == 25
    assert last.update == 25
    # One worker alone: every gradient is fresh, no implicit momentum.
    assert last.max_staleness == 0
    assert last.implicit_momentum == 0.0
    assert last.algorithmic_momentum == pytest.approx(0.9)


def test_worker_loop_with_torch_sgd_needs_a_clock_and_uses_it():
    data = _dataset(rows=32)
    model = make_cnn(seed=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    with pytest.raises(ValueError, match="shared tracker"):
        worker_loop(0, model, opt, classification_loss, data, steps=3, num_threads=None)
    tracker = AsynchronyTracker()
    tracker.clock.load_state_dict({"format": 1, "value": 7})
    last = worker_loop(
        1,
        model,
        opt,
        classification_loss,
        data,
        steps=12,
        batch_size=4,
        tracker=tracker,
        num_threads=None,
    )
    assert tracker.clock.value == 19
    assert last.updates == 12
    assert last.update == 19
    assert last.max_staleness == 0
    assert last.algorithmic_momentum == 0.5
    with pytest.raises(ValueError, match="own tracker"):
        worker_loop(
            0,
            model,
            AsyncMomentumSGD(model.parameters()),
            classification_loss,
            data,
            steps=1,
            tracker=tracker,
            num_threads=None,
        )


def test_worker_loop_counts_only_applied_updates_when_steps_are_skipped():
    data = _dataset(rows=32)
    model = make_cnn(seed=8)
    opt = AsyncMomentumSGD(model.parameters(), lr=0.05, nonfinite="skip")
    calls = itertools.count()

    def nan_every_third_step(model, batch):  # in-process: need not be picklable
        loss = classification_loss(model, batch)
        return loss * float("nan") if next(calls) % 3 == 2 else loss

    last = worker_loop(
        0, model, opt, nan_every_third_step, data, steps=12, batch_size=4, num_threads=None
    )
    assert opt.skipped_steps == 4
    assert last.step == 12
    assert last.updates == 8
    assert opt.tracker.clock.value == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_worker_loop_reports_a_failure_then_raises_it():
    data = _dataset(rows=32)
    model = make_cnn(seed=7)
    opt = AsyncMomentumSGD(model.parameters(), lr=0.05)
    messages: list = []
    with pytest.raises(TypeError, match="scalar tensor"):
        worker_loop(
            3, model, opt, vector_loss, data, steps=5, report=messages.append, num_threads=None
        )
    (failure,) = messages
    assert isinstance(failure, WorkerFailure)
    assert failure.rank == 3
    assert failure.updates == 0
    assert failure.error.startswith("TypeError: loss_fn must return a scalar tensor")
    assert failure.traceback.startswith("Traceback")
    assert failure.traceback.rstrip().endswith(failure.error)
    assert opt.tracker.clock.value == 0  # nothing was applied


def test_worker_rank_is_none_outside_a_worker():
    assert worker_rank() is None
