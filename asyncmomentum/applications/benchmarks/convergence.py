"""Convergence benchmark: steps to a target loss of each tuning rule, relative to the oracle.

Runs ``asyncmomentum sweep --quick`` (cached: a second run only reads the cache), prints its
steps-to-target table, and prints last, for the fixed 0.9 baseline and each rule of
``asyncmomentum.core.tuning.rules.rule_names()`` (additive, compositional, closed_loop, stability,
auto), the geometric mean of its steps over the oracle's (the best fixed momentum of the grid, per
cell), how many of its runs diverged (and how many of those where the oracle converges), and in how
many cells it needed more than 1.1 times the steps of the default additive rule. Below 1 a method
beats the grid; a method that does not reach the target counts at the step cap, a lower bound.

    python benchmarks/convergence.py                      # --quick size, all cores
    python benchmarks/convergence.py --jobs 2 --out DIR   # choose the workers and the cache
    python benchmarks/convergence.py --full               # the full sweep (about an hour)
    python benchmarks/convergence.py --smoke              # a smoke run: seconds, temp folder

The same runs as ``python -m asyncmomentum.applications.benchmarks.convergence`` (what
``asyncmomentum bench convergence`` does), from an installed wheel too.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence

from asyncmomentum.applications.sweep import FULL, QUICK, format_summary, format_table, run_sweep
from asyncmomentum.applications.sweep.command import DEFAULT_OUT
from asyncmomentum.applications.sweep.engine import SweepResult

#: ``--smoke`` (what ``asyncmomentum bench --quick`` runs): every rule on the quadratic, one
#: staleness model, M = 1 and 8, three momenta, two seeds, no meter check: seconds, to
#: show that the benchmark runs end to end, not to measure anything.
SMOKE = QUICK.with_changes(
    problems=("quadratic",),
    staleness_models=("geometric",),
    workers=(1, 8),
    momenta=(0.0, 0.5, 0.9),
    seeds=2,
    meter_workers=(),
)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's argument parser."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the full sweep, not --quick")
    size.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny sweep (quadratic only, every rule) in seconds, in a temporary folder "
        "unless --out is given: checks that the benchmark runs, measures nothing",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="worker processes (default: the available cores)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help=f"output and cache directory (default: ./{DEFAULT_OUT}; with --smoke a temporary "
        "folder, removed at the end)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep and print its table, then the geometric-mean ratios last.

    Returns 0, or 1 if a run failed (every other result is printed).

    Args:
        argv: command-line arguments (``None`` reads ``sys.argv``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    config = FULL if args.full else SMOKE if args.smoke else QUICK
    if args.out is None and args.smoke:
        with tempfile.TemporaryDirectory(prefix="asyncmomentum-convergence-") as out:
            return _report(run_sweep(config, out, jobs=args.jobs, progress=True))
    return _report(run_sweep(config, args.out or DEFAULT_OUT, jobs=args.jobs, progress=True))


def _report(result: SweepResult) -> int:
    print(format_table(result))
    print(format_summary(result))
    print("\ngeometric-mean steps to target / oracle's (cells with an oracle), divergences:")
    width = max(len(summary.label) for summary in result.summaries)
    for summary in result.summaries:
        print(
            f"  {summary.label:<{width}}  {summary.geomean_ratio:6.3f}  over {summary.cells} "
            f"cells; not converged in {summary.not_converged}; "
            f"diverged runs {summary.diverged_runs} of {summary.runs} "
            f"({summary.diverged_with_oracle} where the oracle converges); "
            f"> 1.1 x additive's steps in {summary.worse_than_additive} cells"
        )
    if result.failures:
        print(f"\n{len(result.failures)} runs failed:")
        for failure in result.failures:
            print(f"  {failure.describe()}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
