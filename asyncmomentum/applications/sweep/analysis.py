"""From runs to findings: the oracle momentum of each cell, ratios to it, their geometric mean.

Definitions (also in the package docstring):

- A run's **cost** is its steps to target if it converged, else the step cap (it did not reach
  the target within the cap, or diverged): a lower bound on what it would have needed.
- A setting **converges** in a cell when more than half of its seeds converged; its **steps**
  are the median cost over seeds.
- The **oracle** of a cell is the grid momentum with the lowest median cost among those that
  converge; ties go to the lower mean cost, then fewer divergences, then the lower momentum.
  Cells where no grid momentum converges have no oracle.
- The **ratio** of a method in a cell is its median cost over the oracle's; it can be below 1
  (a rule may apply a momentum between grid points). The **geometric mean** of a method's ratios
  is over the cells that have an oracle (the same cells for every method); a method that does
  not converge there enters at the cap (a lower bound), and its divergences are counted apart.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from asyncmomentum.applications.sweep.runs import RunResult, RunSpec
from asyncmomentum.core.tuning.rules import DEFAULT_RULE  # every method is compared with it

__all__ = [
    "NEAR_OPTIMAL",
    "Cell",
    "MethodStats",
    "MethodSummary",
    "build_cells",
    "kendall_tau",
    "summarize",
]

#: Grid momenta whose median cost is within this factor of the oracle's are "near optimal".
NEAR_OPTIMAL = 1.1

#: A method is "worse than additive" in a cell when it needs more than this times its steps.
WORSE_THAN_ADDITIVE = 1.1


@dataclass(frozen=True)
class MethodStats:
    """One method in one cell, over seeds.

    Attributes:
        method: ``"fixed"`` or a rule's name.
        momentum: the fixed momentum, or the rule's target total momentum.
        costs: per seed, steps to target, or the cap if not reached.
        statuses: per seed, ``"converged"``, ``"capped"``, ``"diverged"`` or ``"failed"`` (the
            run raised; it counts at the cap, as not converged).
        applied_momentum: the algorithmic momentum the optimizer applied, mean over the run
            and over the seeds that did not diverge (NaN if all did: a run that diverges in its
            first updates shows the tuner's warm-up momentum, not its estimate).
        max_steps: the cap.
    """

    method: str
    momentum: float
    costs: tuple[int, ...]
    statuses: tuple[str, ...]
    applied_momentum: float
    max_steps: int

    @property
    def median(self) -> float:
        """Median cost over seeds."""
        return float(statistics.median(self.costs))

    @property
    def mean(self) -> float:
        """Mean cost over seeds."""
        return float(statistics.fmean(self.costs))

    @property
    def diverged(self) -> int:
        """Number of seeds that diverged."""
        return self.statuses.count("diverged")

    @property
    def failed(self) -> int:
        """Number of seeds whose run raised instead of finishing."""
        return self.statuses.count("failed")

    @property
    def converged(self) -> bool:
        """Whether more than half of the seeds reached the target."""
        return 2 * self.statuses.count("converged") > len(self.statuses)


@dataclass(frozen=True)
class Cell:
    """One problem, staleness model and worker count: the grid, the rules and the oracle.

    Attributes:
        problem: the problem's name.
        staleness: the staleness model's name.
        workers: ``M``.
        lr: the learning rate of every run of the cell.
        max_steps: the step cap.
        fixed: fixed momentum -> its stats (the grid, and the baseline).
        rules: rule name -> its stats.
        grid: the momenta searched for the oracle.
    """

    problem: str
    staleness: str
    workers: int
    lr: float
    max_steps: int
    fixed: dict[float, MethodStats]
    rules: dict[str, MethodStats]
    grid: tuple[float, ...]
    oracle: MethodStats | None = field(init=False)

    def __post_init__(self) -> None:
        candidates = [self.fixed[m] for m in self.grid if self.fixed[m].converged]
        best = min(
            candidates,
            key=lambda s: (s.median, s.mean, s.diverged, s.momentum),
            default=None,
        )
        object.__setattr__(self, "oracle", best)

    @property
    def near_optimal(self) -> tuple[float, ...]:
        """Grid momenta that converge within :data:`NEAR_OPTIMAL` of the oracle's steps."""
        if self.oracle is None:
            return ()
        limit = NEAR_OPTIMAL * self.oracle.median
        return tuple(
            m for m in self.grid if self.fixed[m].converged and self.fixed[m].median <= limit
        )

    @property
    def failed_runs(self) -> int:
        """Runs of this cell (grid and rules, every seed) that raised instead of finishing."""
        return sum(s.failed for s in (*self.fixed.values(), *self.rules.values()))

    def ratio(self, stats: MethodStats) -> float | None:
        """``stats``'s median cost over the oracle's, or ``None`` without an oracle.

        Args:
            stats: a method's stats in this cell.

        Returns:
            The ratio, or ``None`` when the cell has no oracle (or its oracle needed 0 steps).
        """
        if self.oracle is None or self.oracle.median <= 0:
            return None  # no oracle, or the target was met before the first step
        return stats.median / self.oracle.median


@dataclass(frozen=True)
class MethodSummary:
    """One method over many cells.

    Attributes:
        label: ``"fixed 0.9"`` or a rule's name.
        cells: cells with an oracle (the cells of the geometric mean).
        geomean_ratio: geometric mean of the ratios to the oracle over those cells (NaN if none).
        not_converged: cells (with an oracle) where this method did not converge.
        diverged_runs: runs that diverged, over every cell and seed.
        runs: runs over every cell and seed.
        diverged_with_oracle: runs that diverged in cells where the oracle converges.
        worse_than_additive: cells (with an oracle) where this method needed more than
            :data:`WORSE_THAN_ADDITIVE` times the steps of the default ``additive`` rule.
        failed_runs: runs that raised instead of finishing, over every cell and seed.
    """

    label: str
    cells: int
    geomean_ratio: float
    not_converged: int
    diverged_runs: int
    runs: int
    diverged_with_oracle: int = 0
    worse_than_additive: int = 0
    failed_runs: int = 0


def _stats(method: str, momentum: float, runs: Sequence[tuple[RunSpec, RunResult]]) -> MethodStats:
    cap = runs[0][0].max_steps
    costs = tuple(r.steps if r.status == "converged" else cap for _, r in runs)
    stable = [
        r.mean_algorithmic_momentum for _, r in runs if r.status not in ("diverged", "failed")
    ]
    applied = statistics.fmean(stable) if stable else math.nan
    return MethodStats(
        method=method,
        momentum=momentum,
        costs=costs,
        statuses=tuple(r.status for _, r in runs),
        applied_momentum=applied,
        max_steps=cap,
    )


def build_cells(
    runs: Iterable[tuple[str, RunSpec, RunResult]], grid: Sequence[float]
) -> list[Cell]:
    """Group the grid-phase runs into cells, in the order they come.

    Args:
        runs: ``(reported staleness model, spec, result)`` triples; the reported model can
            differ from ``spec.staleness`` (runs at ``M = 1`` are shared by every model).
        grid: the momenta searched for the oracle.
    """
    # (problem, staleness model, M, lr, step cap) -> (method, momentum) -> runs
    grouped: dict[
        tuple[str, str, int, float, int],
        dict[tuple[str, float], list[tuple[RunSpec, RunResult]]],
    ] = {}
    for staleness, spec, result in runs:
        cell_key = (spec.problem, staleness, spec.workers, spec.lr, spec.max_steps)
        method_key = (spec.rule or "fixed", spec.momentum)
        grouped.setdefault(cell_key, {}).setdefault(method_key, []).append((spec, result))
    cells = []
    for (problem, staleness, workers, lr, cap), methods in grouped.items():
        fixed = {m: _stats("fixed", m, r) for (kind, m), r in methods.items() if kind == "fixed"}
        rules = {kind: _stats(kind, m, r) for (kind, m), r in methods.items() if kind != "fixed"}
        cells.append(
            Cell(problem, staleness, workers, lr, cap, fixed, rules, tuple(float(m) for m in grid))
        )
    return cells


def _summary(label: str, pairs: list[tuple[Cell, MethodStats]]) -> MethodSummary:
    with_oracle = [(cell, stats) for cell, stats in pairs if cell.ratio(stats) is not None]
    worse = sum(
        stats.median > WORSE_THAN_ADDITIVE * cell.rules[DEFAULT_RULE].median
        for cell, stats in with_oracle
        if DEFAULT_RULE in cell.rules
    )
    with_ratio = [(cell.ratio(stats), stats) for cell, stats in pairs]
    scored = [(ratio, stats) for ratio, stats in with_ratio if ratio is not None]
    geomean = (
        math.exp(statistics.fmean(math.log(ratio) for ratio, _ in scored)) if scored else math.nan
    )
    return MethodSummary(
        label=label,
        cells=len(scored),
        geomean_ratio=geomean,
        not_converged=sum(not stats.converged for _, stats in scored),
        diverged_runs=sum(stats.diverged for _, stats in pairs),
        runs=sum(len(stats.costs) for _, stats in pairs),
        diverged_with_oracle=sum(stats.diverged for _, stats in with_oracle),
        worse_than_additive=worse,
        failed_runs=sum(stats.failed for _, stats in pairs),
    )


#: The design half of the cells: the ``auto`` rule's constants were chosen on the cells of
#: these problems at these worker counts only (see ``docs/auto-rule.md``); every other cell
#: (``M`` in {1, 4, 16}, and every cell of the cnn and of the deeper problems) is held back.
DESIGN_PROBLEMS: tuple[str, ...] = ("quadratic", "softmax")
DESIGN_WORKERS: tuple[int, ...] = (2, 8, 32)


def is_design_cell(cell: Cell) -> bool:
    """Whether ``cell`` is in the design half (:data:`DESIGN_PROBLEMS` x :data:`DESIGN_WORKERS`).

    Args:
        cell: a cell from :func:`build_cells`.
    """
    return cell.problem in DESIGN_PROBLEMS and cell.workers in DESIGN_WORKERS


def worst_ratio(cells: Sequence[Cell], rule: str) -> float:
    """The largest ratio to the oracle of ``rule`` over ``cells`` (NaN if none has one).

    Args:
        cells: cells from :func:`build_cells`.
        rule: a rule's name.
    """
    ratios = [cell.ratio(cell.rules[rule]) for cell in cells if rule in cell.rules]
    scored = [r for r in ratios if r is not None]
    return max(scored) if scored else math.nan


def summarize(cells: Sequence[Cell], baseline: float) -> list[MethodSummary]:
    """The fixed baseline and every rule, summarized over ``cells``.

    Args:
        cells: cells from :func:`build_cells`.
        baseline: the baseline's fixed momentum.
    """
    labels: dict[str, list[tuple[Cell, MethodStats]]] = {f"fixed {baseline:g}": []}
    for cell in cells:
        labels[f"fixed {baseline:g}"].append((cell, cell.fixed[baseline]))
        for rule, stats in cell.rules.items():
            labels.setdefault(rule, []).append((cell, stats))
    return [_summary(label, pairs) for label, pairs in labels.items()]


def kendall_tau(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Kendall's rank correlation (tau-b) of two sequences; NaN if either is constant.

    Negative when ``ys`` tends to decrease as ``xs`` grows.

    Args:
        xs: first sequence.
        ys: second sequence, as long as ``xs``.
    """
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys must have the same length, got {len(xs)} and {len(ys)}")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            dx, dy = xs[j] - xs[i], ys[j] - ys[i]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else math.nan
