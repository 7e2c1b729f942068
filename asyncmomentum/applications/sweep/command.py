"""Entry points of the sweep: :func:`run_sweep` (Python) and ``asyncmomentum sweep`` (CLI)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asyncmomentum.applications.problems import PROBLEMS
from asyncmomentum.applications.sweep.cache import RunCache
from asyncmomentum.applications.sweep.config import FULL, QUICK, SweepConfig
from asyncmomentum.applications.sweep.engine import SweepError, SweepResult, compute_sweep
from asyncmomentum.applications.sweep.report import (
    SweepOutputError,
    format_summary,
    format_table,
    prepare_output_dir,
    write_outputs,
)
from asyncmomentum.core.tuning.rules import rule_names
from asyncmomentum.core.validation import check_int, check_momentum
from asyncmomentum.runtimes.simulate import STALENESS_MODELS

__all__ = ["DEFAULT_OUT", "register", "run_sweep", "run_sweep_command"]

#: Where ``asyncmomentum sweep`` writes unless told otherwise.
DEFAULT_OUT = "asyncmomentum-sweep"

#: The subcommand's description (``--help``).
DESCRIPTION = (
    "Grid-search the algorithmic momentum (negative included) for M asynchronous "
    "workers under several staleness models on five problems, at one learning rate "
    "tuned at M = 1; run the fixed 0.9 baseline and every tuning rule the same way; "
    "write a CSV of every run, a steps-to-target table and a figure. Cached: a re-run "
    "only computes what is missing."
)


def run_sweep(
    config: SweepConfig = QUICK,
    out: str | os.PathLike[str] | None = DEFAULT_OUT,
    *,
    jobs: int = 1,
    progress: bool = False,
) -> SweepResult:
    """Run the paper's experiment: grid-searched momentum, the rules and the baseline.

    Args:
        config: what to run (:data:`~asyncmomentum.applications.sweep.config.QUICK`,
            :data:`~asyncmomentum.applications.sweep.config.FULL` or your own).
        out: output directory: the run cache (``cache.jsonl``) and, once everything is
            computed, ``runs.csv``, ``table.md``, ``summary.json`` and ``oracle_momentum.png``.
            ``None`` writes nothing and caches nothing.
        jobs: worker processes (>= 1); each run uses one thread.
        progress: show progress bars on stderr.

    Returns:
        The :class:`~asyncmomentum.applications.sweep.engine.SweepResult`; its ``files`` name what
        was
        written.

    Raises:
        SweepOutputError: ``out`` cannot be created or written (checked before any run).
        SweepError: no learning rate of a problem's grid converges. A run that raises does
            not stop the sweep: it is in the result's ``failures`` and marked in the table.
    """
    check_int(jobs, "jobs (worker processes)", 1)
    if out is None:
        return compute_sweep(config, None, jobs=jobs, progress=progress)
    directory = prepare_output_dir(out)
    cache = RunCache(directory)
    try:
        result = compute_sweep(config, cache, jobs=jobs, progress=progress)
    finally:
        cache.close()
    result.files = write_outputs(result, directory)
    return result


# -- the command line ------------------------------------------------------------------------------


def _split(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
    return items


def _names(known: tuple[str, ...] | list[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = _split(text)
        unknown = [name for name in names if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}"
            )
        return tuple(names)

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _workers(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(item) for item in _split(text))


def _momenta(text: str) -> tuple[float, ...]:
    values = []
    for item in _split(text):
        try:
            value = float(item)  # the command line's text; check_momentum takes no strings
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"momentum must be a number in (-1, 1), got {item!r}"
            ) from None
        try:
            values.append(check_momentum(value, "momentum"))
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return tuple(values)


def _safety(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value!r}")
    return value


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``sweep`` subcommand.

    Args:
        subparsers: the ``asyncmomentum`` command's subparsers.
    """
    parser = subparsers.add_parser(
        "sweep",
        help="the paper's experiment: oracle momentum against M, and how each rule does",
        description=DESCRIPTION,
    )
    add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sweep's options to ``parser`` and make :func:`run_sweep_command` its handler.

    Args:
        parser: the ``sweep`` subcommand's parser (or a stand-alone one).
    """
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer momenta (8), seeds (3) and CNN cells: minutes on two cores",
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"output and cache directory (default: ./{DEFAULT_OUT})",
    )
    parser.add_argument(
        "--jobs",
        type=_positive_int,
        default=_available_cores(),
        metavar="N",
        help="worker processes (default: the available cores)",
    )
    parser.add_argument(
        "--problems",
        type=_names(list(PROBLEMS)),
        metavar="P[,P...]",
        help=f"only these problems, of {', '.join(PROBLEMS)}",
    )
    parser.add_argument(
        "--staleness",
        type=_names(STALENESS_MODELS),
        metavar="S[,S...]",
        help=f"only these staleness models, of {', '.join(STALENESS_MODELS)}",
    )
    parser.add_argument(
        "--workers", type=_workers, metavar="M[,M...]", help="only these worker counts"
    )
    parser.add_argument(
        "--momenta", type=_momenta, metavar="MU[,MU...]", help="the momentum grid instead"
    )
    parser.add_argument("--seeds", type=_positive_int, metavar="N", help="seeds per setting")
    parser.add_argument(
        "--rules",
        type=_names(rule_names()),
        metavar="R[,R...]",
        help=f"only these tuning rules, of {', '.join(rule_names())}",
    )
    parser.add_argument(
        "--lr-safety",
        type=_safety,
        metavar="F",
        help="learning rate = F x the fastest of the lr grid at M = 1 (default 0.5)",
    )
    parser.add_argument(
        "--no-meter", action="store_true", help="skip the check of the momentum meter"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_sweep_command, sweep_parser=parser)


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """The sweep configuration the arguments ask for.

    Args:
        args: parsed ``asyncmomentum sweep`` arguments.
    """
    config = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    for option, name in (
        ("problems", "problems"),
        ("staleness", "staleness_models"),
        ("workers", "workers"),
        ("momenta", "momenta"),
        ("seeds", "seeds"),
        ("rules", "rules"),
        ("lr_safety", "lr_safety"),
    ):
        value = getattr(args, option, None)
        if value is not None:
            changes[name] = value
    if getattr(args, "no_meter", False):
        changes["meter_workers"] = ()
    return config.with_changes(**changes) if changes else config


def _usage_error(args: argparse.Namespace, message: str) -> int:
    parser = getattr(args, "sweep_parser", None)
    if parser is not None:
        parser.error(message)  # exits with status 2
    print(f"asyncmomentum sweep: error: {message}", file=sys.stderr)
    return 2


def run_sweep_command(args: argparse.Namespace) -> int:
    """Run ``asyncmomentum sweep``; returns the exit code.

    Args:
        args: parsed arguments (see :func:`register`).

    Returns:
        0 on success, 1 if a run failed (every other result is written) or the sweep could not
        be completed, 2 for bad arguments or an unwritable ``--out``,
        130 if interrupted.
    """
    try:
        config = config_from_args(args)
    except ValueError as error:
        return _usage_error(args, str(error))
    try:
        prepare_output_dir(args.out)
    except SweepOutputError as error:
        return _usage_error(args, str(error))
    started = time.perf_counter()
    try:
        result = run_sweep(config, args.out, jobs=args.jobs, progress=not args.no_progress)
    except (SweepError, SweepOutputError) as error:
        print(f"asyncmomentum sweep: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\nasyncmomentum sweep: interrupted; finished runs are cached in {args.out}, "
            "run the same command again to continue",
            file=sys.stderr,
        )
        return 130
    print(format_table(result))
    print(format_summary(result))
    print(f"\nwrote {', '.join(str(Path(p)) for p in result.files.values())}")
    print(f"wall time {time.perf_counter() - started:.0f} s with --jobs {args.jobs}")
    if result.failures or result.skipped_problems:
        lines = [failure.describe() for failure in result.failures]
        lines += [f"{p}: not run: {why}" for p, why in result.skipped_problems.items()]
        print(
            f"asyncmomentum sweep: error: {len(result.failures)} runs failed; every other result "
            f"is in {args.out} (failed runs are marked in table.md and not cached):\n  "
            + "\n  ".join(lines),
            file=sys.stderr,
        )
        return 1
    return 0
