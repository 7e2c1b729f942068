"""The sweep's check of the momentum meter: measured against predicted total momentum.

The paper's validation figure, for :class:`~asyncmomentum.core.measuring.meter.MomentumMeter`: runs
with a
fixed algorithmic momentum under the exponential worker queue of ``M`` workers (the model whose
implicit momentum is ``1 - 1/M``), each a fixed number of updates with the meter on, and the
meter's total momentum against the prediction ``momentum + (1 - 1/M)``. At ``M = 1`` (no
asynchrony) it also runs momenta 0.5 and 0.9, which the meter must read back.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncmomentum.applications.problems import get_problem
from asyncmomentum.applications.sweep.runs import (
    METER_METHOD,
    RunResult,
    RunSpec,
    simulated_staleness,
)
from asyncmomentum.core import formulas

if TYPE_CHECKING:
    from asyncmomentum.applications.sweep.config import SweepConfig

__all__ = [
    "METER_FIGURE_NAME",
    "METER_MOMENTA_WITHOUT_ASYNCHRONY",
    "METER_STALENESS",
    "MeterPoint",
    "format_meter",
    "meter_points",
    "meter_specs",
    "plot_meter",
]

METER_FIGURE_NAME = "meter_validation.png"

#: The staleness model of the check: the exponential queue of M workers, the paper's model.
METER_STALENESS = "exponential"

#: Momenta run at ``M = 1`` besides 0: the meter must read the set momentum back.
METER_MOMENTA_WITHOUT_ASYNCHRONY: tuple[float, ...] = (0.5, 0.9)

#: The issue's tolerances: 0.1 of ``1 - 1/M`` under asynchrony, 0.03 of the set momentum without.
TOLERANCE_ASYNC = 0.1
TOLERANCE_SYNC = 0.03


@dataclass(frozen=True)
class MeterPoint:
    """The meter on one problem, worker count and momentum, over the seeds.

    Attributes:
        problem: the problem's name.
        workers: ``M``.
        momentum: the algorithmic momentum the runs applied.
        predicted: ``momentum + (1 - 1/M)``, the total the queuing model predicts.
        measured: mean over seeds of the meter's total momentum (``nan`` if no seed had one).
        spread: standard deviation over seeds (0 for one seed).
        standard_error: mean over seeds of the meter's own (jackknife) standard error.
        readings: seeds that produced a reading.
        diverged: seeds that diverged.
        tolerance: the acceptance tolerance for this point (0.03 at ``M = 1``, else 0.1).
    """

    problem: str
    workers: int
    momentum: float
    predicted: float
    measured: float
    spread: float
    standard_error: float
    readings: int
    diverged: int
    tolerance: float

    @property
    def error(self) -> float:
        """``measured - predicted``."""
        return self.measured - self.predicted

    @property
    def within(self) -> bool:
        """Whether the measurement is within :attr:`tolerance` of the prediction."""
        return math.isfinite(self.measured) and abs(self.error) <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        """The fields, the error and whether it is within tolerance, as a plain dict."""
        return {**asdict(self), "error": self.error, "within": self.within}


def meter_specs(config: SweepConfig, problem: str, lr: float) -> list[RunSpec]:
    """The meter runs of ``problem`` (none if the sweep does not check it).

    Args:
        config: the sweep.
        problem: a problem's name.
        lr: the learning rate the sweep chose for it.
    """
    if problem not in config.meter_problems:
        return []
    definition = get_problem(problem)
    settings = [(m, 0.0) for m in config.meter_workers]
    if 1 in config.meter_workers:
        settings += [(1, momentum) for momentum in METER_MOMENTA_WITHOUT_ASYNCHRONY]
    return [
        RunSpec(
            problem=problem,
            staleness=simulated_staleness(METER_STALENESS, workers),
            workers=workers,
            method=METER_METHOD,
            momentum=float(momentum),
            lr=float(lr),
            seed=seed,
            target_loss=definition.target_loss,
            max_steps=config.meter_steps,
            eval_every=definition.eval_every,
        )
        for workers, momentum in settings
        for seed in range(config.seeds)
    ]


def meter_points(runs: Sequence[tuple[RunSpec, RunResult]]) -> list[MeterPoint]:
    """Aggregate meter runs over seeds, one point per problem, ``M`` and momentum.

    Args:
        runs: ``(spec, result)`` of meter runs.
    """
    grouped: dict[tuple[str, int, float], list[RunResult]] = defaultdict(list)
    for spec, result in runs:
        grouped[(spec.problem, spec.workers, spec.momentum)].append(result)
    points = []
    for (problem, workers, momentum), results in sorted(grouped.items()):
        values = [
            v for r in results if (v := r.measured_total_momentum) is not None and math.isfinite(v)
        ]
        errors = [
            e for r in results if (e := r.measured_standard_error) is not None and math.isfinite(e)
        ]
        points.append(
            MeterPoint(
                problem=problem,
                workers=workers,
                momentum=momentum,
                predicted=formulas.additive_total(momentum, formulas.implicit_momentum(workers)),
                measured=statistics.fmean(values) if values else math.nan,
                spread=statistics.stdev(values) if len(values) > 1 else 0.0,
                standard_error=statistics.fmean(errors) if errors else math.nan,
                readings=len(values),
                diverged=sum(r.status == "diverged" for r in results),
                tolerance=TOLERANCE_SYNC if workers == 1 else TOLERANCE_ASYNC,
            )
        )
    return points


def format_meter(points: Sequence[MeterPoint], steps: int) -> str:
    """The check as Markdown: one row per point and a verdict.

    Args:
        points: from :func:`meter_points`.
        steps: updates per run.
    """
    lines = [
        "### Momentum meter: measured against predicted total momentum",
        "",
        f"Exponential queue of M workers, {steps} updates per run, the meter's defaults; "
        "predicted = momentum + (1 - 1/M).",
        "",
    ]
    if not points:
        return "\n".join([*lines, "Not run in this sweep."])
    lines += [
        "| problem | M | momentum | predicted | measured (mean +- sd over seeds) | error "
        "| tolerance |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        measured = "no reading" if math.isnan(p.measured) else f"{p.measured:.3f} +- {p.spread:.3f}"
        error = "-" if math.isnan(p.measured) else f"{p.error:+.3f}"
        mark = "" if p.within else " **outside**"
        lines.append(
            f"| {p.problem} | {p.workers} | {p.momentum:g} | {p.predicted:.3f} | {measured} | "
            f"{error} | {p.tolerance:g}{mark} |"
        )
    worst = max((abs(p.error) for p in points if math.isfinite(p.measured)), default=math.nan)
    outside = sum(not p.within for p in points)
    lines += [
        "",
        f"Largest error {worst:.3f}; {outside} of {len(points)} points outside tolerance.",
    ]
    return "\n".join(lines)


_PROBLEM_MARKERS = {"quadratic": "o", "softmax": "s", "cnn": "^"}


def plot_meter(points: Sequence[MeterPoint], path: Path) -> None:
    """Measured against predicted total momentum, with the identity and the tolerance band.

    Args:
        points: from :func:`meter_points`.
        path: where to write the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.6, 5.0))
    line = [-0.05, 1.05]
    axis.plot(line, line, color="0.3", linewidth=1.0, label="measured = predicted")
    band_low = [x - TOLERANCE_ASYNC for x in line]
    band_high = [x + TOLERANCE_ASYNC for x in line]
    axis.fill_between(line, band_low, band_high, color="0.85", label=f"+- {TOLERANCE_ASYNC:g}")
    for problem in sorted({p.problem for p in points}):
        measured = [p for p in points if p.problem == problem and math.isfinite(p.measured)]
        # Momentum 0 across M (the implicit momentum), and the set momenta without asynchrony.
        implicit = [p for p in measured if p.momentum == 0.0]
        readback = [p for p in measured if p.momentum != 0.0]
        for chosen, label, face in (
            (implicit, "momentum 0, M = " + ", ".join(str(p.workers) for p in implicit), None),
            (readback, "M = 1, momentum " + ", ".join(f"{p.momentum:g}" for p in readback), "none"),
        ):
            if not chosen:
                continue
            axis.errorbar(
                [p.predicted for p in chosen],
                [p.measured for p in chosen],
                yerr=[p.spread for p in chosen],
                marker=_PROBLEM_MARKERS.get(problem, "D"),
                linestyle="none",
                capsize=3,
                markerfacecolor=face,
                label=f"{problem}: {label}",
            )
    if not points:
        axis.text(0.5, 0.5, "not run in this sweep", ha="center", va="center", color="0.5")
    axis.set_xlim(*line)
    axis.set_ylim(*line)
    axis.set_xlabel("predicted total momentum: momentum + (1 - 1/M)")
    axis.set_ylabel("measured total momentum (MomentumMeter)")
    axis.set_title("The momentum meter against the queuing model", fontsize=10)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
