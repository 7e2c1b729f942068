"""``asyncmomentum bench``: run the project's benchmark scripts and print their figures.

The scripts live in ``benchmarks/`` of the source tree (each prints a ratio measured side by side
in one run); this command finds them next to the installed package, runs each in a fresh
interpreter so that none inherits another's threads or caches, and streams what they print.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["BENCHMARKS", "benchmarks_dir", "register", "run_bench_command"]

#: name -> (script, extra arguments for --quick)
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "step_overhead": ("step_overhead.py", ["--steps", "20"]),
    "async_throughput": ("async_throughput.py", ["--quick"]),
    "convergence": ("convergence.py", []),
}


def benchmarks_dir() -> Path | None:
    """The ``benchmarks/`` folder of the source tree this package runs from, if there is one."""
    candidate = Path(__file__).resolve().parents[2] / "benchmarks"
    return candidate if candidate.is_dir() else None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand.

    Args:
        subparsers: the ``asyncmomentum`` command's subparsers.
    """
    parser = subparsers.add_parser(
        "bench",
        help="run the benchmarks and print their figures",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, for a smoke run")
    parser.set_defaults(handler=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    """Run the chosen benchmarks one after another; returns the exit code.

    Args:
        args: parsed arguments of ``asyncmomentum bench``.
    """
    folder = benchmarks_dir()
    if folder is None:
        print(
            "asyncmomentum bench: the benchmark scripts ship with the source tree, not the wheel; "
            "clone the repository and install it with `pip install -e .`",
            file=sys.stderr,
        )
        return 2
    names = args.names or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(
            f"asyncmomentum bench: unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}",
            file=sys.stderr,
        )
        return 2
    failed = []
    for name in names:
        script, quick_args = BENCHMARKS[name]
        command = [sys.executable, str(folder / script), *(quick_args if args.quick else [])]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(command)
        print(f"== {name}: exit {code} after {time.perf_counter() - start:.0f} s\n", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"asyncmomentum bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
