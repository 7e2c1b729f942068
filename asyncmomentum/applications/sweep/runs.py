"""One run of the sweep: a problem, a staleness model, a momentum method, a seed.

A run trains a fresh model inside :func:`asyncmomentum.runtimes.simulate.simulate` with an
:class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD` (a fixed momentum, or a tuning rule that
estimates
``M`` from the staleness it is told) and stops as soon as the full training loss reaches the
problem's target, diverges, or the step cap is hit.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from asyncmomentum.applications.problems import Problem, get_problem
from asyncmomentum.core.optimizer import AsyncMomentumSGD
from asyncmomentum.core.tuning.rules import rule_class
from asyncmomentum.runtimes.simulate import History, simulate, staleness_model

__all__ = [
    "DIVERGENCE_FACTOR",
    "RunResult",
    "RunSpec",
    "Status",
    "failed_result",
    "run_one",
    "run_recorded",
]

#: A run diverged when its full training loss exceeds this multiple of the initial loss (or is
#: not finite): far above anything a converging run visits, and early enough to stop wasting steps.
DIVERGENCE_FACTOR = 10.0

Status = Literal["converged", "capped", "diverged", "failed"]

#: Method names: ``"fixed"`` (a constant algorithmic momentum), ``"rule:<name>"`` (tuned), or
#: ``"meter"`` (a constant momentum with the momentum meter on, run to the step cap, not stopped
#: at the target: the sweep's check of the meter).
FIXED = "fixed"
RULE_PREFIX = "rule:"
METER_METHOD = "meter"


def simulated_staleness(staleness: str, workers: int) -> str:
    """The staleness model a run simulates.

    ``staleness``, except at ``M = 1``, where every model gives ``tau = 0`` and the runs are
    simulated once, under ``"geometric"``.

    Args:
        staleness: a name in :data:`asyncmomentum.runtimes.simulate.STALENESS_MODELS`.
        workers: ``M``.
    """
    return staleness if workers > 1 else "geometric"


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run; two equal specs give the same result bit for bit.

    Attributes:
        problem: a name in :data:`asyncmomentum.applications.problems.PROBLEMS`.
        staleness: a name in :data:`asyncmomentum.runtimes.simulate.STALENESS_MODELS`.
        workers: the number of simulated asynchronous workers ``M``.
        method: ``"fixed"``, ``"meter"``, or ``"rule:<name>"`` with a name in
            :func:`asyncmomentum.core.tuning.rules.rule_names`.
        momentum: the fixed algorithmic momentum (``"fixed"``, ``"meter"``), or the target total
            momentum of the rule.
        lr: learning rate.
        seed: seeds the model's initial weights, the batch order and the staleness stream.
        target_loss: full training loss that counts as reached.
        max_steps: step cap.
        eval_every: the full training loss is evaluated after every ``eval_every`` updates.
    """

    problem: str
    staleness: str
    workers: int
    method: str
    momentum: float
    lr: float
    seed: int
    target_loss: float
    max_steps: int
    eval_every: int

    @property
    def rule(self) -> str | None:
        """The tuning rule's name, or ``None`` for a fixed momentum."""
        return self.method[len(RULE_PREFIX) :] if self.method.startswith(RULE_PREFIX) else None

    def key(self) -> str:
        """A canonical string of every field, for the cache."""
        fields = asdict(self)
        return "|".join(f"{name}={fields[name]!r}" for name in sorted(fields))


@dataclass(frozen=True)
class RunResult:
    """What a run measured.

    Attributes:
        status: ``"converged"`` (reached the target), ``"capped"`` (did not within
            ``max_steps``), ``"diverged"`` (a non-finite value, or a full loss above
            :data:`DIVERGENCE_FACTOR` times the initial one) or ``"failed"`` (the run raised:
            see ``error``; never cached).
        steps: updates applied when the run stopped: the steps to target if converged.
        initial_loss: full training loss before the first update.
        final_loss: full training loss at the last evaluation (``inf`` if not finite).
        mean_algorithmic_momentum: the momentum the optimizer applied, averaged over the run.
        final_estimated_workers: the optimizer's ``M_hat`` at the end.
        seconds: wall time of the run (not part of any comparison; for budgeting).
        cpu_seconds: CPU time of the run's process during the run (what it costs on an idle
            core, less inflated than ``seconds`` on a shared machine).
        measured_total_momentum: the momentum meter's total at the end (``"meter"`` runs;
            ``None`` otherwise or without a reading).
        measured_standard_error: the meter's standard error of it.
        error: for a ``"failed"`` run, the exception it raised (type and message).
    """

    status: Status
    steps: int
    initial_loss: float
    final_loss: float
    mean_algorithmic_momentum: float
    final_estimated_workers: float
    seconds: float
    cpu_seconds: float = 0.0
    measured_total_momentum: float | None = None
    measured_standard_error: float | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        """Whether the run raised instead of finishing (its numbers are then meaningless)."""
        return self.status == "failed"

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


class _Stop(Exception):
    """Raised from ``on_step`` to end a simulation early (target reached or diverged)."""


class _Evaluator:
    """The ``on_step`` hook: evaluates the full loss every ``eval_every`` updates.

    It stops the simulation on the target or on divergence.
    """

    def __init__(
        self, model: nn.Module, full_loss: Callable[[nn.Module], float], spec: RunSpec
    ) -> None:
        self.model = model
        self.full_loss = full_loss
        self.spec = spec
        self.initial_loss = full_loss(model)
        self.last_loss = self.initial_loss
        self.status: Status = "capped"

    def __call__(self, step: int, history: History) -> None:
        done = step + 1
        if done % self.spec.eval_every and done != self.spec.max_steps:
            return
        loss = self.full_loss(self.model)
        self.last_loss = loss if math.isfinite(loss) else math.inf
        if not loss <= DIVERGENCE_FACTOR * self.initial_loss:  # also catches NaN
            self.status = "diverged"
            raise _Stop
        if loss <= self.spec.target_loss and self.spec.method != METER_METHOD:
            self.status = "converged"
            raise _Stop


#: Updates between the meter's readings for ``rule="closed_loop"`` in the sweep (its default, 256,
#: would give the loop two or three readings in a run of a thousand updates).
METER_REFRESH = 64

#: Updates between curvature estimates of ``rule="stability"`` in the sweep: runs are short
#: (tens to a thousand updates) and curvature moves most early; 4 warm-started products each.
CURVATURE_EVERY = 25


def _make_optimizer(spec: RunSpec, model: nn.Module, problem: Problem) -> AsyncMomentumSGD:
    if spec.rule is None:
        return AsyncMomentumSGD(
            model.parameters(),
            lr=spec.lr,
            momentum=spec.momentum,
            tune=False,
            measure_momentum=spec.method == METER_METHOD,
        )
    rule = rule_class(spec.rule)
    probe = None
    if rule.uses_curvature:
        batch = problem.curvature_batch(spec.seed)

        def probe() -> torch.Tensor:
            return problem.loss_fn(model, batch)

    return AsyncMomentumSGD(
        model.parameters(),
        lr=spec.lr,
        momentum=spec.momentum,
        rule=spec.rule,
        curvature_probe=probe,
        curvature_every=CURVATURE_EVERY,
        meter_options={"refresh": METER_REFRESH} if rule.uses_meter else None,
    )


def run_one(spec: RunSpec) -> RunResult:
    """Train one model under simulated asynchrony until the target, divergence or the cap.

    Args:
        spec: the run's parameters.

    Returns:
        The run's :class:`RunResult`.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    problem: Problem = get_problem(spec.problem)
    model = problem.make_model(spec.seed)
    optimizer = _make_optimizer(spec, model, problem)
    evaluator = _Evaluator(model, problem.full_loss, spec)
    history = History()

    def on_step(step: int, seen: History) -> None:
        nonlocal history
        history = seen  # keep a handle: simulate() does not return when we stop it early
        evaluator(step, seen)

    if evaluator.initial_loss <= spec.target_loss and spec.method != METER_METHOD:
        evaluator.status = "converged"
    else:
        with contextlib.suppress(_Stop):  # the target was reached, or the run diverged
            history = simulate(
                model,
                problem.loss_fn,
                problem.batches(spec.seed),
                optimizer,
                staleness_model(spec.staleness, spec.workers),
                spec.max_steps,
                seed=spec.seed,
                on_step=on_step,
            )
    if history.diverged:  # simulate() saw a non-finite loss, gradient or parameter
        evaluator.status = "diverged"
        evaluator.last_loss = math.inf
    momenta = history.algorithmic_momentum
    return RunResult(
        status=evaluator.status,
        steps=len(history),
        initial_loss=evaluator.initial_loss,
        final_loss=evaluator.last_loss,
        mean_algorithmic_momentum=(
            sum(momenta) / len(momenta) if momenta else optimizer.algorithmic_momentum
        ),
        final_estimated_workers=float(optimizer.estimated_workers),
        seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - cpu_started,
        **_meter_fields(optimizer),
    )


def failed_result(error: BaseException, seconds: float = 0.0) -> RunResult:
    """The record of a run that raised ``error``: status ``"failed"``, NaN measurements.

    Args:
        error: what the run raised.
        seconds: how long it ran before that.
    """
    message = "".join(traceback.format_exception_only(type(error), error)).strip()
    return RunResult(
        status="failed",
        steps=0,
        initial_loss=math.nan,
        final_loss=math.nan,
        mean_algorithmic_momentum=math.nan,
        final_estimated_workers=math.nan,
        seconds=seconds,
        error=message.replace("\n", " "),
    )


def run_recorded(spec: RunSpec) -> RunResult:
    """:func:`run_one`, with an exception recorded as a ``"failed"`` result instead of raised.

    One run's failure (a bug in a problem or a rule) then costs that run only: the sweep keeps
    every other result, marks the failed cells, and names the failures at the end.

    Args:
        spec: the run's parameters.
    """
    started = time.perf_counter()
    try:
        return run_one(spec)
    except Exception as error:  # recorded, reported by the sweep, never cached
        return failed_result(error, time.perf_counter() - started)


def _meter_fields(optimizer: AsyncMomentumSGD) -> dict[str, Any]:
    reading = None if optimizer.meter is None else optimizer.meter.reading
    total = optimizer.measured_total_momentum  # None exactly when there is no reading
    if reading is None or total is None:
        return {}
    return {
        "measured_total_momentum": float(total),
        "measured_standard_error": float(reading.standard_error),
    }


def limit_threads() -> None:
    """One intra-op thread: runs are tiny and many run side by side in worker processes."""
    torch.set_num_threads(1)
