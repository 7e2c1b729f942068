"""Asynchronous local SGD in the simulator: tuned outer momentum vs fixed, Delayed Nesterov, DiLoCo.

Part (a), on the transformer LM ``charlm`` (one layer, width 32, the standard library's source;
trained on the first 90 % of the corpus, the held-out loss measured on windows of the last 10 %):
``M`` = 4 and 8 workers, equal and heterogeneous (1:2:4, cycled, normalised to mean 1) speeds,
``H`` inner AdamW steps per round, and these outer optimizers, each at the best outer learning
rate of a small grid (and at the rate best for synchronous DiLoCo):

- ``tuned-add`` / ``tuned-auto``: ``AsyncMomentumSGD(lr, momentum=0.9, nesterov=True)``, rule
  additive / auto, fed the exact staleness of each push (``warmup=4`` outer updates);
- ``fixed-0.9``: the same with ``tune=False`` (DiLoCo's outer recipe, asynchronous);
- ``DN``: Delayed Nesterov (Liu et al. 2024), buffer ``N = M``, ``beta = 0.9``;
- ``DN-tuned``: DN whose milestone momentum is tuned to the milestone-level staleness;
- ``DN-N^``: DN whose buffer length is the estimated ``M`` (from the measured staleness);
- ``sync``: synchronous DiLoCo (average of ``M`` pseudo-gradients, Nesterov 0.9, waits for the
  slowest worker).

Time is simulated (a round takes ``H / speed``), so every method gets the same wall-clock budget
and the same workers; the loss is the median over seeds at the end of the budget (and at half).

Part (b), the seed paper's figure one level up: for ``M`` in 1..32 round-robin workers, the
final held-out loss of fixed outer Nesterov momentum over a grid (negative values included), at
a fixed compute budget (the same number of pushes for every ``M``), beside what the additive
tuner applies; Kendall's tau of the best momentum against ``M``.

Part (c), real processes (:func:`~asyncmomentum.runtimes.server.launch_local`: one server and
``M`` = 4 or 8 worker processes on 127.0.0.1, ``ParameterServerJob(sync_every=H)``): the same
charlm, inner AdamW, ``H = 10``; ``tuned-add``, ``tuned-auto``, ``fixed-0.9`` and ``DN`` as the
server's outer optimizer, and ``sync`` (synchronous DiLoCo: ``M`` processes that all-reduce their
pseudo-gradients over gloo and take the same outer step) at one outer lr, each run for a fixed
wall-clock budget. A slow worker is made by *sleeping*: after each inner step it sleeps
``factor - 1`` times that step's own CPU time (1:2:4 speeds: factors 4, 2, 1, cycled), so it
is slower by ``factor`` and leaves the cores to the others meanwhile. The server saves a snapshot
every few outer updates; the held-out loss of each is measured after the run, against outer
updates and against wall time. Median of 3 seeds at ``M = 4``, 1 at ``M = 8``. The real runs go
first, one at a time (they time wall clock), then the simulator's.

    python benchmarks/local_sgd.py --quick              # under a minute and a half
    python benchmarks/local_sgd.py --out DIR            # everything
    python benchmarks/local_sgd.py --part real --out DIR   # part (c) only (or --part sim)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.applications.deeper_problems import (
    CHARLM_CONTEXT,
    CharLM,
    charlm_loss,
    load_corpus,
)
from asyncmomentum.applications.digits import SmallCNN, iterate_batches, load_digits_split
from asyncmomentum.applications.sweep.analysis import kendall_tau
from asyncmomentum.runtimes.local_sgd import DelayedNesterov, LocalSGDProblem, simulate_local_sgd

# -- problems -------------------------------------------------------------------------------------

HELDOUT_FRACTION = 0.1
LM_BATCH = 16
LM_HELDOUT_SEQUENCES = 256


@lru_cache(maxsize=1)
def _lm_split() -> tuple[Tensor, Tensor]:
    corpus = load_corpus()
    cut = int(corpus.numel() * (1 - HELDOUT_FRACTION))
    return corpus[:cut], corpus[cut:]


def _lm_windows(data: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
    index = starts[:, None] + torch.arange(CHARLM_CONTEXT + 1)[None, :]
    seq = data[index]
    return seq[:, :-1], seq[:, 1:]


def _lm_batches(seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    train, _ = _lm_split()
    gen = torch.Generator().manual_seed(seed)
    high = train.numel() - CHARLM_CONTEXT - 1
    while True:
        yield _lm_windows(train, torch.randint(0, high, (LM_BATCH,), generator=gen))


@lru_cache(maxsize=1)
def _lm_heldout_batch() -> tuple[Tensor, Tensor]:
    _, held = _lm_split()
    high = held.numel() - CHARLM_CONTEXT - 1
    return _lm_windows(held, torch.linspace(0, high, LM_HELDOUT_SEQUENCES).long())


def _lm_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return CharLM()


def _lm_heldout(model: nn.Module) -> float:
    with torch.no_grad():  # an evaluation: no graph to keep
        return float(charlm_loss(model, _lm_heldout_batch()))


def _classification_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _cnn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN()


def _cnn_batches(seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    split = load_digits_split()
    return iterate_batches(split.x_train, split.y_train, batch_size=32, seed=seed)


def _cnn_heldout(model: nn.Module) -> float:
    split = load_digits_split()
    with torch.no_grad():  # an evaluation: no graph to keep
        return float(_classification_loss(model, (split.x_test, split.y_test)))


PROBLEMS: dict[str, LocalSGDProblem] = {
    "charlm": LocalSGDProblem("charlm", _lm_model, charlm_loss, _lm_batches, _lm_heldout),
    "cnn": LocalSGDProblem("cnn", _cnn_model, _classification_loss, _cnn_batches, _cnn_heldout),
}
#: Inner optimizer of each problem (kept across rounds by every worker, as DiLoCo does).
INNER: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
    "charlm": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0),
    "cnn": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
}

# -- methods --------------------------------------------------------------------------------------

TARGET = 0.9
WARMUP = 4
METHODS = ("tuned-add", "tuned-auto", "fixed-0.9", "DN", "DN-tuned", "DN-N^", "sync")


class FixedNesterov(torch.optim.Optimizer):
    """torch's Nesterov SGD (``buf = mu buf + g``, ``w -= lr (g + mu buf)``) for any fixed ``mu``.

    The grid of part (b) goes below zero, which ``nesterov=True`` refuses in torch's SGD and in
    ``AsyncMomentumSGD(tune=False)``; for ``mu > 0`` this is the same update.
    """

    def __init__(self, params: Any, lr: float, momentum: float) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: D102
        for group in self.param_groups:
            mu, lr = group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "buf" not in state:
                    state["buf"] = p.grad.clone()
                else:
                    state["buf"].mul_(mu).add_(p.grad)
                p.add_(p.grad + mu * state["buf"], alpha=-lr)


def make_outer(method: str, lr: float, workers: int) -> Callable[[list[Tensor]], Any]:
    """The outer-optimizer factory of ``method`` at outer learning rate ``lr``."""
    if method == "tuned-add":
        return lambda p: AsyncMomentumSGD(
            p, lr=lr, momentum=TARGET, nesterov=True, rule="additive", warmup=WARMUP
        )
    if method == "tuned-auto":
        return lambda p: AsyncMomentumSGD(
            p, lr=lr, momentum=TARGET, nesterov=True, rule="auto", warmup=WARMUP
        )
    if method in ("fixed-0.9", "sync"):
        return lambda p: AsyncMomentumSGD(p, lr=lr, momentum=TARGET, nesterov=True, tune=False)
    if method.startswith("fixed:"):
        mu = float(method.split(":", 1)[1])
        return lambda p: FixedNesterov(p, lr=lr, momentum=mu)
    if method == "DN":
        return lambda p: DelayedNesterov(p, lr=lr, momentum=TARGET, buffer=workers)
    if method == "DN-tuned":
        return lambda p: DelayedNesterov(p, lr=lr, momentum=TARGET, buffer=workers, tune=True)
    if method == "DN-N^":
        return lambda p: DelayedNesterov(p, lr=lr, momentum=TARGET, buffer="measured")
    raise ValueError(f"unknown method {method!r}")


def speeds_of(kind: str, workers: int) -> list[float]:
    """Equal speeds, or 1:2:4 cycled over the workers and normalised to mean 1."""
    if kind == "equal":
        return [1.0] * workers
    raw = [(1.0, 2.0, 4.0)[i % 3] for i in range(workers)]
    mean = sum(raw) / workers
    return [s / mean for s in raw]


@dataclass(frozen=True)
class Job:
    """One simulated run."""

    part: str
    problem: str
    method: str
    workers: int
    speeds: str
    lr: float
    seed: int
    sync_every: int
    max_time: float | None = None
    max_updates: int | None = None


def run_job(job: Job) -> dict[str, Any]:
    """Run one job in this process (one thread) and return what the tables need."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    h = simulate_local_sgd(
        PROBLEMS[job.problem],
        workers=job.workers,
        outer=make_outer(job.method, job.lr, job.workers),
        inner=INNER[job.problem],
        sync_every=job.sync_every,
        speeds=speeds_of(job.speeds, job.workers),
        synchronous=job.method == "sync",
        max_time=job.max_time,
        max_updates=job.max_updates,
        eval_interval=(job.max_time / 20) if job.max_time else None,
        seed=job.seed,
    )
    stale = h.staleness[job.workers :] or h.staleness
    return {
        "job": job.__dict__,
        "updates": h.updates,
        "times": h.times,
        "losses": h.losses,
        "momentum": h.momentum,
        "mean_staleness": statistics.fmean(stale) if stale else 0.0,
        "pushes": h.pushes_per_worker,
        "diverged": h.diverged,
        "seconds": time.perf_counter() - start,
    }


# -- sizes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """How big a run of the benchmark is."""

    cells: tuple[tuple[int, str], ...]
    seeds: dict[int, int]
    lrs: tuple[float, ...]
    sync_every: int
    budget: float  # simulated time per run in part (a)
    sweep_workers: tuple[int, ...]
    sweep_momenta: tuple[float, ...]
    sweep_pushes: int
    sweep_sync_every: int
    sweep_lr: float
    sweep_seeds: int


QUICK = Size(
    cells=((4, "equal"), (4, "hetero")),
    seeds={4: 1},
    lrs=(0.4,),
    sync_every=10,
    budget=60.0,
    sweep_workers=(1, 4, 16),
    sweep_momenta=(-0.5, 0.0, 0.5),
    sweep_pushes=30,
    sweep_sync_every=5,
    sweep_lr=0.4,
    sweep_seeds=1,
)
DEFAULT = Size(
    cells=((4, "equal"), (4, "hetero"), (8, "equal"), (8, "hetero")),
    seeds={4: 3, 8: 1},
    lrs=(0.2, 0.4),
    sync_every=10,
    budget=150.0,
    sweep_workers=(1, 2, 4, 8, 16, 32),
    sweep_momenta=(-0.5, -0.25, 0.0, 0.25, 0.5, 0.7, 0.8, 0.9),
    sweep_pushes=100,
    sweep_sync_every=5,
    sweep_lr=0.4,
    sweep_seeds=1,
)


def jobs_of(size: Size, problem: str) -> list[Job]:
    """Every run of the benchmark at ``size``."""
    jobs = [
        Job("a", problem, method, m, kind, lr, seed, size.sync_every, max_time=size.budget)
        for m, kind in size.cells
        for method in METHODS
        for lr in size.lrs
        for seed in range(size.seeds[m])
    ]
    for m in size.sweep_workers:
        methods = [f"fixed:{mu}" for mu in size.sweep_momenta] + ["tuned-add"]
        for method in methods:
            for seed in range(size.sweep_seeds):
                jobs.append(
                    Job(
                        "b",
                        problem,
                        method,
                        m,
                        "equal",
                        size.sweep_lr,
                        seed,
                        size.sweep_sync_every,
                        max_updates=size.sweep_pushes,
                    )
                )
    # Longest first, so two processes finish together.
    return sorted(jobs, key=lambda j: -(j.workers * (j.max_time or 0) + (j.max_updates or 0)))


# -- analysis -------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    finite = [v if math.isfinite(v) else math.inf for v in values]
    return statistics.median(finite) if finite else math.nan


def _loss_at(result: dict[str, Any], time_: float) -> float:
    best = math.nan
    for t, loss in zip(result["times"], result["losses"], strict=True):
        if t <= time_ + 1e-9:
            best = loss
    return best


def _loss_at_update(result: dict[str, Any], update: int) -> float:
    best = math.nan
    for u, loss in zip(result["updates"], result["losses"], strict=True):
        if u <= update:
            best = loss
    return best


def _fmt(value: float) -> str:
    return "div" if not math.isfinite(value) else f"{value:.3f}"


def table_a(results: list[dict[str, Any]], size: Size) -> tuple[str, dict[str, Any]]:
    """Part (a): per cell and method, the median held-out loss at the best lr and at sync's."""
    lines, summary = [], {}
    for m, kind in size.cells:
        cell = [r for r in results if r["job"]["workers"] == m and r["job"]["speeds"] == kind]
        by = {}
        for r in cell:
            by.setdefault((r["job"]["method"], r["job"]["lr"]), []).append(r)
        budget = size.budget

        def final(method: str, lr: float, budget: float = budget, by: dict = by) -> float:
            return _median([_loss_at(r, budget) for r in by[(method, lr)]])

        best_lr = {
            meth: min(size.lrs, key=lambda lr, meth=meth: final(meth, lr)) for meth in METHODS
        }
        sync_lr = best_lr["sync"]
        sync_updates = max(
            r["updates"][-1] for r in by[("sync", sync_lr)]
        )  # outer updates sync makes in the budget
        seeds = size.seeds[m]
        lines.append(
            f"\nM={m}, {kind} speeds {[round(s, 2) for s in speeds_of(kind, m)]}, H="
            f"{size.sync_every}, budget {budget:g} time units, median of {seeds} seed(s)"
        )
        lines.append(
            "| method | best lr | loss @T/2 | loss @T | loss @T, lr of sync "
            f"({sync_lr:g}) | loss @{sync_updates} outer upd. | outer upd. | momentum applied |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        summary[f"{m}-{kind}"] = {}
        for meth in METHODS:
            lr = best_lr[meth]
            runs = by[(meth, lr)]
            half = _median([_loss_at(r, budget / 2) for r in runs])
            end = final(meth, lr)
            at_sync = final(meth, sync_lr)
            per_update = _median([_loss_at_update(r, sync_updates) for r in runs])
            updates = statistics.median([r["updates"][-1] for r in runs])
            mom = statistics.median([r["momentum"][-1] for r in runs])
            lines.append(
                f"| {meth} | {lr:g} | {_fmt(half)} | {_fmt(end)} | {_fmt(at_sync)} | "
                f"{_fmt(per_update)} | {updates:g} | {mom:.2f} |"
            )
            summary[f"{m}-{kind}"][meth] = {
                "lr": lr,
                "half": half,
                "end": end,
                "at_sync_lr": at_sync,
                "per_update": per_update,
            }
    return "\n".join(lines), summary


def table_b(results: list[dict[str, Any]], size: Size) -> tuple[str, dict[str, Any]]:
    """Part (b): best fixed outer momentum per M beside the tuner's, and Kendall's tau."""
    lines = [
        f"\nBest fixed outer momentum per M (round robin, H={size.sweep_sync_every}, "
        f"{size.sweep_pushes} pushes, outer lr {size.sweep_lr:g}, mean of {size.sweep_seeds} "
        "seed(s))",
        "| M | "
        + " | ".join(f"mu={mu:g}" for mu in size.sweep_momenta)
        + " | best mu | tuned (applied) | tuned loss | 0.9-(1-1/M) |",
        "|---" * (len(size.sweep_momenta) + 5) + "|",
    ]
    ms, bests, tuned_applied = [], [], []
    for m in size.sweep_workers:
        row = [r for r in results if r["job"]["workers"] == m]

        def loss(method: str, row: list = row) -> float:
            vals = [r["losses"][-1] for r in row if r["job"]["method"] == method]
            vals = [v if math.isfinite(v) else math.inf for v in vals]
            return statistics.fmean(vals) if vals else math.nan

        grid = {mu: loss(f"fixed:{mu}") for mu in size.sweep_momenta}
        best = min(grid, key=grid.get)
        applied = statistics.fmean(
            [r["momentum"][-1] for r in row if r["job"]["method"] == "tuned-add"]
        )
        ms.append(m)
        bests.append(best)
        tuned_applied.append(applied)
        cells = " | ".join(
            ("**" + _fmt(v) + "**") if mu == best else _fmt(v) for mu, v in grid.items()
        )
        lines.append(
            f"| {m} | {cells} | {best:g} | {applied:.2f} | {_fmt(loss('tuned-add'))} | "
            f"{TARGET - (1 - 1 / m):.2f} |"
        )
    tau = kendall_tau([float(m) for m in ms], bests)
    lines.append(f"\nKendall tau (best fixed momentum vs M): {tau:.2f}")
    return "\n".join(lines), {"M": ms, "best": bests, "tuned": tuned_applied, "kendall": tau}


def save_figure(results: list[dict[str, Any]], summary: dict, size: Size, out: Path) -> None:
    """Loss vs simulated time (M=4 cells) and best momentum vs M, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in size.cells if c[0] == size.cells[0][0]]
    fig, axes = plt.subplots(1, len(cells) + 1, figsize=(5 * (len(cells) + 1), 4))
    for ax, (m, kind) in zip(axes, cells, strict=False):
        for meth in METHODS:
            lr = summary["a"][f"{m}-{kind}"][meth]["lr"]
            runs = [
                r
                for r in results
                if r["job"]["part"] == "a"
                and r["job"]["workers"] == m
                and r["job"]["speeds"] == kind
                and r["job"]["method"] == meth
                and r["job"]["lr"] == lr
            ]
            times = runs[0]["times"]
            curve = [_median([_loss_at(r, t) for r in runs]) for t in times]
            ax.plot(times, [min(c, 6.0) for c in curve], label=f"{meth} (lr {lr:g})")
        ax.set_title(f"charlm, M={m}, {kind} speeds")
        ax.set_xlabel("simulated wall time")
        ax.set_ylabel("held-out loss")
        ax.legend(fontsize=7)
    ax = axes[-1]
    b = summary["b"]
    ax.plot(b["M"], b["best"], "o-", label="best fixed outer momentum (grid)")
    ax.plot(b["M"], b["tuned"], "s--", label="tuner applies (additive)")
    ax.plot(b["M"], [TARGET - (1 - 1 / m) for m in b["M"]], ":", label="0.9 - (1 - 1/M)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (asynchronous workers)")
    ax.set_ylabel("outer momentum")
    ax.set_title(f"Kendall tau {b['kendall']:.2f}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "local_sgd.png", dpi=120)


# -- part (c): real processes ---------------------------------------------------------------------

#: Methods of the real runs (the DN variants stay in the simulator).
REAL_METHODS = ("tuned-add", "tuned-auto", "fixed-0.9", "DN", "sync")


@dataclass(frozen=True)
class RealSize:
    """How big the real-process part is."""

    cells: tuple[tuple[int, str], ...]
    seeds: dict[int, int]
    lr: float
    sync_every: int
    seconds: dict[int, float]  # wall-clock budget of one run, by M
    snapshot_every: int  # outer updates between two saved snapshots
    methods: tuple[str, ...] = REAL_METHODS


REAL_QUICK = RealSize(
    cells=((2, "hetero"),),
    seeds={2: 1},
    lr=0.4,
    sync_every=10,
    seconds={2: 3.0},
    snapshot_every=5,
    methods=("tuned-add", "sync"),  # both code paths: the server's and the all-reduce's
)
REAL_DEFAULT = RealSize(
    cells=((4, "equal"), (4, "hetero"), (8, "equal"), (8, "hetero")),
    seeds={4: 3, 8: 1},
    lr=0.4,
    sync_every=10,
    seconds={4: 8.0, 8: 10.0},
    snapshot_every=10,
)


def _slowdowns(kind: str, workers: int) -> list[float]:
    """How many times slower than the fastest each worker is (1:2:4 speeds: 4, 2, 1, ...)."""
    speeds = speeds_of(kind, workers)
    return [max(speeds) / s for s in speeds]


def _slowed(batches: Iterator[Any], factor: float) -> Iterator[Any]:
    """``batches``, each after a sleep of ``factor - 1`` times the CPU time since the last one.

    A slow worker is made by sleeping: each of its steps takes ``factor - 1`` times its own
    compute (the process's CPU time for that step, which leaves out the time spent waiting for
    the server or an all-reduce, and is not inflated by other processes on the cores) on top,
    and it leaves the cores to the others while it sleeps.
    """
    last = time.process_time()
    for batch in batches:
        if factor > 1.0:
            time.sleep((factor - 1.0) * (time.process_time() - last))
        last = time.process_time()
        yield batch


def _real_batches(seed: int, kind: str, workers: int, index: int, _count: int) -> Iterator[Any]:
    return _slowed(_lm_batches(seed * 1000 + index), _slowdowns(kind, workers)[index])


def _real_model(seed: int) -> nn.Module:
    return _lm_model(seed)


def _real_outer(method: str, lr: float, workers: int, params: Any) -> Any:
    return make_outer(method, lr, workers)(list(params))


def _real_inner(params: Any) -> torch.optim.Optimizer:
    return INNER["charlm"](list(params))


def _lm_train_loss(output: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1))


def _keep_snapshot(folder: str, point: Any) -> None:
    """``on_progress``: move the checkpoint the server just wrote aside, named by its time."""
    source = os.path.join(folder, "last.pt")
    with contextlib.suppress(FileNotFoundError):
        os.replace(source, os.path.join(folder, f"snap-{point.update:06d}-{point.time:.3f}.pt"))


def _run_async(job: dict[str, Any], folder: Path) -> dict[str, Any]:
    from asyncmomentum.runtimes.server import ParameterServerJob, ServerConfig, launch_local

    m, kind, seed, size = job["workers"], job["speeds"], job["seed"], job["size"]
    server_job = ParameterServerJob(
        model_fn=functools.partial(_real_model, seed),
        optimizer_fn=functools.partial(_real_outer, job["method"], size.lr, m),
        batches_fn=functools.partial(_real_batches, seed, kind, m),
        loss_fn=_lm_train_loss,
        sync_every=size.sync_every,
        inner_optimizer_fn=_real_inner,
    )
    config = ServerConfig(
        total_updates=None,
        max_seconds=size.seconds[m],
        worker_timeout=60.0,
        checkpoint_path=str(folder / "last.pt"),
        checkpoint_every=size.snapshot_every,
        progress_every=size.snapshot_every,
        on_progress=functools.partial(_keep_snapshot, str(folder)),
    )
    result = launch_local(server_job, workers=m, config=config, timeout=size.seconds[m] + 240)
    server = result.server
    final = folder / "last.pt"
    if final.exists():  # the server's final checkpoint: the last point of the curve
        os.replace(final, folder / f"snap-{server.updates:06d}-{server.wall_time:.3f}.pt")
    failed = [r for r, o in result.workers.items() if o.exitcode != 0]
    if failed:
        raise RuntimeError(f"workers {failed} failed: {result.workers[failed[0]].error}")
    stale = [p.staleness for p in server.trace[m:]] or [0]
    return {
        "mean_staleness": statistics.fmean(stale),
        "momentum": server.algorithmic_momentum,
        "estimated_workers": server.estimated_workers,
        "pushes": server.updates_per_worker,
    }


def _sync_worker(rank: int, job: dict[str, Any], port: int, folder: str) -> None:
    """One process of synchronous DiLoCo; rank 0 keeps snapshots.

    Each round: ``H`` inner steps, an all-reduce of the pseudo-gradients (and of rank 0's "time
    is up"), then the same outer Nesterov step on every process.
    """
    import torch.distributed as dist

    torch.set_num_threads(1)
    m, kind, seed, size = job["workers"], job["speeds"], job["seed"], job["size"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=m)
    try:
        model = _real_model(seed)
        params = list(model.parameters())
        global_params = [p.detach().clone() for p in params]
        outer = make_outer("sync", size.lr, m)(global_params)
        inner = INNER["charlm"](params)
        batches = _real_batches(seed, kind, m, rank, m)
        dist.barrier()
        began = time.monotonic()
        updates = 0
        while True:
            with torch.no_grad():
                for p, g in zip(params, global_params, strict=True):
                    p.copy_(g)
            for _ in range(size.sync_every):
                inputs, targets = next(batches)
                inner.zero_grad(set_to_none=True)
                _lm_train_loss(model(inputs), targets).backward()
                inner.step()
            flat = torch.cat(
                [(g - p.detach()).reshape(-1) for p, g in zip(params, global_params, strict=True)]
            )
            over = time.monotonic() - began >= size.seconds[m] if rank == 0 else False
            message = torch.cat([flat, torch.tensor([1.0 if over else 0.0])])
            dist.all_reduce(message)
            if message[-1] > 0:
                break
            offset = 0
            for g in global_params:
                g.grad = (message[offset : offset + g.numel()] / m).view_as(g)
                offset += g.numel()
            outer.step()
            updates += 1
            if rank == 0 and updates % size.snapshot_every == 0:
                elapsed = time.monotonic() - began
                torch.save(
                    {"flat": torch.cat([g.reshape(-1) for g in global_params]), "updates": updates},
                    os.path.join(folder, f"snap-{updates:06d}-{elapsed:.3f}.pt"),
                )
    finally:
        dist.destroy_process_group()
    # Done, and the snapshots are on disk. Skip the interpreter's teardown: Gloo's threads can
    # outlive destroy_process_group and abort the process there (SIGABRT after the work is
    # done, seen under load), as launch_local's processes skip it too.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_sync(job: dict[str, Any], folder: Path) -> dict[str, Any]:
    import multiprocessing
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_sync_worker, args=(r, job, port, str(folder)), daemon=True)
        for r in range(job["workers"])
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + job["size"].seconds[job["workers"]] + 240
    try:
        for process in processes:
            process.join(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    codes = [p.exitcode for p in processes]
    if any(codes):
        raise RuntimeError(f"a synchronous DiLoCo process failed: exit codes {codes}")
    return {"mean_staleness": 0.0, "momentum": TARGET, "estimated_workers": 1.0, "pushes": {}}


def _evaluate_snapshots(folder: Path, seed: int) -> tuple[list[int], list[float], list[float]]:
    """(outer updates, wall seconds, held-out loss) of every snapshot a run left, in order."""
    model = _real_model(seed)
    params = list(model.parameters())
    rows = []
    for path in sorted(folder.glob("snap-*.pt")):
        _, update, elapsed = path.stem.split("-")
        state = torch.load(path, weights_only=True)
        if "flat" in state:
            torch.nn.utils.vector_to_parameters(state["flat"], params)
        else:
            model.load_state_dict(state["model"])
        with torch.no_grad():
            rows.append((int(update), float(elapsed), _lm_heldout(model)))
        path.unlink()
    rows.sort()
    initial = _lm_heldout(_real_model(seed))
    return (
        [0] + [r[0] for r in rows],
        [0.0] + [r[1] for r in rows],
        [initial] + [r[2] for r in rows],
    )


def run_real(size: RealSize, out: Path) -> list[dict[str, Any]]:
    """Every real run of ``size``, one after the other (they share the cores)."""
    results = []
    for m, kind in size.cells:
        for seed in range(size.seeds[m]):
            for method in size.methods:
                job = {"workers": m, "speeds": kind, "seed": seed, "method": method, "size": size}
                folder = out / f"real-{m}-{kind}-{seed}-{method}"
                folder.mkdir(parents=True, exist_ok=True)
                for old in folder.glob("*.pt"):
                    old.unlink()
                began = time.perf_counter()
                run = _run_sync if method == "sync" else _run_async
                info = run(job, folder)
                seconds = time.perf_counter() - began
                updates, times, losses = _evaluate_snapshots(folder, seed)
                with contextlib.suppress(FileNotFoundError):
                    (folder / "last.pt").unlink()
                job = {k: v for k, v in job.items() if k != "size"} | {"lr": size.lr}
                results.append(
                    {
                        "job": job,
                        "updates": updates,
                        "times": times,
                        "losses": losses,
                        "seconds": seconds,
                        **info,
                    }
                )
                print(
                    f"  real M={m} {kind} seed {seed} {method}: {updates[-1]} outer updates, "
                    f"loss {losses[-1]:.3f}, {seconds:.0f} s",
                    flush=True,
                )
    return results


def table_real(results: list[dict[str, Any]], size: RealSize) -> tuple[str, dict[str, Any]]:
    """Part (c): per cell and method, the median held-out loss at T/2, at T, and per update."""
    lines, summary = [], {}
    for m, kind in size.cells:
        cell = [r for r in results if r["job"]["workers"] == m and r["job"]["speeds"] == kind]
        budget = size.seconds[m]
        sync_updates = int(
            statistics.median(
                [r["updates"][-1] for r in cell if r["job"]["method"] == "sync"] or [0]
            )
        )
        lines.append(
            f"\nReal processes, M={m}, {kind} speeds (slowdowns "
            f"{[round(f, 2) for f in _slowdowns(kind, m)]}, by sleeping), H={size.sync_every}, "
            f"outer lr {size.lr:g}, {budget:g} s of wall time per run, median of "
            f"{size.seeds[m]} seed(s)"
        )
        lines.append(
            f"| method | loss @T/2 | loss @T | loss @{sync_updates} outer upd. (sync's count) "
            "| outer upd. | mean staleness | momentum applied |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        summary[f"{m}-{kind}"] = {}
        for method in size.methods:
            runs = [r for r in cell if r["job"]["method"] == method]
            half = _median([_loss_at(r, budget / 2) for r in runs])
            end = _median([_loss_at(r, budget) for r in runs])
            per_update = _median([_loss_at_update(r, sync_updates) for r in runs])
            updates = statistics.median([r["updates"][-1] for r in runs])
            stale = statistics.median([r["mean_staleness"] for r in runs])
            mom = statistics.median([r["momentum"] for r in runs])
            lines.append(
                f"| {method} | {_fmt(half)} | {_fmt(end)} | {_fmt(per_update)} | {updates:g} | "
                f"{stale:.2f} | {mom:.2f} |"
            )
            summary[f"{m}-{kind}"][method] = {"half": half, "end": end, "per_update": per_update}
    return "\n".join(lines), summary


def save_real_figure(results: list[dict[str, Any]], size: RealSize, out: Path) -> None:
    """Held-out loss vs wall time and vs outer updates (first seed) of every real cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(size.cells), figsize=(5 * len(size.cells), 8), squeeze=False)
    for col, (m, kind) in enumerate(size.cells):
        for method in size.methods:
            runs = [
                r
                for r in results
                if r["job"]["workers"] == m
                and r["job"]["speeds"] == kind
                and r["job"]["method"] == method
                and r["job"]["seed"] == 0
            ]
            for run in runs:
                clipped = [min(x, 6.0) for x in run["losses"]]  # diverged runs at the top
                axes[0][col].plot(run["times"], clipped, label=method)
                axes[1][col].plot(run["updates"], clipped, label=method)
        axes[0][col].set_title(f"charlm, {m} processes, {kind} speeds")
        axes[0][col].set_xlabel("wall time (s)")
        axes[1][col].set_xlabel("outer updates")
        for row in (0, 1):
            axes[row][col].set_ylabel("held-out loss")
            axes[row][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "local_sgd_real.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables and the load average."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a sub-minute version")
    parser.add_argument("--problem", choices=sorted(PROBLEMS), default="charlm")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=Path("local_sgd_out"))
    parser.add_argument(
        "--part",
        choices=("all", "sim", "real"),
        default="all",
        help="the simulator's parts (a, b), the real processes' part (c), or all",
    )
    args = parser.parse_args(argv)
    size = QUICK if args.quick else DEFAULT
    real_size = REAL_QUICK if args.quick else REAL_DEFAULT
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    texts, summary, results = [], {}, []
    print(f"load average before (1, 5, 15 min): {os.getloadavg()}", flush=True)
    if args.part in ("all", "real"):
        # First, alone on the machine: the real runs time wall clock.
        real_began = time.perf_counter()
        real = run_real(real_size, args.out)
        text_c, summary["c"] = table_real(real, real_size)
        print(text_c, flush=True)
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        texts.append(
            f"{text_c}\n\n{len(real)} real runs, {time.perf_counter() - real_began:.0f} s; load "
            f"average after (1, 5, 15 min): {load}"
        )
        (args.out / "local_sgd_real.json").write_text(json.dumps(real))
        save_real_figure(real, real_size, args.out)
    if args.part in ("all", "sim"):
        jobs = jobs_of(size, args.problem)
        print(f"{len(jobs)} simulated runs on {args.jobs} processes", flush=True)
        start = time.perf_counter()
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs) as pool:
                results = list(pool.map(run_job, jobs))
        else:
            results = [run_job(j) for j in jobs]
        wall = time.perf_counter() - start
        text_a, summary["a"] = table_a([r for r in results if r["job"]["part"] == "a"], size)
        text_b, summary["b"] = table_b([r for r in results if r["job"]["part"] == "b"], size)
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        texts.append(
            f"problem {args.problem} (simulator)\n{text_a}\n{text_b}\n\n{len(jobs)} runs, "
            f"{wall:.0f} s wall on {args.jobs} processes, "
            f"{sum(r['seconds'] for r in results):.0f} s of run time; "
            f"load average after (1, 5, 15 min): {load}"
        )
        save_figure(results, summary, size, args.out)
    report = (
        f"command: {' '.join(sys.argv)}\n"
        + "\n\n".join(texts)
        + f"\n\nwhole benchmark: {time.perf_counter() - began:.0f} s"
    )
    print(report)
    (args.out / "local_sgd.md").write_text(report + "\n")
    (args.out / "local_sgd.json").write_text(json.dumps({"summary": summary, "runs": results}))
    print(f"wrote {args.out / 'local_sgd.md'}, local_sgd.json and the figures")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
