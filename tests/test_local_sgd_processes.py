"""Asynchronous local SGD for real: the worker's rounds in-process, and jobs of processes.

A pseudo-gradient push is a gradient push to the parameter server, whose optimizer is the outer
optimizer; these tests check the rounds (H inner steps, one push tagged with the version read),
the refusals, and real jobs on 127.0.0.1 under ``launch_local`` (which starts every process
through ``run_from_env``, as ``torchrun`` would).
"""

from __future__ import annotations

import functools
import importlib
import itertools
import json
import math
import multiprocessing
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from statistics import mean

import pytest
import torch
from torch import nn

from asyncmomentum import AsyncMomentumSGD, NonFiniteGradientError
from asyncmomentum.runtimes.local_sgd import run_local_sgd_rounds
from asyncmomentum.runtimes.server import (
    ParameterServer,
    ParameterServerJob,
    ServerConfig,
    launch_local,
    run_worker,
)
from asyncmomentum.runtimes.transport import LocalTransport, flatten

# -- helpers (top-level: spawned processes unpickle them by name) -------------------------------


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def teacher_batches(
    worker_index: int, num_workers: int, *, kill: tuple[int, int] | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches labelled by a fixed random teacher; ``kill=(rank, step)`` dies there."""
    rank = worker_index + 1
    teacher = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    stream = torch.Generator().manual_seed(rank)
    for step in itertools.count():
        if kill is not None and kill == (rank, step):
            os.kill(os.getpid(), signal.SIGKILL)
        x = torch.randn(32, 8, generator=stream)
        yield x, (x @ teacher).argmax(dim=1)


def adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2)


def outer_nesterov(params) -> torch.optim.Optimizer:
    return AsyncMomentumSGD(params, lr=0.7, momentum=0.9, nesterov=True, horizon=20, warmup=4)


def outer_over_a_stranger(params) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)


def heldout_loss(model: nn.Module) -> float:
    (x, y) = next(teacher_batches(99, 1))
    return float(nn.functional.cross_entropy(model(x), y))


def local_sgd_job(**kwargs) -> ParameterServerJob:
    fields = {
        "model_fn": make_mlp,
        "optimizer_fn": outer_nesterov,
        "batches_fn": teacher_batches,
        "sync_every": 5,
        "inner_optimizer_fn": adamw,
    }
    return ParameterServerJob(**{**fields, **kwargs})


# -- bad input: clear errors before anything runs -------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sync_every": 0}, "sync_every must be >= 1"),
        ({"sync_every": 2.5}, "sync_every must be an integer"),
        ({"inner_optimizer_fn": None}, "needs inner_optimizer_fn"),
        ({"sync_every": None}, "give sync_every"),
    ],
)
def test_a_half_or_bad_local_sgd_job_is_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        local_sgd_job(**kwargs)
    model = make_mlp()
    with pytest.raises(ValueError, match=message):
        run_worker(
            model,
            [],
            rank=1,
            world_size=2,
            sync_every=kwargs.get("sync_every", 5),
            inner_optimizer_fn=kwargs.get("inner_optimizer_fn", adamw),
        )


def _server(workers: int = 1, **config) -> tuple[ParameterServer, nn.Module]:
    model = make_mlp()
    config = {"total_updates": 1000, **config}
    return ParameterServer(
        model, outer_nesterov(model.parameters()), workers, ServerConfig(**config)
    ), model


def test_rounds_push_one_pseudo_gradient_per_h_inner_steps_tagged_with_the_version_read() -> None:
    server, served = _server(total_updates=4)
    transport = LocalTransport(server)
    start = flatten(list(served.parameters()))
    pushes: list[tuple[torch.Tensor, int]] = []

    class Recording(LocalTransport):
        def push(self, rank, grad, version, loss, present=None):
            pushes.append((grad.clone(), version))
            return super().push(rank, grad, version, loss, present)

    worker = make_mlp(seed=3)  # overwritten by the server's parameters
    inner = adamw(worker.parameters())
    rounds = run_local_sgd_rounds(
        worker,
        teacher_batches(0, 1),
        nn.functional.cross_entropy,
        inner,
        Recording(server),
        1,
        transport.join(1),
        sync_every=5,
    )
    assert (rounds.pushes, rounds.inner_steps, rounds.stop_reason) == (4, 20, "server")
    assert [version for _, version in pushes] == [0, 1, 2, 3]
    # The first pseudo-gradient is exactly what 5 AdamW steps from the server's start moved.
    replay = make_mlp(seed=3)
    torch.nn.utils.vector_to_parameters(start.clone(), replay.parameters())
    replay_inner = adamw(replay.parameters())
    batches = teacher_batches(0, 1)
    for _ in range(5):
        x, y = next(batches)
        replay_inner.zero_grad()
        nn.functional.cross_entropy(replay(x), y).backward()
        replay_inner.step()
    torch.testing.assert_close(pushes[0][0], start - flatten(list(replay.parameters())))
    # The inner optimizer's state carried over the rounds (one AdamW step count).
    assert int(inner.state[next(worker.parameters())]["step"]) == 20
    assert server.version == 4


def test_a_pseudo_gradient_of_the_wrong_size_or_with_nan_is_refused_and_changes_nothing() -> None:
    server, served = _server()
    transport = LocalTransport(server)
    reply = transport.join(1)
    before = flatten(list(served.parameters()))
    state_before = server.snapshot()["optimizer"]
    with pytest.raises(ValueError, match="elements"):
        transport.push(1, torch.zeros(reply.params.numel() + 1), reply.version, 0.0)
    nan = torch.zeros_like(reply.params)
    nan[3] = math.nan
    with pytest.raises(NonFiniteGradientError, match="NaN or inf"):
        transport.push(1, nan, reply.version, 0.0)
    assert server.version == 0
    torch.testing.assert_close(flatten(list(served.parameters())), before, rtol=0, atol=0)
    assert server.snapshot()["optimizer"]["state"] == state_before["state"]
    # A worker whose inner steps diverge says so and pushes nothing.
    worker = make_mlp()
    with pytest.raises(ValueError, match="diverged"):
        run_local_sgd_rounds(
            worker,
            teacher_batches(0, 1),
            lambda out, _: out.sum() * math.nan,
            torch.optim.SGD(worker.parameters(), lr=0.1),
            transport,
            1,
            reply,
            sync_every=3,
        )
    assert server.version == 0


def test_an_inner_optimizer_over_other_parameters_is_refused() -> None:
    server, _ = _server()
    transport = LocalTransport(server)
    with pytest.raises(ValueError, match="inner optimizer holds a parameter"):
        run_local_sgd_rounds(
            make_mlp(),
            teacher_batches(0, 1),
            nn.functional.cross_entropy,
            adamw(make_mlp().parameters()),
            transport,
            1,
            transport.join(1),
            sync_every=3,
        )


def test_an_outer_optimizer_over_other_parameters_fails_the_job_before_it_trains() -> None:
    job = local_sgd_job(optimizer_fn=outer_over_a_stranger)
    with pytest.raises(RuntimeError, match=r"outer optimizer .* not the 4 global parameters"):
        launch_local(job, workers=1, config=ServerConfig(total_updates=10), timeout=120.0)
    assert multiprocessing.active_children() == []


# -- real jobs: 1 server + N spawned local-SGD workers over RPC on 127.0.0.1 --------------------


@pytest.mark.timeout(120)
def test_three_local_sgd_workers_train_and_the_outer_momentum_follows_their_staleness() -> None:
    job = local_sgd_job()
    config = ServerConfig(total_updates=90, horizon=20, warmup=4)
    job_result = launch_local(job, workers=3, config=config, timeout=100.0)
    result = job_result.server
    assert (result.updates, result.stop_reason) == (90, "total_updates")
    for rank, outcome in job_result.workers.items():
        assert outcome.exitcode == 0, outcome.error
        assert outcome.result is not None
        assert outcome.result.steps == result.updates_per_worker[rank]
        # H inner steps per push (a last round cut short by the stop included).
        assert 5 * outcome.result.steps <= outcome.result.inner_steps
        assert outcome.result.inner_steps <= 5 * (outcome.result.steps + outcome.result.refused)
    # The staleness is counted in outer updates; 3 workers: M_hat near 3, applied momentum
    # 0.9 - (1 - 1/3) instead of 0.9.
    assert abs(mean(p.estimated_workers for p in result.trace[30:]) - 3.0) <= 0.35 * 3.0
    assert result.algorithmic_momentum < 0.5
    losses = [p.loss for p in result.trace]
    assert all(math.isfinite(x) for x in losses)
    assert mean(losses[-15:]) < mean(losses[:15])
    assert multiprocessing.active_children() == []


@pytest.mark.timeout(120)
def test_a_killed_local_sgd_worker_is_dropped_and_the_others_finish() -> None:
    # Worker 3 dies when it asks for its 31st batch (after 6 pushes of 5 inner steps).
    job = local_sgd_job(batches_fn=functools.partial(teacher_batches, kill=(3, 30)))
    config = ServerConfig(total_updates=120, worker_timeout=3.0, horizon=20, warmup=4)
    job_result = launch_local(job, workers=3, config=config, timeout=100.0)
    result = job_result.server
    assert job_result.workers[3].exitcode == -signal.SIGKILL
    assert result.dropped_workers == (3,)
    assert result.updates_per_worker[3] == 6
    assert (result.updates, result.stop_reason) == (120, "total_updates")
    for rank in (1, 2):
        assert job_result.workers[rank].exitcode == 0, job_result.workers[rank].error
    assert {p.worker for p in result.trace[-20:]} == {1, 2}
    assert multiprocessing.active_children() == []


# -- the benchmark's real-process part, in its quick form ---------------------------------------


@pytest.mark.slow  # 2 jobs of 3 fresh processes: ~25 s on 2 idle cores, 64 s at load 14
@pytest.mark.timeout(150)
def test_the_benchmarks_real_part_runs_both_kinds_of_job(tmp_path, monkeypatch, capsys) -> None:
    # Imported by name from benchmarks/: the spawned processes unpickle its functions so.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("local_sgd")
    assert bench.main(["--quick", "--part", "real", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Real processes, M=2, hetero speeds (slowdowns [2.0, 1.0], by sleeping)" in out
    assert "load average after" in out
    runs = json.loads((tmp_path / "local_sgd_real.json").read_text())
    assert {r["job"]["method"] for r in runs} == {"tuned-add", "sync"}
    for run in runs:
        # Snapshots were evaluated: held-out losses against outer updates and wall time.
        assert run["updates"][0] == 0
        assert run["updates"][-1] > 0
        assert len(run["losses"]) == len(run["times"]) == len(run["updates"]) >= 2
        assert all(math.isfinite(x) for x in run["losses"])
    tuned = next(r for r in runs if r["job"]["method"] == "tuned-add")
    assert tuned["mean_staleness"] > 0.5  # two asynchronous workers: about 1
    assert not list(tmp_path.glob("real-*/*.pt"))  # the snapshots were cleaned up
