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
"""

from __future__ import annotations

import argparse
import json
import math
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


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def main(argv: Sequence[str] | None = None) -> None:
    """Print the report of ``--rule`` for a sweep's ``summary.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", type=Path, help="a sweep's summary.json")
    parser.add_argument("--rule", default="auto", help="the rule's label (default: auto)")
    parser.add_argument("--tolerance", type=float, default=1.1)
    args = parser.parse_args(argv)
    cells = json.loads(args.summary.read_text(encoding="utf-8"))["cells"]
    cells = [c for c in cells if args.rule in c["methods"] and "additive" in c["methods"]]
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
