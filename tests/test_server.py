"""The parameter server: its rules in-process, and real jobs of processes on loopback."""

from __future__ import annotations

import functools
import itertools
import math
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import mean

import pytest
import torch
from conftest import make_cnn

from asyncmomentum.core.optimizer import AsyncMomentumSGD, NonFiniteGradientError
from asyncmomentum.core.tuning import rules
from asyncmomentum.runtimes.server import (
    ParameterServer,
    ParameterServerJob,
    ServerConfig,
    launch_local,
    load_checkpoint,
    request_checkpoint,
    run_from_env,
    run_server,
    run_worker,
)
from asyncmomentum.runtimes.transport import flatten

# -- helpers (top-level: spawned processes unpickle them by name) -------------------------------


def teacher_batches(
    worker_index: int,
    num_workers: int,
    *,
    seed: int = 0,
    kill: tuple[int, int] | None = None,
    hang: tuple[int, int] | None = None,
    checkpoint: tuple[int, int, str] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches whose labels a fixed random teacher assigns, so the loss can fall.

    Args:
        worker_index: 0-based worker index (rank - 1).
        num_workers: number of workers (unused: every worker draws its own stream).
        seed: seed of teacher and stream.
        kill: ``(rank, step)``: that worker SIGKILLs itself when asked for batch ``step``.
        hang: ``(rank, step)``: that worker blocks forever when asked for batch ``step``.
        checkpoint: ``(rank, step, path)``: that worker asks the server for a checkpoint then.
    """
    rank = worker_index + 1
    teacher = torch.randn(64, 10, generator=torch.Generator().manual_seed(seed))
    stream = torch.Generator().manual_seed(seed + rank)
    for step in itertools.count():
        if kill is not None and kill == (rank, step):
            os.kill(os.getpid(), signal.SIGKILL)
        if hang is not None and hang == (rank, step):
            threading.Event().wait()
        if checkpoint is not None and checkpoint[:2] == (rank, step):
            request_checkpoint(checkpoint[2], timeout=30.0)
        x = torch.randn(16, 1, 8, 8, generator=stream)
        yield x, (x.flatten(1) @ teacher).argmax(dim=1)


def exit_at(update: int, code: int, point) -> None:
    """An ``on_progress`` that ends the server's process at once, at update ``update``."""
    if point.update >= update:
        os._exit(code)


def gradient_list(model: torch.nn.Module, seed: int = 0) -> list[torch.Tensor]:
    x, y = next(teacher_batches(0, 1, seed=seed))
    return list(
        torch.autograd.grad(
            torch.nn.functional.cross_entropy(model(x), y), list(model.parameters())
        )
    )


def gradients(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """The flat gradient a worker pushes."""
    return flatten(gradient_list(model, seed))


def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def assert_all_ended(pids: tuple[int, ...]) -> None:
    assert multiprocessing.active_children() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def assert_port_free(port: int) -> None:
    """Nothing listens on ``port`` any more (closed connections may linger in TIME_WAIT)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def async_sgd(**kwargs) -> functools.partial:
    return functools.partial(AsyncMomentumSGD, lr=0.05, momentum=0.9, **kwargs)


# -- the rules, in-process ----------------------------------------------------------------------


def make_server(num_workers: int = 2, **config) -> ParameterServer:
    model = make_cnn(0)
    optimizer = AsyncMomentumSGD(model.parameters(), lr=0.05, momentum=0.9, warmup=0)
    config.setdefault("total_updates", 100)
    return ParameterServer(model, optimizer, num_workers, ServerConfig(**config))


def test_a_workers_batch_size_reaches_the_servers_rule_and_a_bad_one_changes_nothing() -> None:
    from asyncmomentum.runtimes.server.processes import _Pusher, _train_loop
    from asyncmomentum.runtimes.transport import LocalTransport

    model = make_cnn(0)
    optimizer = AsyncMomentumSGD(model.parameters(), lr=0.05, momentum=0.9, rule="auto")
    server = ParameterServer(model, optimizer, 1, ServerConfig(total_updates=100))
    reply = server.join(1)
    sizes = []
    observe = optimizer.rule.observe_batch_size
    optimizer.rule.observe_batch_size = lambda size: (sizes.append(size), observe(size))[1]
    # The worker's loop passes each batch's size with its push: 10 rows, then 10, then 4.
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 8, 8, generator=gen), torch.randint(0, 10, (24,), generator=gen)
    batches = iter([(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])])
    worker = make_cnn(1)
    pusher = _Pusher(worker, LocalTransport(server), rank=1)
    steps, refused, why = _train_loop(
        worker, batches, torch.nn.functional.cross_entropy, pusher, reply, None
    )
    assert (steps, refused, why) == (3, 0, "batches_exhausted")
    assert sizes == [10, 10, 4]
    # A bad batch size is refused before anything changes.
    before = flatten(list(model.parameters()))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            server.push(1, gradients(model), server.version, loss=1.0, batch_size=bad)
    assert server.version == 3
    assert torch.equal(flatten(list(model.parameters())), before)


def test_staleness_is_the_number_of_updates_between_read_and_apply() -> None:
    server = make_server()
    first, second = server.join(1), server.join(2)
    assert first.version == second.version == 0
    grads = gradients(server.model)
    reply = server.push(1, grads, first.version, loss=2.0)  # nothing happened since: tau 0
    assert reply.applied
    assert reply.version == 1
    assert not reply.stop
    server.push(2, grads, second.version)  # worker 1 updated since worker 2 read: tau 1
    server.push(1, grads, reply.version)  # worker 2 updated since: tau 1
    result = server.result()
    assert [p.staleness for p in result.trace] == [0, 1, 1]
    assert [p.worker for p in result.trace] == [1, 2, 1]
    assert result.updates == server.version == server.optimizer.tracker.clock.value == 3
    assert result.updates_per_worker == {1: 2, 2: 1}
    # The tuner saw exactly these: mean of (0, 1, 1) under the moving average is in (0, 1).
    assert 0.0 < result.mean_staleness < 1.0
    assert result.estimated_workers == pytest.approx(1.0 + result.mean_staleness)


def test_the_workers_losses_reach_a_rule_that_watches_them() -> None:
    model = make_cnn(0)
    optimizer = AsyncMomentumSGD(model.parameters(), lr=0.05, momentum=0.9, rule="auto")
    server = ParameterServer(model, optimizer, 1, ServerConfig(total_updates=100))
    version = server.join(1).version
    for loss in (2.0, 1.5, math.nan):  # a worker that sends no loss sends NaN: not watched
        version = server.push(1, gradients(server.model), version, loss=loss).version
    watch = optimizer.rule.loss_watch
    assert watch.count == 2
    assert watch.average == pytest.approx(0.9 * 2.0 + 0.1 * 1.5)


def test_reply_is_a_copy_of_the_parameters_right_after_the_update() -> None:
    server = make_server()
    joined = server.join(1)
    assert torch.equal(joined.params, flatten(list(server.model.parameters())))
    reply = server.push(1, gradients(server.model), joined.version)
    assert reply.params.dim() == 1
    assert torch.equal(reply.params, flatten(list(server.model.parameters())))
    assert not torch.equal(reply.params, joined.params)  # the update moved them
    reply.params.add_(1.0)  # the worker owns its copy
    assert not torch.equal(reply.params, flatten(list(server.model.parameters())))


def test_the_parameters_live_in_one_buffer_and_stay_the_models() -> None:
    model = make_cnn(0)
    before = list(model.parameters())
    values = snapshot(model)
    optimizer = AsyncMomentumSGD(model.parameters(), lr=0.05, momentum=0.9, warmup=0)
    server = ParameterServer(model, optimizer, 1, ServerConfig(total_updates=10))
    after = list(model.parameters())
    assert all(a is b for a, b in zip(before, after, strict=True))  # the same Parameter objects
    assert same(snapshot(model), values)
    storages = {p.untyped_storage().data_ptr() for p in after}
    assert len(storages) == 1
    server.push(1, gradients(model), server.join(1).version)
    assert not same(snapshot(model), values)  # the optimizer stepped the model's parameters


def test_a_model_of_mixed_dtypes_is_refused_clearly() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).double())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    values = snapshot(model)
    with pytest.raises(ValueError, match="one flat buffer, so they must share one dtype"):
        ParameterServer(model, optimizer, 1)
    assert same(snapshot(model), values)


def test_the_time_figures_start_after_the_warm_up_and_add_up() -> None:
    server = make_server(measure_after=2)
    server.start()
    version = server.join(1).version
    for _ in range(5):
        version = server.push(1, gradients(server.model), version).version
    result = server.result()
    assert (result.updates, result.measured_updates) == (5, 3)
    assert 0.0 < result.measured_seconds < result.wall_time
    assert 0.0 < result.optimizer_seconds < result.update_seconds <= result.measured_seconds
    assert 0.0 < result.copy_seconds < result.update_seconds
    assert result.cpu_seconds > 0.0
    assert result.cpu_seconds_per_update == pytest.approx(result.cpu_seconds / 3)
    shares = result.wall_shares()
    assert set(shares) == {"step", "copy_out", "other_locked", "outside_lock"}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["step"] == pytest.approx(result.optimizer_seconds / result.measured_seconds)
    # optimizer_share is of the locked section only: larger than the step's share of wall time.
    assert result.optimizer_share > shares["step"]
    untimed = make_server().result()
    assert (untimed.measured_updates, untimed.wall_shares()["step"]) == (0, 0.0)


def test_a_parameter_not_present_gets_no_gradient() -> None:
    server = make_server()
    params = list(server.model.parameters())
    values = snapshot(server.model)
    grad = gradients(server.model)
    grad[: params[0].numel()] = math.nan  # the absent parameter's slice is ignored
    reply = server.push(1, grad, server.join(1).version, present=tuple(range(1, len(params))))
    assert reply.applied
    after = snapshot(server.model)
    assert torch.equal(after[0], values[0])
    assert not torch.equal(after[1], values[1])
    assert 0 not in {i for i, p in enumerate(params) if p in server.optimizer.state}


def test_bad_pushes_raise_and_change_nothing() -> None:
    server = make_server()
    server.push(1, gradients(server.model), server.join(1).version)  # momentum buffers exist now
    params = snapshot(server.model)
    buffers = [s["momentum_buffer"].clone() for s in server.optimizer.state.values()]
    grads = gradients(server.model)
    every = tuple(range(len(params)))
    bad_pushes = {  # what: (push arguments, the error's message)
        "too few elements": ((1, grads[:-1], 0), "elements but the"),
        "not flat": ((1, grads.reshape(2, -1), 0), "must be one 1-D tensor"),
        "a wrong dtype": ((1, grads.double(), 0), "is torch.float64"),
        "a list": ((1, list(grads.split(10)), 0), "one flat gradient tensor"),
        "a version from the future": ((1, grads, 5), "pushed a gradient of version 5"),
        "a negative version": ((1, grads, -1), "version must be an integer"),
        "an unknown rank": ((3, grads, 0), "worker rank must be an integer"),
        "rank 0, the server": ((0, grads, 0), "worker rank must be an integer"),
        "present out of range": ((1, grads, 0, 1.0, (0, len(params))), "index in present"),
        "present unordered": ((1, grads, 0, 1.0, (1, 0)), "increasing order"),
        "present repeated": ((1, grads, 0, 1.0, (*every, every[-1])), "increasing order"),
        "present not a tuple": ((1, grads, 0, 1.0, 3), "tuple of parameter indices"),
    }
    for what, (args, match) in bad_pushes.items():
        with pytest.raises(ValueError, match=match):
            server.push(*args)
        assert same(snapshot(server.model), params), what
    assert server.version == 1
    after = [s["momentum_buffer"] for s in server.optimizer.state.values()]
    assert same(after, buffers)
    assert all(p.grad is None for p in server.model.parameters())


def test_a_nonfinite_gradient_is_refused_for_plain_sgd() -> None:
    model = make_cnn(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    server = ParameterServer(model, optimizer, 1, ServerConfig(total_updates=10))
    params = snapshot(model)
    grads = gradients(model)
    grads[0] = math.nan
    with pytest.raises(NonFiniteGradientError):
        server.push(1, grads, server.join(1).version)
    assert same(snapshot(model), params)
    assert server.version == 0
    assert all(p.grad is None for p in model.parameters())


def test_the_end_refuses_late_gradients_and_keeps_what_was_applied() -> None:
    server = make_server(total_updates=2)
    grads = gradients(server.model)
    first = server.push(1, grads, server.join(1).version)
    assert first.applied
    assert not first.stop
    last = server.push(2, grads, server.join(2).version)
    assert last.applied
    assert last.stop
    assert last.params.numel() == 0
    params = snapshot(server.model)
    late = server.push(1, grads, first.version)
    assert not late.applied
    assert late.stop
    assert same(snapshot(server.model), params)
    result = server.result()
    assert (result.updates, result.refused, result.stop_reason) == (2, 1, "total_updates")


def test_a_silent_worker_is_dropped_and_the_server_stops_without_workers() -> None:
    server = make_server(worker_timeout=0.3)
    server.start()
    server.push(1, gradients(server.model), server.join(1).version)
    server.leave(1)
    assert server.serve() == "no_workers"  # returns once worker 2 has been silent 0.3 s
    result = server.result()
    assert result.dropped_workers == (2,)
    assert result.left_workers == (1,)
    refused = server.push(2, gradients(server.model), 0)
    assert refused.stop
    assert not refused.applied
    assert server.version == 1


def test_max_seconds_stops_the_server() -> None:
    server = make_server(total_updates=None, max_seconds=0.3, worker_timeout=30.0)
    assert server.serve() == "max_seconds"
    assert server.result().wall_time >= 0.3
    assert server.join(1).stop


def test_checkpoint_loads_into_a_fresh_model_and_optimizer(tmp_path) -> None:
    server = make_server()
    server.join(1)
    for _ in range(5):  # each gradient one update late (but the first), so M_hat > 1
        server.push(1, gradients(server.model), max(server.version - 1, 0))
    path = server.checkpoint(tmp_path / "ps.pt")
    model = make_cnn(1)
    optimizer = AsyncMomentumSGD(model.parameters(), lr=0.05, momentum=0.9, warmup=0)
    info = load_checkpoint(path, model, optimizer)
    assert info.updates == 5
    assert info.optimizer_class == "AsyncMomentumSGD"
    assert same(snapshot(model), snapshot(server.model))
    assert optimizer.tracker.clock.value == 5
    assert optimizer.estimated_workers == server.optimizer.estimated_workers > 1.0
    assert optimizer.algorithmic_momentum == server.optimizer.algorithmic_momentum


def test_hogwild_and_the_server_trace_the_same_points() -> None:
    from asyncmomentum.runtimes import hogwild, server

    assert hogwild.TracePoint is server.TracePoint
    server_ = make_server()
    server_.push(2, gradients(server_.model), server_.join(2).version, loss=0.5)
    point = server_.result().trace[-1]
    assert (point.update, point.worker, point.loss, point.staleness) == (1, 2, 0.5, 0)
    assert point[:5] == (1, 0.5, 0, point.algorithmic_momentum, point.implicit_momentum)
    assert point.time >= 0.0
    assert point.estimated_workers >= 1.0


def test_snapshot_is_the_checkpoint_in_memory_and_a_copy(tmp_path) -> None:
    server = make_server()
    version = server.join(1).version
    for _ in range(3):
        version = server.push(1, gradients(server.model), version).version
    state = server.snapshot()
    written = torch.load(server.checkpoint(tmp_path / "ps.pt"), weights_only=True)
    assert state.keys() == written.keys()
    assert (state["format"], state["updates"], state["optimizer_class"]) == (
        written["format"],
        3,
        "AsyncMomentumSGD",
    )
    assert same(list(state["model"].values()), list(written["model"].values()))
    assert str(state["optimizer"]) == str(written["optimizer"])
    before = [t.clone() for t in state["model"].values()]
    server.push(1, gradients(server.model), version)  # later updates leave the snapshot alone
    assert same(list(state["model"].values()), before)


def test_a_mismatched_checkpoint_raises_and_changes_nothing(tmp_path) -> None:
    server = make_server()
    server.push(1, gradients(server.model), server.join(1).version)
    path = server.checkpoint(tmp_path / "ps.pt")
    model = make_cnn(1)
    params = snapshot(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="AsyncMomentumSGD"):
        load_checkpoint(path, model, sgd)
    wider = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(path, wider)
    torch.save({"not": "a checkpoint"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a parameter-server checkpoint"):
        load_checkpoint(tmp_path / "other.pt", model)
    assert same(snapshot(model), params)
    assert sgd.state_dict()["state"] == {}


def test_bad_arguments_raise(monkeypatch) -> None:
    for kwargs, match in (
        ({"total_updates": 0}, "total_updates must be"),
        ({"total_updates": 2.5}, "total_updates must be"),
        ({"total_updates": None, "max_seconds": None}, "give total_updates or max_seconds"),
        ({"max_seconds": -1.0}, "max_seconds must be"),
        ({"worker_timeout": 0}, "worker_timeout must be"),
        ({"rpc_timeout": math.inf}, "rpc_timeout must be"),
        ({"checkpoint_every": 10}, "needs a checkpoint_path"),  # without checkpoint_path
        ({"trace_every": 0}, "trace_every must be"),
        ({"progress_every": 0}, "progress_every must be"),
        ({"on_progress": "print"}, "on_progress must be"),
        ({"horizon": 0}, "horizon must be"),
    ):
        with pytest.raises(ValueError, match=match):
            ServerConfig(**kwargs)
    model = make_cnn(0)
    foreign = torch.optim.SGD(make_cnn(1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not one of the model's"):
        ParameterServer(model, foreign, 2)
    with pytest.raises(ValueError, match="num_workers"):
        ParameterServer(model, torch.optim.SGD(model.parameters(), lr=0.1), 0)
    with pytest.raises(ValueError, match="callable"):
        ParameterServerJob(model_fn=3, optimizer_fn=async_sgd(), batches_fn=teacher_batches)
    job = ParameterServerJob(make_cnn, async_sgd(), teacher_batches)
    with pytest.raises(ValueError, match="workers"):
        launch_local(job, workers=0)
    with pytest.raises(ValueError, match="ParameterServerJob"):
        launch_local("job", workers=2)
    with pytest.raises(ValueError, match="world_size"):
        run_server(model, torch.optim.SGD(model.parameters(), lr=0.1), world_size=1)
    with pytest.raises(ValueError, match="rank"):
        run_worker(model, [], rank=0, world_size=3)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        run_from_env(job)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(RuntimeError, match="RANK=3"):
        run_from_env(job)


# -- real jobs: 1 server + N spawned worker processes over RPC on 127.0.0.1 ---------------------


def test_three_workers_then_one_killed_server_goes_on_and_momentum_follows(tmp_path) -> None:
    # Worker 3 dies after 100 gradients, early enough that even a worker 3 several times slower
    # than the others dies well before the end: the estimate needs updates to settle after it.
    kill_rank, kill_step, total = 3, 100, 900
    job = ParameterServerJob(
        model_fn=make_cnn,
        optimizer_fn=async_sgd(horizon=30, warmup=10),
        batches_fn=functools.partial(
            teacher_batches,
            kill=(kill_rank, kill_step),
            checkpoint=(1, 30, str(tmp_path / "requested.pt")),
        ),
    )
    config = ServerConfig(
        total_updates=total, worker_timeout=4.0, checkpoint_path=str(tmp_path / "final.pt")
    )
    job_result = launch_local(job, workers=3, config=config, timeout=120.0)
    assert_all_ended(job_result.pids)
    assert_port_free(job_result.port)
    result = job_result.server
    # The killed worker died by SIGKILL after exactly kill_step pushes; the others finished.
    assert job_result.workers[kill_rank].exitcode == -signal.SIGKILL
    assert result.dropped_workers == (kill_rank,)
    assert result.updates_per_worker[kill_rank] == kill_step
    assert (result.updates, result.stop_reason) == (total, "total_updates")
    for rank in (1, 2):
        outcome = job_result.workers[rank]
        assert outcome.exitcode == 0
        assert outcome.result is not None
        assert outcome.result.steps == result.updates_per_worker[rank]
    assert sum(result.updates_per_worker.values()) == total == len(result.trace)

    # With 3 workers the estimate is near 3; after the kill it falls toward 2. The estimator's
    # horizon is short (30 updates) so that the change shows; read it over a window of updates.
    death = max(i for i, p in enumerate(result.trace) if p.worker == kill_rank)
    before, after = result.trace[death - 100 : death + 1], result.trace[-60:]
    assert len(before) == 101
    assert len(result.trace) - death > 150  # 5 horizons to settle
    assert {p.worker for p in result.trace[death + 1 :]} == {1, 2}
    assert abs(mean(p.estimated_workers for p in before) - 3.0) <= 0.35 * 3.0
    assert abs(mean(p.estimated_workers for p in after) - 2.0) <= 0.35 * 2.0
    assert result.estimated_workers < 2.5  # the final estimate: nearer 2 than 3
    # The algorithmic momentum followed: less implicit momentum, more algorithmic.
    assert result.algorithmic_momentum > mean(p.algorithmic_momentum for p in before)
    assert result.algorithmic_momentum == pytest.approx(
        rules.algorithmic_momentum(0.9, result.implicit_momentum)
    )

    # Checkpoints: on request mid-run, and at the end; both load into fresh objects.
    model = make_cnn(5)
    optimizer = async_sgd(horizon=30, warmup=10)(model.parameters())
    assert 0 < load_checkpoint(tmp_path / "requested.pt", model, optimizer).updates < total
    assert result.checkpoint_path == str(tmp_path / "final.pt")
    info = load_checkpoint(result.checkpoint_path, model, optimizer)
    assert info.updates == optimizer.tracker.clock.value == total
    assert optimizer.estimated_workers == pytest.approx(result.estimated_workers)
    assert optimizer.algorithmic_momentum == pytest.approx(result.algorithmic_momentum)
    assert not same(snapshot(model), snapshot(make_cnn(0)))  # trained weights


def test_plain_torch_sgd_on_the_server_and_workers_that_stop_by_themselves(tmp_path) -> None:
    job = ParameterServerJob(
        model_fn=make_cnn,
        optimizer_fn=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        batches_fn=teacher_batches,
    )
    config = ServerConfig(
        total_updates=10_000,  # never reached: each worker leaves after 100 steps
        horizon=30,
        warmup=10,
        checkpoint_path=str(tmp_path / "sgd.pt"),
    )
    job_result = launch_local(job, workers=2, config=config, worker_max_steps=100, timeout=120.0)
    assert_all_ended(job_result.pids)
    assert_port_free(job_result.port)
    result = job_result.server
    assert (result.updates, result.stop_reason) == (200, "no_workers")
    assert result.updates_per_worker == {1: 100, 2: 100}
    assert result.left_workers == (1, 2)
    assert result.dropped_workers == ()
    for outcome in job_result.workers.values():
        assert outcome.exitcode == 0
        assert outcome.result.stop_reason == "max_steps"
    # Staleness is measured for torch's SGD too, and M is near 2.
    assert [p.update for p in result.trace] == list(range(1, 201))
    assert all(0 <= p.staleness < p.update for p in result.trace)
    assert max(p.staleness for p in result.trace) >= 1
    # Mid-run, both workers are active (at the end one may briefly train alone).
    assert abs(mean(p.estimated_workers for p in result.trace[50:150]) - 2.0) <= 0.35 * 2.0
    assert result.algorithmic_momentum == 0.9  # torch's SGD keeps its fixed momentum
    # Every update was applied: the losses are finite and the served weights moved. (Whether
    # 200 updates at total momentum 0.95 lower this loss is noise: it stays near ln 10 here, so
    # training itself is asserted where it is measurable, e.g. the Lightning strategy's tests.)
    assert all(math.isfinite(p.loss) for p in result.trace)
    model = make_cnn(5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    assert load_checkpoint(result.checkpoint_path, model, optimizer).updates == 200
    assert len(optimizer.state_dict()["state"]) == len(list(model.parameters()))
    assert not same(snapshot(model), snapshot(make_cnn(0)))


def failing_optimizer(params) -> torch.optim.Optimizer:
    raise ValueError("this optimizer cannot be built")


def test_a_failing_server_raises_with_its_traceback_and_leaves_no_process() -> None:
    job = ParameterServerJob(make_cnn, failing_optimizer, teacher_batches)
    with pytest.raises(RuntimeError, match="this optimizer cannot be built"):
        launch_local(job, workers=1, config=ServerConfig(total_updates=10), timeout=120.0)
    assert multiprocessing.active_children() == []


def test_a_hung_worker_is_killed_soon_after_the_server_ends_and_the_others_reported() -> None:
    # Worker 1 hangs for good after 20 batches: the server drops it for silence and finishes
    # with worker 2; the launcher then gives worker 1 a short grace and kills it. Worker 2,
    # collected after it, is still reported as it ended.
    job = ParameterServerJob(
        make_cnn, async_sgd(), functools.partial(teacher_batches, hang=(1, 20))
    )
    config = ServerConfig(total_updates=150, worker_timeout=2.0)
    began = time.monotonic()
    job_result = launch_local(job, workers=2, config=config, timeout=120.0)
    took = time.monotonic() - began
    assert_all_ended(job_result.pids)
    result = job_result.server
    assert (result.updates, result.stop_reason) == (150, "total_updates")
    assert result.dropped_workers == (1,)
    hung, healthy = job_result.workers[1], job_result.workers[2]
    assert healthy.exitcode == 0
    assert healthy.error is None
    assert healthy.result is not None
    assert healthy.result.steps == result.updates_per_worker[2]
    assert hung.exitcode in (-signal.SIGTERM, -signal.SIGKILL)
    assert hung.result is None
    assert "killed by the launcher" in hung.error
    # Far below the 120 s timeout: start-up, serving, departures (at most worker_timeout)
    # and the launcher's grace (3 s) plus a little.
    assert took < result.wall_time + 30.0
    # Once the server is done, every process is ended within 5 s (grace 3 s, then killed).
    assert job_result.wind_down_s < 5.0


@pytest.mark.parametrize("transport", ["c10d", "rpc"])
def test_a_worker_that_loses_the_server_says_so(transport) -> None:
    job = ParameterServerJob(make_cnn, async_sgd(), teacher_batches)
    config = ServerConfig(
        total_updates=10_000,
        progress_every=1,
        on_progress=functools.partial(exit_at, 10, 3),
        transport=transport,
    )
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="lost the parameter server") as raised:
        launch_local(job, workers=2, config=config, timeout=120.0)
    # Every worker says so: the launcher's error carries each one's.
    assert str(raised.value).count("lost the parameter server") >= 2, str(raised.value)
    assert time.monotonic() - began < 60.0
    assert "exit code 3" in str(raised.value)  # the server's own exit
    assert multiprocessing.active_children() == []


# -- the example, both ways (slow: several process start-ups) -----------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "parameter_server_digits.py"


def run_bounded(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` in its own process group; on timeout kill the whole group."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, output)


def check_example_output(output: str) -> None:
    progress = re.findall(r"update +(\d+) .*M_hat +([\d.]+) \| implicit ([+-][\d.]+)", output)
    assert [int(update) for update, _, _ in progress] == [100, 200, 300], output
    final_m = float(re.search(r"-> M_hat ([\d.]+)", output).group(1))
    assert abs(final_m - 2.0) <= 0.35 * 2.0, output
    assert float(re.search(r"held-out accuracy ([\d.]+)", output).group(1)) > 0.5, output


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["additive", "stability"])
def test_example_runs_as_a_local_job(tmp_path, rule) -> None:
    command = [sys.executable, str(EXAMPLE), "--workers", "2", "--updates", "300", "--rule", rule]
    done = run_bounded([*command, "--checkpoint", str(tmp_path / "ps.pt")], timeout=240.0)
    assert done.returncode == 0, done.stdout
    assert f"({rule} rule)" in done.stdout
    check_example_output(done.stdout)


@pytest.mark.slow
def test_example_runs_under_torchrun(tmp_path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    command = [*torchrun, "3", str(EXAMPLE), "--updates", "300"]
    done = run_bounded([*command, "--checkpoint", str(tmp_path / "ps.pt")], timeout=240.0)
    assert done.returncode == 0, done.stdout
    check_example_output(done.stdout)


def teacher_probe(model: torch.nn.Module) -> functools.partial:
    """The stability rule's probe on the server: the loss of a batch the server holds."""
    x, y = next(teacher_batches(0, 1, seed=99))
    return functools.partial(probe_loss, model, x, y)


def probe_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("rule", ["stability", "closed_loop"])
def test_the_feedback_rules_run_on_the_server(tmp_path, rule) -> None:
    options = {"curvature_every": 20} if rule == "stability" else {"meter_options": {"refresh": 32}}
    job = ParameterServerJob(
        model_fn=make_cnn,
        optimizer_fn=async_sgd(rule=rule, horizon=30, warmup=10, **options),
        batches_fn=teacher_batches,
        probe_fn=teacher_probe if rule == "stability" else None,
    )
    config = ServerConfig(total_updates=300, checkpoint_path=str(tmp_path / "final.pt"))
    job_result = launch_local(job, workers=2, config=config, timeout=120.0)
    assert_all_ended(job_result.pids)
    result = job_result.server
    assert (result.updates, result.stop_reason) == (300, "total_updates")
    model = make_cnn(5)
    optimizer = async_sgd(rule=rule, horizon=30, warmup=10, **options)(model.parameters())
    load_checkpoint(result.checkpoint_path, model, optimizer)
    assert optimizer.algorithmic_momentum == pytest.approx(result.algorithmic_momentum, abs=5e-3)
    if rule == "stability":
        # The server probed its own model: the checkpoint carries the curvature it found.
        assert optimizer.curvature is not None
        assert optimizer.curvature > 0
        assert optimizer.tracker.rule.histogram.count == 300
    else:
        # The meter read the server's trajectory, and the loop acted on its readings.
        (loop,) = optimizer.tracker.rule._loops.values()
        assert loop.controller.updates >= 3
        assert optimizer.measured_total_momentum is not None


def test_a_probe_needs_the_stability_rule() -> None:
    job = ParameterServerJob(
        model_fn=make_cnn, optimizer_fn=async_sgd(), batches_fn=teacher_batches,
        probe_fn=teacher_probe,
    )  # fmt: skip
    with pytest.raises(Exception, match="probe_fn feeds"):
        launch_local(job, workers=1, config=ServerConfig(total_updates=10), timeout=120.0)


def _non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        infos = []
    addresses = {info[4][0] for info in infos}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # UDP: no packet is sent, the route picks an address
            addresses.add(probe.getsockname()[0])
        except OSError:
            pass
    public = sorted(a for a in addresses if not a.startswith("127.") and a != "0.0.0.0")
    return public[0] if public else None


def probe_rendezvous_port(out: str, address: str, point) -> None:
    """Try the server's rendezvous port on loopback and on ``address``, once (its on_progress).

    Runs in the server process and writes to ``out`` what happened, and the addresses every
    listening socket of the server's process is bound to (store and connections).
    """
    from test_transport_c10d import _listening_addresses

    if os.path.exists(out):
        return
    port = int(os.environ["MASTER_PORT"])
    reached = {}
    for name, host in (("loopback", "127.0.0.1"), ("other", address)):
        try:
            socket.create_connection((host, port), timeout=2).close()
            reached[name] = True
        except OSError:
            reached[name] = False
    bound = sorted(_listening_addresses()) if Path("/proc/self/net/tcp").exists() else []
    Path(out).write_text(f"{reached['loopback']} {reached['other']} {','.join(bound)}")


def test_a_local_job_listens_on_loopback_only(tmp_path) -> None:
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to probe from")
    out = str(tmp_path / "reached.txt")
    job = ParameterServerJob(
        model_fn=make_cnn, optimizer_fn=async_sgd(), batches_fn=teacher_batches
    )
    config = ServerConfig(
        total_updates=40,
        progress_every=20,
        on_progress=functools.partial(probe_rendezvous_port, out, address),
    )
    job_result = launch_local(job, workers=1, config=config, timeout=120.0)
    assert_all_ended(job_result.pids)
    # The probe reached the rendezvous store on loopback (so it was listening), not elsewhere,
    # and every listener of the server's process (the store, the connections' gloo device) is
    # bound to loopback.
    loopback, other, bound = Path(out).read_text().split(" ")
    assert (loopback, other) == ("True", "False")
    if Path("/proc/self/net/tcp").exists():
        assert bound, "no listener found: the probe is broken"
        assert set(bound.split(",")) <= {"127.0.0.1", "::ffff:127.0.0.1"}, bound


def test_a_checkpoint_request_outside_a_worker_says_so() -> None:
    with pytest.raises(RuntimeError, match="runs in a worker process of a running job"):
        request_checkpoint()


def test_a_requested_checkpoint_stays_in_the_jobs_folder(tmp_path) -> None:
    job_folder = tmp_path / "job"
    job_folder.mkdir()
    server = make_server(checkpoint_path=str(job_folder / "final.pt"))
    inside = server.requested_checkpoint_path(job_folder / "sub" / ".." / "requested.pt")
    assert inside == str((job_folder / "requested.pt").resolve())
    assert server.requested_checkpoint_path(None) is None
    (tmp_path / "elsewhere").mkdir()
    (job_folder / "escape").symlink_to(tmp_path / "elsewhere")
    for outside in (
        tmp_path / "x.pt",
        job_folder / ".." / "x.pt",
        "/etc/asyncmomentum.pt",
        job_folder / "escape" / "x.pt",
        job_folder,
    ):
        with pytest.raises(ValueError, match="checkpoint folder"):
            server.requested_checkpoint_path(outside)
    no_folder = make_server()
    with pytest.raises(ValueError, match="this job has none"):
        no_folder.requested_checkpoint_path(tmp_path / "x.pt")


def test_a_remote_call_without_the_jobs_secret_is_refused_over_rpc(monkeypatch) -> None:
    import asyncmomentum.runtimes.transport.rpc as transport

    server = make_server(num_workers=1)
    server.start()
    monkeypatch.setenv("ASYNCMOMENTUM_JOB_SECRET", "the-job-secret")
    grad = torch.ones(sum(p.numel() for p in server.model.parameters()))
    before = [p.detach().clone() for p in server.model.parameters()]
    with transport.serving(server):
        for wrong in ("", "another-secret", None, b"the-job-secret"):
            with pytest.raises(PermissionError, match="secret"):
                transport._remote_push(1, grad, 0, 1.0, None, wrong)
            with pytest.raises(PermissionError, match="secret"):
                transport._remote_checkpoint(None, wrong)
        assert server.version == 0
        assert all(
            torch.equal(a, b) for a, b in zip(before, server.model.parameters(), strict=True)
        )
        reply = transport._remote_push(1, grad, 0, 1.0, None, "the-job-secret")
        assert reply.version == server.version == 1


def cnn_that_rank_2_never_builds():
    """A ``model_fn`` on which rank 2 blocks forever: that worker never joins the job."""
    import threading

    if os.environ.get("RANK") == "2":
        threading.Event().wait()
    return make_cnn()


def test_a_worker_that_never_joins_fails_the_job_within_the_join_timeout() -> None:
    job = ParameterServerJob(
        model_fn=cnn_that_rank_2_never_builds, optimizer_fn=async_sgd(), batches_fn=teacher_batches
    )
    config = ServerConfig(total_updates=50, join_timeout=4.0)
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[2\] did not join the job within 4 s"):
        launch_local(job, workers=2, config=config, timeout=60.0)
