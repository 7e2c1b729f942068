"""Running a sweep: learning-rate tuning at ``M = 1``, then the grid and the rules.

The runs go in parallel, cached, with a progress bar.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asyncmomentum.applications.problems import get_problem
from asyncmomentum.applications.progress import progress_bar
from asyncmomentum.applications.sweep.analysis import Cell, MethodSummary, build_cells, summarize
from asyncmomentum.applications.sweep.cache import RunCache
from asyncmomentum.applications.sweep.config import SweepConfig
from asyncmomentum.applications.sweep.meter_check import MeterPoint, meter_points, meter_specs
from asyncmomentum.applications.sweep.runs import (
    RULE_PREFIX,
    RunResult,
    RunSpec,
    failed_result,
    limit_threads,
    run_recorded,
    simulated_staleness,
)
from asyncmomentum.core.validation import check_int

__all__ = [
    "LearningRateChoice",
    "RunFailure",
    "Runner",
    "SweepError",
    "SweepResult",
    "choose_learning_rate",
    "compute_sweep",
    "execute",
    "grid_specs",
    "lr_tuning_specs",
]

#: Relative cost of a step of each problem, to start the expensive runs first (better packing
#: of the worker processes at the end of a phase).
_STEP_COST = {
    "quadratic": 1.0,
    "softmax": 2.0,
    "cnn": 7.0,
    "resnet": 40.0,
    "charlm": 10.0,
    "gru": 3.0,
}


class SweepError(RuntimeError):
    """A sweep could not be completed (no learning rate of a problem converges)."""


@dataclass(frozen=True)
class RunFailure:
    """A run that raised instead of finishing: recorded, not cached, named at the end.

    Attributes:
        phase: ``"lr"``, ``"grid"`` or ``"meter"``.
        spec: the run.
        error: the exception's type and message.
    """

    phase: str
    spec: RunSpec
    error: str

    def describe(self) -> str:
        """One line: which run, and what it raised."""
        s = self.spec
        return (
            f"{self.phase} run {s.problem} {s.staleness} M={s.workers} {s.rule or s.method}"
            f" momentum={s.momentum:g} seed={s.seed}: {self.error}"
        )


@dataclass(frozen=True)
class LearningRateChoice:
    """How a problem's learning rate was chosen.

    Attributes:
        problem: the problem's name.
        lr: the sweep's learning rate: ``safety * fastest``.
        fastest: the rate of the grid with the lowest median steps to target among those where
            every seed converged (ties: lower mean, then the lower rate).
        safety: the safety factor.
        median_steps: grid rate -> median cost over seeds (cap when not reached).
        all_converged: grid rate -> whether every seed reached the target.
    """

    problem: str
    lr: float
    fastest: float
    safety: float
    median_steps: dict[float, float]
    all_converged: dict[float, bool]


@dataclass
class SweepResult:
    """Everything a sweep measured and derived.

    Attributes:
        config: the sweep's configuration.
        learning_rates: problem -> how its learning rate was chosen.
        rows: one dict per run (learning-rate tuning and grid), the CSV's rows.
        cells: the grid's cells, with their oracle.
        summaries: the baseline and each rule over every cell.
        meter: the momentum meter's check (see :mod:`asyncmomentum.applications.sweep.meter_check`).
        computed: runs computed by this call.
        cached: runs taken from the cache.
        seconds: wall time of the call.
        files: output name -> path, once written.
        failures: the runs that raised (their cells are marked in the table).
        skipped_problems: problem -> why it has no grid (every learning-rate run of it failed).
    """

    config: SweepConfig
    learning_rates: dict[str, LearningRateChoice]
    rows: list[dict[str, Any]]
    cells: list[Cell]
    summaries: list[MethodSummary]
    meter: list[MeterPoint] = field(default_factory=list)
    computed: int = 0
    cached: int = 0
    seconds: float = 0.0
    files: dict[str, Path] = field(default_factory=dict)
    failures: list[RunFailure] = field(default_factory=list)
    skipped_problems: dict[str, str] = field(default_factory=dict)


# -- execution ------------------------------------------------------------------------------------


def _cost_estimate(spec: RunSpec) -> float:
    return _STEP_COST.get(spec.problem, 1.0) * spec.max_steps * (1.0 + 0.01 * spec.workers)


class Runner:
    """Runs specs in this process (``jobs == 1``) or in worker processes.

    The pool starts on first use and serves every phase of the sweep: starting a worker
    (importing torch) costs seconds. Use as a context manager; leaving it stops the workers.

    Args:
        jobs: worker processes (>= 1).
    """

    def __init__(self, jobs: int = 1) -> None:
        self.jobs = jobs
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes, dropping runs that have not started."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def run(self, specs: Sequence[RunSpec], done: Callable[[RunSpec, RunResult], None]) -> None:
        """Run every spec, calling ``done(spec, result)`` in this process as each finishes.

        Args:
            specs: the runs, started in this order.
            done: called once per finished run.
        """
        if self.jobs == 1 or len(specs) <= 1:
            self._run_here(specs, done)
        else:
            self._run_in_pool(specs, done)

    @staticmethod
    def _run_here(specs: Sequence[RunSpec], done: Callable[[RunSpec, RunResult], None]) -> None:
        threads = torch.get_num_threads()
        limit_threads()  # the same thread count as the worker processes: the same numbers
        try:
            for spec in specs:
                done(spec, run_recorded(spec))
        finally:
            torch.set_num_threads(threads)

    def _run_in_pool(
        self, specs: Sequence[RunSpec], done: Callable[[RunSpec, RunResult], None]
    ) -> None:
        if self._pool is None:
            # spawn, not fork: a forked child inherits the parent's torch thread pools and locks.
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(
                self.jobs, mp_context=context, initializer=limit_threads
            )
        pending: dict[Future[RunResult], RunSpec] = {
            self._pool.submit(run_recorded, spec): spec for spec in specs
        }
        broken = False
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    spec = pending.pop(future)
                    try:
                        result = future.result()
                    except Exception as error:  # a worker process died, or a pickling error
                        broken = broken or isinstance(error, BrokenProcessPool)
                        result = failed_result(error)
                    done(spec, result)
        finally:
            if broken:  # the next phase starts a fresh pool
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            for future in pending:  # a failed run or Ctrl-C: drop what has not started
                future.cancel()


def execute(
    specs: Iterable[RunSpec],
    cache: RunCache | None,
    runner: Runner,
    *,
    progress: bool = False,
    desc: str = "runs",
) -> tuple[dict[RunSpec, RunResult], int]:
    """Results of ``specs``: from the cache, else computed by ``runner`` and cached.

    Args:
        specs: the runs (duplicates are run once).
        cache: where finished runs are looked up and recorded; ``None`` for no cache.
        runner: runs what is missing.
        progress: show a progress bar (on stderr).
        desc: the progress bar's label.

    Returns:
        ``(spec -> result, number of runs computed)``. A run that raised is in it with
        status ``"failed"`` and its error; it is not cached (a re-run tries it again).
    """
    results: dict[RunSpec, RunResult] = {}
    missing: list[RunSpec] = []
    for spec in dict.fromkeys(specs):
        hit = cache.get(spec) if cache is not None else None
        if hit is None:
            missing.append(spec)
        else:
            results[spec] = hit
    # The expensive runs first: the cheap ones then fill the gaps at the end of the phase.
    missing.sort(key=_cost_estimate, reverse=True)
    bar = progress_bar(
        len(missing),
        desc,
        unit="runs",
        enabled=progress,
        total_work=sum(map(_cost_estimate, missing)),  # time left from work, not from count
    )

    def done(spec: RunSpec, result: RunResult) -> None:
        results[spec] = result
        if cache is not None and not result.failed:
            cache.put(spec, result)
        bar.update(work=_cost_estimate(spec))

    try:
        runner.run(missing, done)
    finally:
        bar.close()
    return results, len(missing)


# -- the two phases -------------------------------------------------------------------------------


def _cap(config: SweepConfig, problem: str) -> int:
    return config.max_steps or get_problem(problem).max_steps


def lr_tuning_specs(config: SweepConfig, problem: str) -> list[RunSpec]:
    """The learning-rate tuning runs of ``problem``.

    Its ``lr_grid`` at ``M = 1``, momentum ``target_momentum``, every seed.

    Args:
        config: the sweep.
        problem: a problem's name.
    """
    definition = get_problem(problem)
    return [
        RunSpec(
            problem=problem,
            staleness="geometric",
            workers=1,
            method="fixed",
            momentum=float(config.target_momentum),
            lr=float(lr),
            seed=seed,
            target_loss=definition.target_loss,
            max_steps=_cap(config, problem),
            eval_every=definition.eval_every,
        )
        for lr in definition.lr_grid
        for seed in range(config.seeds)
    ]


def choose_learning_rate(
    problem: str, runs: Sequence[tuple[RunSpec, RunResult]], safety: float
) -> LearningRateChoice:
    """The fastest rate at which every seed converged, times ``safety``.

    Args:
        problem: the problem's name.
        runs: its learning-rate tuning runs.
        safety: the safety factor, in (0, 1].

    Raises:
        SweepError: no rate of the grid converged for every seed (failed runs count as not
            converged).
    """
    cap = runs[0][0].max_steps
    by_lr: dict[float, list[RunResult]] = {}
    for spec, result in runs:
        by_lr.setdefault(spec.lr, []).append(result)
    median_steps, all_converged, ranking = {}, {}, []
    for lr, results in sorted(by_lr.items()):
        costs = [r.steps if r.status == "converged" else cap for r in results]
        median_steps[lr] = float(statistics.median(costs))
        all_converged[lr] = all(r.status == "converged" for r in results)
        if all_converged[lr]:
            ranking.append((median_steps[lr], statistics.fmean(costs), lr))
    if not ranking:
        raise SweepError(
            f"no learning rate of {problem}'s lr_grid {sorted(by_lr)} reached the target loss "
            f"at M = 1 for every seed within {cap} steps; widen lr_grid or raise max_steps in "
            "asyncmomentum/applications/problems.py"
        )
    fastest = min(ranking)[2]
    return LearningRateChoice(
        problem=problem,
        lr=safety * fastest,
        fastest=fastest,
        safety=safety,
        median_steps=median_steps,
        all_converged=all_converged,
    )


def grid_specs(config: SweepConfig, problem: str, lr: float) -> list[tuple[str, RunSpec]]:
    """The grid-phase runs of ``problem`` as ``(reported staleness model, spec)`` pairs.

    Every staleness model gives ``tau = 0`` at ``M = 1``, so those runs are simulated once, with
    the geometric model, and reported under each model.

    Args:
        config: the sweep.
        problem: a problem's name.
        lr: the learning rate chosen for it.
    """
    definition = get_problem(problem)
    methods = [("fixed", m) for m in config.fixed_momenta]
    methods += [(RULE_PREFIX + rule, float(config.target_momentum)) for rule in config.rule_names]
    pairs = []
    for staleness, workers in config.cells(problem):
        for method, momentum in methods:
            for seed in range(config.seeds):
                run = RunSpec(
                    problem=problem,
                    staleness=simulated_staleness(staleness, workers),
                    workers=workers,
                    method=method,
                    momentum=float(momentum),
                    lr=float(lr),
                    seed=seed,
                    target_loss=definition.target_loss,
                    max_steps=_cap(config, problem),
                    eval_every=definition.eval_every,
                )
                pairs.append((staleness, run))
    return pairs


def _row(phase: str, staleness: str, spec: RunSpec, result: RunResult) -> dict[str, Any]:
    return {
        "phase": phase,
        "problem": spec.problem,
        "staleness": staleness,
        "workers": spec.workers,
        "method": spec.rule or spec.method,
        "momentum": spec.momentum,
        "lr": spec.lr,
        "seed": spec.seed,
        "target_loss": spec.target_loss,
        "max_steps": spec.max_steps,
        "eval_every": spec.eval_every,
        "status": result.status,
        "steps": result.steps,
        "cost": result.steps if result.status == "converged" else spec.max_steps,
        "initial_loss": result.initial_loss,
        "final_loss": result.final_loss,
        "mean_algorithmic_momentum": result.mean_algorithmic_momentum,
        "final_estimated_workers": result.final_estimated_workers,
        "seconds": result.seconds,
        "cpu_seconds": result.cpu_seconds,
        "measured_total_momentum": result.measured_total_momentum,
        "measured_standard_error": result.measured_standard_error,
        "error": result.error or "",
    }


def compute_sweep(
    config: SweepConfig,
    cache: RunCache | None,
    *,
    jobs: int = 1,
    progress: bool = False,
) -> SweepResult:
    """Run (or read from the cache) every run of the sweep and analyse them.

    Writes nothing but the cache.

    Args:
        config: the sweep.
        cache: the run cache, or ``None``.
        jobs: worker processes.
        progress: show progress bars.
    """
    check_int(jobs, "jobs (worker processes)", 1)
    with Runner(jobs) as runner:
        return _compute(config, cache, runner, progress)


def _compute(
    config: SweepConfig, cache: RunCache | None, runner: Runner, progress: bool
) -> SweepResult:
    started = time.perf_counter()
    lr_specs = {p: lr_tuning_specs(config, p) for p in config.problems}
    lr_results, computed = execute(
        (s for specs in lr_specs.values() for s in specs),
        cache,
        runner,
        progress=progress,
        desc="sweep: learning rates",
    )
    rows = []
    choices = {}
    failures = [
        RunFailure("lr", s, lr_results[s].error or "") for s in lr_results if lr_results[s].failed
    ]
    skipped = {}
    for problem, specs in lr_specs.items():
        runs = [(s, lr_results[s]) for s in specs]
        rows += [_row("lr", s.staleness, s, r) for s, r in runs]
        try:
            choices[problem] = choose_learning_rate(problem, runs, config.lr_safety)
        except SweepError as error:
            if not any(r.failed for _, r in runs):
                raise  # a problem that does not converge: a configuration to fix
            skipped[problem] = f"its learning-rate runs failed ({error})"
    problems = [p for p in config.problems if p in choices]

    pairs = [pair for p in problems for pair in grid_specs(config, p, choices[p].lr)]
    grid_results, computed_grid = execute(
        (s for _, s in pairs), cache, runner, progress=progress, desc="sweep: grid"
    )
    computed += computed_grid
    failures += [RunFailure("grid", s, r.error or "") for s, r in grid_results.items() if r.failed]
    triples = [(staleness, s, grid_results[s]) for staleness, s in pairs]
    rows += [_row("grid", staleness, s, r) for staleness, s, r in triples]
    cells = build_cells(triples, config.momenta)

    checks = [s for p in problems for s in meter_specs(config, p, choices[p].lr)]
    meter_results, computed_meter = execute(
        checks, cache, runner, progress=progress, desc="sweep: momentum meter"
    )
    computed += computed_meter
    failures += [
        RunFailure("meter", s, r.error or "") for s, r in meter_results.items() if r.failed
    ]
    rows += [_row("meter", s.staleness, s, meter_results[s]) for s in checks]
    total = len(set(lr_results) | set(grid_results) | set(meter_results))
    return SweepResult(
        config=config,
        learning_rates=choices,
        rows=rows,
        cells=cells,
        summaries=summarize(cells, float(config.target_momentum)),
        meter=meter_points([(s, meter_results[s]) for s in checks]),
        computed=computed,
        cached=total - computed,
        seconds=time.perf_counter() - started,
        failures=failures,
        skipped_problems=skipped,
    )
