"""A tuning rule against the default additive rule and the grid's oracle, cell by cell.

Reads the ``summary.json`` a sweep wrote (``asyncmomentum sweep --out DIR``) and prints, for the
whole sweep, the design half, the held-back half and each problem apart:

- the geometric mean of the rule's steps over the oracle's (cells with an oracle), and its worst
  cell;
- the cells where the rule needs more than ``--tolerance`` times the additive rule's steps,
  among those where additive converges;
- the cells where additive converges and the rule does not;
- the rule's diverged runs in cells where the oracle converges.

These are the terms of issue 20's acceptance (``docs/auto-rule.md``). No run is computed here:

    asyncmomentum sweep --seeds 3 --rules additive,auto --no-meter --out /tmp/full3
    python benchmarks/rule_acceptance.py /tmp/full3/summary.json --rule auto

The grid is most of a full sweep's cost (11 momenta per cell). To judge a new revision of a rule
without it, run the rules alone (``--momenta 0.9`` keeps only the baseline) and take the oracle
of each cell from a recorded full sweep's table, the one this repository keeps:

    asyncmomentum sweep --seeds 3 --rules additive,auto --momenta 0.9 --no-meter --out /tmp/r
    python benchmarks/rule_acceptance.py /tmp/r/summary.json --oracle docs/sweep-full-auto-table.md

The runs are deterministic for a machine, not across machines: the table's grid may have been
run on another CPU, whose floating-point sums differ in the last bits (2026-12-07: 4 of 96
cells of fixed 0.9 needed 3-10 % more or fewer steps on an AMD EPYC core than in that table).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from asyncmomentum.applications.sweep.analysis import DESIGN_PROBLEMS, DESIGN_WORKERS

Cell = dict[str, Any]


def _name(cell: Cell) -> str:
    return f"{cell['problem']} {cell['staleness']} M={cell['workers']}"


def is_design(cell: Cell) -> bool:
    """Whether ``cell`` is in the design half of the auto rule's constants."""
    return cell["problem"] in DESIGN_PROBLEMS and cell["workers"] in DESIGN_WORKERS


def report(cells: Sequence[Cell], rule: str, tolerance: float) -> list[str]:
    """The lines of one subset's report.

    Args:
        cells: the subset's cells, as in ``summary.json``.
        rule: the method label of the rule (e.g. ``"auto"``).
        tolerance: the largest ratio to additive's steps that counts as "within".
    """
    with_oracle = [c for c in cells if c["oracle_steps"] is not None]
    ratios = [(c["methods"][rule]["ratio"], c) for c in with_oracle]
    additive_ratios = [c["methods"]["additive"]["ratio"] for c in with_oracle]
    slower, lost, diverged = [], [], []
    for cell in cells:
        mine, additive = cell["methods"][rule], cell["methods"]["additive"]
        if additive["converged"]:
            if not mine["converged"]:
                lost.append(_name(cell))
            elif mine["steps"] > tolerance * additive["steps"]:
                slower.append(f"{_name(cell)} ({mine['steps'] / additive['steps']:.2f})")
        if cell["oracle_steps"] is not None and mine["diverged_runs"]:
            diverged.append(f"{_name(cell)} ({mine['diverged_runs']})")
    lines = [f"cells {len(cells)}, with an oracle {len(with_oracle)}"]
    if ratios:
        worst = max(ratios, key=lambda pair: pair[0])
        lines.append(
            f"  {rule}/oracle {_geomean([r for r, _ in ratios]):.2f} (worst {worst[0]:.2f}, "
            f"{_name(worst[1])}); additive/oracle {_geomean(additive_ratios):.2f}"
        )
    lines.append(f"  > {tolerance}x additive where additive converges: {len(slower)} {slower}")
    lines.append(f"  additive converges, {rule} does not: {len(lost)} {lost}")
    runs = sum(int(d.rsplit("(", 1)[1][:-1]) for d in diverged)
    lines.append(f"  {rule} runs diverged where the oracle converges: {runs} {diverged}")
    return lines


def oracle_from_table(path: Path) -> dict[tuple[str, str, int], float | None]:
    """Each cell's oracle steps from a full sweep's table (``docs/sweep-full-auto-table.md``).

    Args:
        path: the table: a section ``### <problem>: ...`` per problem, whose rows start
            ``| <staleness> | <M> | <oracle momentum> | <within 10 %> | <oracle steps> |``
            (``-`` where the grid has no oracle).
    """
    oracle: dict[tuple[str, str, int], float | None] = {}
    problem = None
    for line in path.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"### (\w+): ", line)
        if heading or line.startswith("### "):
            problem = heading.group(1) if heading else None
            continue
        fields = [field.strip() for field in line.strip().strip("|").split("|")]
        if problem is None or len(fields) < 5 or not fields[1].isdigit():
            continue
        steps = fields[4]
        oracle[(problem, fields[0], int(fields[1]))] = None if steps == "-" else float(steps)
    if not oracle:
        raise ValueError(f"{path}: no cell found (is it a full sweep's table?)")
    return oracle


def with_oracle_from(
    cells: list[Cell], oracle: dict[tuple[str, str, int], float | None]
) -> list[Cell]:
    """``cells`` with the oracle steps (and every method's ratio) of a recorded table.

    Args:
        cells: cells of a ``summary.json``; those the table lacks are dropped.
        oracle: :func:`oracle_from_table`'s answer.
    """
    out = []
    for cell in cells:
        key = (cell["problem"], cell["staleness"], cell["workers"])
        if key not in oracle:
            continue
        steps = oracle[key]
        methods = {
            name: {**stats, "ratio": None if steps is None else stats["steps"] / steps}
            for name, stats in cell["methods"].items()
        }
        out.append({**cell, "oracle_steps": steps, "methods": methods})
    return out


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def main(argv: Sequence[str] | None = None) -> None:
    """Print the report of ``--rule`` for a sweep's ``summary.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", type=Path, help="a sweep's summary.json")
    parser.add_argument("--rule", default="auto", help="the rule's label (default: auto)")
    parser.add_argument("--tolerance", type=float, default=1.1)
    parser.add_argument(
        "--oracle",
        type=Path,
        help="take the oracle from this full sweep's table instead (a sweep run without the grid)",
    )
    args = parser.parse_args(argv)
    cells = json.loads(args.summary.read_text(encoding="utf-8"))["cells"]
    cells = [c for c in cells if args.rule in c["methods"] and "additive" in c["methods"]]
    if args.oracle is not None:
        cells = with_oracle_from(cells, oracle_from_table(args.oracle))
    if not cells:
        parser.error(f"no cell of {args.summary} has runs of both {args.rule!r} and 'additive'")
    subsets: list[tuple[str, Callable[[Cell], bool]]] = [
        ("all", lambda c: True),
        ("design half", is_design),
        ("held-back half", lambda c: not is_design(c)),
    ]
    for problem in sorted({c["problem"] for c in cells}):
        subsets.append((problem, lambda c, p=problem: c["problem"] == p))
    for label, keep in subsets:
        chosen = [c for c in cells if keep(c)]
        if chosen:
            print(f"## {label}: " + "\n".join(report(chosen, args.rule, args.tolerance)))


if __name__ == "__main__":
    main()
