"""``asyncmomentum sweep``: the experiment of "Asynchrony begets Momentum", reproducible.

For each problem (:mod:`asyncmomentum.applications.problems`), staleness model
(:data:`asyncmomentum.runtimes.simulate.STALENESS_MODELS`) and number of workers ``M``, the sweep
grid-searches a fixed algorithmic momentum over [-0.9, 0.95] at one learning rate, runs the
fixed 0.9 baseline and every tuning rule of :func:`asyncmomentum.core.tuning.rules.rule_names`
(``AsyncMomentumSGD(momentum=0.9, rule=r)``, which estimates ``M`` from the staleness the
simulator tells it; ``"stability"`` gets a curvature probe on ``Problem.curvature_batch`` every
25 updates, ``"closed_loop"`` a meter reading every 64), and measures the steps each needs to
reach a target training loss. It then checks the momentum meter against the queuing model
(:mod:`asyncmomentum.applications.sweep.meter_check`).

How it measures:

- **Learning rate.** Per problem, the rates of ``Problem.lr_grid`` are run at ``M = 1`` with
  momentum 0.9 on every seed; the fastest (lowest median steps; ties to the lower rate) among
  those where every seed converged, times ``lr_safety`` (default 1/2, ``--lr-safety``), is the
  one learning rate of every run of the problem: the paper's setting, a rate tuned without
  asynchrony and then kept. The findings depend on this factor: at 1/2 the runs are limited by
  stability, and the oracle momentum falls to 0.5 or below by ``M = 32`` (negative on the
  quadratic under round-robin); at 1/4 they are limited more by the step size, the oracle stays
  at 0.5 or above on the geometric and exponential models, and removing momentum costs more.
- **A run** (:func:`~asyncmomentum.applications.sweep.runs.run_one`) simulates ``M`` workers with
  :func:`asyncmomentum.runtimes.simulate.simulate`, from seeded initial weights, batch order and
  staleness stream (the same for every method of a cell), and evaluates the full training loss
  every ``Problem.eval_every`` updates (10 for the quadratic and softmax problems, 20 for the
  CNN: the resolution of the steps; it costs under 10% of a run, about 20% on the CNN). It stops
  at the target (``converged``), when the loss is not finite or above 10x the initial loss
  (``diverged``), or at ``Problem.max_steps`` (``capped``). The rules run with the optimizer's
  defaults (a warm-up of 20 observations at ``M = 1``, a horizon of 1000 updates).
- **Cost, oracle, ratio, geometric mean**: see :mod:`asyncmomentum.applications.sweep.analysis`. In
short:
  a run that does not reach the target counts as the cap; a setting's steps are the median over
  seeds; the oracle is the grid momentum with the fewest steps among those that converge for a
  majority of seeds; ratios to the oracle are averaged geometrically over the cells that have
  an oracle, divergences are counted apart.
- ``M = 1`` has no staleness under any model: it is simulated once and reported under each.

Outputs (in ``--out``): ``runs.csv`` (every run), ``table.md`` (the steps table, the summary and
the meter check), ``summary.json``, ``oracle_momentum.png``, ``meter_validation.png``, and
``cache.jsonl``, the cache a re-run reads (keyed by every parameter of a run and the code's
versions: a rule's runs carry its ``revision``, to bump when its behaviour changes; bump
``CACHE_VERSION`` in :mod:`asyncmomentum.applications.sweep.cache` when the sweep's own
measuring changes).

Cost: ``--quick`` on the three original problems is 1,338 runs (four rules and the meter check),
the full sweep (11 momenta, 5 seeds, every cell) 3,730 runs; the CNN's runs are most of it. The
two deeper problems (resnet, charlm) add about 260 CPU-seconds to ``--quick`` (additive and
auto). Timings in ``docs/performance.md``.
"""

from asyncmomentum.applications.sweep.analysis import Cell, MethodStats, MethodSummary, kendall_tau
from asyncmomentum.applications.sweep.cache import RunCache
from asyncmomentum.applications.sweep.command import (
    DEFAULT_OUT,
    register,
    run_sweep,
    run_sweep_command,
)
from asyncmomentum.applications.sweep.config import FULL, QUICK, CellLimit, SweepConfig
from asyncmomentum.applications.sweep.engine import (
    LearningRateChoice,
    SweepError,
    SweepResult,
    choose_learning_rate,
    compute_sweep,
)
from asyncmomentum.applications.sweep.report import SweepOutputError, format_summary, format_table
from asyncmomentum.applications.sweep.runs import RunResult, RunSpec, run_one

__all__ = [
    "DEFAULT_OUT",
    "FULL",
    "QUICK",
    "Cell",
    "CellLimit",
    "LearningRateChoice",
    "MethodStats",
    "MethodSummary",
    "RunCache",
    "RunResult",
    "RunSpec",
    "SweepConfig",
    "SweepError",
    "SweepOutputError",
    "SweepResult",
    "choose_learning_rate",
    "compute_sweep",
    "format_summary",
    "format_table",
    "kendall_tau",
    "register",
    "run_one",
    "run_sweep",
    "run_sweep_command",
]
