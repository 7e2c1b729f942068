"""The sweep's outputs, written all together or not at all.

The CSV of every run, the steps-to-target table, a JSON summary and the figure.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from asyncmomentum.applications.output_dir import check_writable_dir
from asyncmomentum.applications.problems import get_problem
from asyncmomentum.applications.sweep.analysis import (
    DESIGN_PROBLEMS,
    DESIGN_WORKERS,
    Cell,
    MethodStats,
    MethodSummary,
    is_design_cell,
    kendall_tau,
    summarize,
    worst_ratio,
)
from asyncmomentum.applications.sweep.engine import SweepResult
from asyncmomentum.applications.sweep.meter_check import METER_FIGURE_NAME, format_meter, plot_meter
from asyncmomentum.core import formulas
from asyncmomentum.core.tuning.rules import make_rule

__all__ = [
    "CSV_NAME",
    "FIGURE_NAME",
    "METER_FIGURE_NAME",
    "SUMMARY_NAME",
    "TABLE_NAME",
    "SweepOutputError",
    "format_summary",
    "format_table",
    "oracle_trends",
    "plot_oracle",
    "prepare_output_dir",
    "write_outputs",
]

CSV_NAME = "runs.csv"
TABLE_NAME = "table.md"
SUMMARY_NAME = "summary.json"
FIGURE_NAME = "oracle_momentum.png"


class SweepOutputError(OSError):
    """The output directory cannot be created or written."""


# -- the output directory -------------------------------------------------------------------------


def prepare_output_dir(out: str | os.PathLike[str]) -> Path:
    """Create ``out`` if needed and check that files can be created in it.

    Args:
        out: the output directory.

    Raises:
        SweepOutputError: it cannot be created or written, with the reason and what to do.
    """
    try:
        return check_writable_dir(out)
    except OSError as error:
        raise SweepOutputError(
            f"cannot write the sweep's output to {str(out)!r}: {error.strerror}; "
            "pass --out a directory you can write to"
        ) from error


def write_outputs(result: SweepResult, out: Path) -> dict[str, Path]:
    """Write the CSV, the table, the summary and the figure into ``out``, all or nothing.

    Everything is first written into a staging directory inside ``out`` (same file system),
    then moved into place with atomic renames, the summary last; on any failure the staging
    directory is removed and no output file is created or replaced.

    Args:
        result: what :func:`~asyncmomentum.applications.sweep.engine.compute_sweep` returned.
        out: an existing, writable directory (see :func:`prepare_output_dir`).

    Returns:
        Output name -> final path.
    """
    try:
        staging = Path(tempfile.mkdtemp(prefix=".sweep-staging-", dir=out))
    except OSError as error:
        raise _unwritable(out, error) from error
    try:
        write_csv(result.rows, staging / CSV_NAME)
        (staging / TABLE_NAME).write_text(
            format_table(result)
            + "\n"
            + format_summary(result)
            + "\n\n"
            + format_meter(result.meter, result.config.meter_steps)
            + "\n",
            encoding="utf-8",
        )
        plot_oracle(result, staging / FIGURE_NAME)
        plot_meter(result.meter, staging / METER_FIGURE_NAME)
        (staging / SUMMARY_NAME).write_text(
            json.dumps(_strict_json(summary_dict(result)), indent=2, allow_nan=False) + "\n",
            encoding="utf-8",
        )
        files = {}
        for name in (CSV_NAME, TABLE_NAME, FIGURE_NAME, METER_FIGURE_NAME, SUMMARY_NAME):
            os.replace(staging / name, out / name)
            files[name] = out / name
        return files
    except OSError as error:
        raise _unwritable(out, error) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by ``None``: strict JSON has neither."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value


def _unwritable(out: Path, error: OSError) -> SweepOutputError:
    return SweepOutputError(
        f"could not write the sweep's outputs into {str(out)!r}: {error}; the finished runs are "
        "cached there: free space or fix permissions and run the same command again"
    )


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Every run as one CSV row.

    Args:
        rows: the rows, all with the same keys.
        path: the file to write.
    """
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


# -- the table ------------------------------------------------------------------------------------


def _steps(stats: MethodStats, cell: Cell) -> str:
    if stats.failed == len(stats.statuses):
        return "**failed**"
    mark = f" **{stats.failed} failed**" if stats.failed else ""
    return _finished_steps(stats, cell) + mark


def _finished_steps(stats: MethodStats, cell: Cell) -> str:
    ratio = cell.ratio(stats)
    if stats.converged:
        text = f"{stats.median:.0f}"
        return text if ratio is None else f"{text} ({ratio:.2f})"
    text = f">={stats.max_steps}" if stats.diverged == 0 else "div"
    return text if ratio is None else f"{text} (>={ratio:.2f})"


def _momentum_text(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+.2f}"


def _oracle_text(cell: Cell) -> tuple[str, str, str]:
    if cell.oracle is None:
        return "none", "-", "-"
    near = cell.near_optimal
    band = f"{min(near):g}..{max(near):g}" if len(near) > 1 else f"{near[0]:g}"
    return f"{cell.oracle.momentum:g}", band, f"{cell.oracle.median:.0f}"


def format_table(result: SweepResult) -> str:
    """The steps-to-target table, one section per problem, as Markdown.

    Each row is a cell (staleness model, ``M``): the oracle momentum of the grid and its median
    steps, the momenta within 10% of it, then the baseline and each rule as median steps with
    the ratio to the oracle in parentheses (``>=cap`` when most seeds did not reach the target,
    ``div`` when some of those diverged), the momentum each rule applied (mean over the run),
    and the number of diverged runs of each.

    Args:
        result: a computed sweep.
    """
    config = result.config
    baseline = float(config.target_momentum)
    rules = list(config.rule_names)
    methods = [f"fixed {baseline:g}", *rules]
    lines = [
        "Steps: median over seeds of the updates needed to bring the full training loss to the "
        "target (evaluated every few updates); in parentheses, the ratio to the oracle, the "
        "fastest fixed momentum of the grid. `>=N`: most seeds did not reach the target "
        "within the cap of N updates; `div`: some of those diverged. `mom.`: the momentum a rule "
        "applied (mean over the run and the seeds that did not diverge). `failed`: runs that "
        "raised an error (listed below the tables; they count at the cap).",
        "",
    ]
    for problem in config.problems:
        cells = [c for c in result.cells if c.problem == problem]
        if problem in result.skipped_problems:
            lines += [f"### {problem}: **not run**: {result.skipped_problems[problem]}", ""]
        if not cells:
            continue
        choice = result.learning_rates[problem]
        lines += [
            f"### {problem}: lr {choice.lr:.4g} ({choice.safety:g} x {choice.fastest:g}, the "
            f"fastest of the lr grid at M = 1), target loss {get_problem(problem).target_loss:g}, "
            f"cap {cells[0].max_steps} steps, {config.seeds} seeds",
            "",
            "| staleness | M | oracle mom. | within 10% | oracle steps | "
            + " | ".join(methods)
            + " | "
            + " | ".join(f"{rule} mom." for rule in rules)
            + " | diverged runs ("
            + " / ".join(methods)
            + ") |",
            "|" + "---|" * (5 + len(methods) + len(rules) + 1),
        ]
        for cell in cells:
            oracle, band, steps = _oracle_text(cell)
            if cell.failed_runs:
                oracle = f"{oracle} (**failed runs: {cell.failed_runs}**)"
            stats = [cell.fixed[baseline], *(cell.rules[rule] for rule in rules)]
            lines.append(
                f"| {cell.staleness} | {cell.workers} | {oracle} | {band} | {steps} | "
                + " | ".join(_steps(s, cell) for s in stats)
                + " | "
                + " | ".join(_momentum_text(cell.rules[rule].applied_momentum) for rule in rules)
                + " | "
                + " / ".join(str(s.diverged) for s in stats)
                + " |"
            )
        lines.append("")
    lines += format_failures(result)
    return "\n".join(lines)


def format_failures(result: SweepResult) -> list[str]:
    """The runs that raised, one line each (nothing when none did).

    Args:
        result: a computed sweep.
    """
    if not result.failures:
        return []
    lines = [f"### Failed runs: {len(result.failures)} (not cached: a re-run tries them again)", ""]
    lines += [f"- {failure.describe()}" for failure in result.failures]
    return [*lines, ""]


def oracle_trends(result: SweepResult) -> list[dict[str, Any]]:
    """The oracle momentum against ``M`` per problem and staleness model, with Kendall's tau.

    Args:
        result: a computed sweep.

    Returns:
        One dict per (problem, staleness model): ``workers``, ``oracle`` (``None`` where no
        grid momentum converged) and ``kendall_tau`` over the cells with an oracle (negative:
        the oracle momentum decreases as ``M`` grows).
    """
    trends = []
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in result.cells:
        groups.setdefault((cell.problem, cell.staleness), []).append(cell)
    for (problem, staleness), cells in groups.items():
        with_oracle = [c for c in cells if c.oracle is not None]
        tau = kendall_tau(
            [math.log(c.workers) for c in with_oracle],
            [c.oracle.momentum for c in with_oracle if c.oracle is not None],
        )
        trends.append(
            {
                "problem": problem,
                "staleness": staleness,
                "workers": [c.workers for c in cells],
                "oracle": [None if c.oracle is None else c.oracle.momentum for c in cells],
                "kendall_tau": tau,
            }
        )
    return trends


def format_summary(result: SweepResult) -> str:
    """The oracle's trend against ``M`` and the geometric-mean ratio of each method, as Markdown.

    Args:
        result: a computed sweep.
    """
    lines = ["### Oracle momentum against M", ""]
    lines += [
        "| problem | staleness | oracle momentum at M = ... | Kendall tau |",
        "|---|---|---|---|",
    ]
    for trend in oracle_trends(result):
        values = ", ".join(
            f"{m}: {'none' if o is None else f'{o:g}'}"
            for m, o in zip(trend["workers"], trend["oracle"], strict=True)
        )
        tau = trend["kendall_tau"]
        lines.append(f"| {trend['problem']} | {trend['staleness']} | {values} | {tau:+.2f} |")
    problems = list(result.config.problems)
    lines += [
        "",
        "### Steps to target relative to the oracle (geometric mean over cells with an oracle)",
        "",
        "| method | all cells | "
        + " | ".join(problems)
        + " | cells not converged | diverged runs (where the oracle converges) "
        + "| cells > 1.1 x additive's steps |",
        "|" + "---|" * (6 + len(problems) - 1),
    ]
    per_problem = {p: _summaries_for(result, p) for p in problems}
    for summary in result.summaries:
        parts = []
        for problem in problems:
            match = per_problem[problem].get(summary.label)
            parts.append("-" if match is None else _geomean_text(match.geomean_ratio, match.cells))
        lines.append(
            f"| {summary.label} | {_geomean_text(summary.geomean_ratio, summary.cells)} | "
            + " | ".join(parts)
            + f" | {summary.not_converged} of {summary.cells} | "
            f"{summary.diverged_runs} of {summary.runs} ({summary.diverged_with_oracle}) | "
            f"{summary.worse_than_additive} of {summary.cells} |"
        )
    lines += _format_halves(result)
    lines += [
        "",
        f"{result.computed} runs computed, {result.cached} from the cache, "
        f"in {result.seconds:.0f} s."
        + (f" **{len(result.failures)} runs failed** (listed above)." if result.failures else ""),
    ]
    return "\n".join(lines)


def _format_halves(result: SweepResult) -> list[str]:
    """Each rule on the design half of the cells and on the held-back half, apart."""
    halves = {
        "design": [c for c in result.cells if is_design_cell(c)],
        "held back": [c for c in result.cells if not is_design_cell(c)],
    }
    baseline = float(result.config.target_momentum)
    lines = [
        "",
        "### Design half and held-back half (geometric mean; worst cell)",
        "",
        f"Design half: {', '.join(DESIGN_PROBLEMS)} at M in "
        f"{{{', '.join(map(str, DESIGN_WORKERS))}}}; held back: every other cell.",
        "",
        "| method | design half | worst design cell | held-back half | worst held-back cell |",
        "|---|---|---|---|---|",
    ]
    summaries = {name: summarize(cells, baseline) for name, cells in halves.items()}
    for rule in result.config.rule_names:
        parts = []
        for name, cells in halves.items():
            match = next((s for s in summaries[name] if s.label == rule), None)
            worst = worst_ratio(cells, rule)
            parts.append("-" if match is None else _geomean_text(match.geomean_ratio, match.cells))
            parts.append("-" if math.isnan(worst) else f"{worst:.2f}")
        lines.append(f"| {rule} | " + " | ".join(parts) + " |")
    return lines


def _geomean_text(value: float, cells: int) -> str:
    return "-" if math.isnan(value) else f"{value:.2f} (n={cells})"


def _summaries_for(result: SweepResult, problem: str) -> dict[str, MethodSummary]:
    cells = [c for c in result.cells if c.problem == problem]
    return {s.label: s for s in summarize(cells, float(result.config.target_momentum))}


def summary_dict(result: SweepResult) -> dict[str, Any]:
    """A JSON-ready digest: learning rates, each cell's oracle and ratios, the summaries.

    Args:
        result: a computed sweep.
    """
    baseline = float(result.config.target_momentum)
    cells = []
    for cell in result.cells:
        methods = {f"fixed {baseline:g}": cell.fixed[baseline], **cell.rules}
        cells.append(
            {
                "problem": cell.problem,
                "staleness": cell.staleness,
                "workers": cell.workers,
                "oracle_momentum": None if cell.oracle is None else cell.oracle.momentum,
                "oracle_steps": None if cell.oracle is None else cell.oracle.median,
                "near_optimal": list(cell.near_optimal),
                "methods": {
                    label: {
                        "steps": stats.median,
                        "ratio": cell.ratio(stats),
                        "converged": stats.converged,
                        "diverged_runs": stats.diverged,
                        "applied_momentum": stats.applied_momentum,
                    }
                    for label, stats in methods.items()
                },
            }
        )
    return {
        "learning_rates": {
            p: {
                "lr": c.lr,
                "fastest": c.fastest,
                "safety": c.safety,
                "median_steps": {f"{lr:g}": v for lr, v in c.median_steps.items()},
            }
            for p, c in result.learning_rates.items()
        },
        "summaries": [vars(s) for s in result.summaries],
        "failures": [
            {"phase": f.phase, "run": f.spec.key(), "error": f.error} for f in result.failures
        ],
        "skipped_problems": dict(result.skipped_problems),
        "trends": oracle_trends(result),
        "cells": cells,
        "meter": [point.to_dict() for point in result.meter],
        "computed": result.computed,
        "cached": result.cached,
        "seconds": result.seconds,
    }


# -- the figure -----------------------------------------------------------------------------------

_RULE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")


def plot_oracle(result: SweepResult, path: Path) -> None:
    """The paper's kind of figure: the oracle momentum against ``M`` with each rule's prediction.

    One panel per problem (rows) and staleness model (columns). Black dots: the oracle (best
    fixed momentum of the grid), with a bar over the momenta within 10% of its steps; crosses at
    the bottom: cells where no grid momentum converged. Lines: each rule's algorithmic momentum
    for a known ``M`` (target 0.9, clipped); open markers: the momentum the rule actually applied
    from its own estimate of ``M`` (mean over the runs). Dashed: the fixed baseline.

    Args:
        result: a computed sweep.
        path: the PNG to write.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the sweep's figure needs matplotlib: pip install 'asyncmomentum[examples]'"
        ) from None
    config = result.config
    problems = [p for p in config.problems if any(c.problem == p for c in result.cells)]
    models = list(config.staleness_models)
    figure, axes = plt.subplots(
        len(problems),
        len(models),
        figsize=(max(4.4 * len(models), 9.0), 3.4 * len(problems) + 0.8),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    handles: dict[str, Any] = {}
    for row, problem in enumerate(problems):
        for column, model in enumerate(models):
            cells = [c for c in result.cells if c.problem == problem and c.staleness == model]
            _draw_panel(axes[row][column], cells, result, handles)
            lr = result.learning_rates[problem].lr
            axes[row][column].set_title(
                f"{problem}, {model.replace('_', '-')} (lr {lr:.3g})", fontsize=10
            )
            if row == len(problems) - 1:
                axes[row][column].set_xlabel("asynchronous workers M")
            if column == 0:
                axes[row][column].set_ylabel("algorithmic momentum")
    figure.suptitle(
        "Best fixed momentum (oracle) against the number of workers, at a fixed learning rate",
        fontsize=12,
    )
    ticks = sorted({cell.workers for cell in result.cells})
    for axis in axes.flat:  # after every panel: a shared axis takes the last panel's settings
        axis.set_xticks(ticks, [str(m) for m in ticks])
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    labels = sorted(handles, key=_legend_order)
    columns = 3 if len(models) >= 3 else 2  # a legend column needs about 4 inches
    figure.legend(
        [handles[label] for label in labels],
        labels,
        loc="lower center",
        ncol=columns,
        frameon=False,
        fontsize=9,
    )
    # Room at the bottom for the shared legend, at the top for the title.
    legend_rows = -(-len(labels) // columns)
    bottom = (0.25 * legend_rows + 0.15) / figure.get_figheight()
    figure.tight_layout(rect=(0, bottom, 1, 1 - 0.45 / figure.get_figheight()))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _legend_order(label: str) -> tuple[int, str, bool]:
    # The oracle, the baseline, each rule's prediction then what it applied, then the misses.
    if label.startswith("oracle"):
        return (0, label, False)
    if label.startswith("fixed"):
        return (1, label, False)
    if label.startswith("no grid"):
        return (3, label, False)
    rule, _, kind = label.partition(":")
    return (2, rule, "applied" in kind)


def _draw_panel(axis: Any, cells: list[Cell], result: SweepResult, handles: dict[str, Any]) -> None:
    config = result.config
    axis.set_xscale("log", base=2)
    axis.set_ylim(-1.0, 1.0)
    axis.grid(True, alpha=0.3)
    axis.axhline(0.0, color="0.6", linewidth=0.8)
    if not cells:
        axis.text(
            0.5, 0.5, "not run in this sweep", ha="center", va="center",
            transform=axis.transAxes, color="0.5",
        )  # fmt: skip
        return
    workers = [c.workers for c in cells]
    baseline = float(config.target_momentum)
    handles[f"fixed {baseline:g} (baseline)"] = axis.axhline(
        baseline, color="0.35", linestyle="--", linewidth=1.0
    )
    smooth = np.geomspace(1.0, max(max(workers), 2), 200)
    for index, rule in enumerate(config.rule_names):
        color = _RULE_COLORS[index % len(_RULE_COLORS)]
        tuning = make_rule(rule)
        if not tuning.stateful:  # a formula of M; the feedback rules have no curve to draw
            bounds = formulas.DEFAULT_MOMENTUM_BOUNDS
            try:
                predicted = [
                    tuning.algorithmic_momentum(
                        baseline, formulas.implicit_momentum(m), bounds=bounds
                    )
                    for m in smooth
                ]
            except Exception:  # a broken rule: its runs are reported as failed, no curve
                predicted = None
            if predicted is not None:
                (line,) = axis.plot(smooth, predicted, color=color, linewidth=1.6)
                handles[f"{rule}: prediction for a known M"] = line
        ran = [c for c in cells if rule in c.rules]
        marker = axis.scatter(
            [c.workers for c in ran],
            [c.rules[rule].applied_momentum for c in ran],
            facecolors="none",
            edgecolors=color,
            s=36,
            zorder=3,
        )
        handles[f"{rule}: applied (mean over the run)"] = marker
    with_oracle = [c for c in cells if c.oracle is not None]
    if with_oracle:
        xs = [c.workers for c in with_oracle]
        ys = [c.oracle.momentum for c in with_oracle if c.oracle is not None]
        low = [y - min(c.near_optimal) for c, y in zip(with_oracle, ys, strict=True)]
        high = [max(c.near_optimal) - y for c, y in zip(with_oracle, ys, strict=True)]
        bars = axis.errorbar(
            xs, ys, yerr=[low, high], color="black", marker="o", markersize=6,
            linewidth=1.2, capsize=3, zorder=4,
        )  # fmt: skip
        handles["oracle: best grid momentum (bar: within 10%)"] = bars
    missing = [c.workers for c in cells if c.oracle is None]
    if missing:
        cross = axis.scatter(missing, [-0.93] * len(missing), marker="x", color="crimson", s=40)
        handles["no grid momentum converged"] = cross
