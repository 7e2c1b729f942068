"""``asyncmomentum bench``: run the project's benchmarks and print their figures.

The benchmarks are the modules of :mod:`asyncmomentum.applications.benchmarks` (each prints a
ratio measured side by side in one run), so they ship with the package, wheel included. This
command runs each as ``python -m asyncmomentum.applications.benchmarks.<name>`` in a fresh
interpreter, so that none inherits another's threads or caches, and streams what they print.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

__all__ = ["BENCHMARKS", "bench_command", "register", "run_bench_command"]

#: name -> extra arguments for --quick, in the order they run; each name is a module of
#: :mod:`asyncmomentum.applications.benchmarks` (a test checks that they match).
BENCHMARKS: dict[str, list[str]] = {
    "step_overhead": ["--steps", "20", "--repeats", "1"],
    "hogwild_throughput": ["--quick"],
    "server_throughput": ["--quick", "--runs", "1"],
    "convergence": ["--smoke"],
}


def bench_command(name: str, quick: bool = False) -> list[str]:
    """The command line that runs one benchmark in a fresh interpreter of this Python.

    Args:
        name: a key of :data:`BENCHMARKS`.
        quick: add the benchmark's arguments for a smoke run.
    """
    module = f"asyncmomentum.applications.benchmarks.{name}"
    return [sys.executable, "-m", module, *(BENCHMARKS[name] if quick else [])]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bench`` subcommand.

    Args:
        subparsers: the ``asyncmomentum`` command's subparsers.
    """
    parser = subparsers.add_parser(
        "bench",
        help="run the benchmarks and print their figures",
        description="Run the project's benchmarks, each in a fresh interpreter, and print "
        "their figures (--quick: a short form of each, to check that they run).",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short form of each benchmark (under a minute)"
    )
    parser.set_defaults(handler=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    """Run the chosen benchmarks one after another; returns the exit code.

    Args:
        args: parsed arguments of ``asyncmomentum bench``.
    """
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
        command = bench_command(name, quick=args.quick)
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
