"""The ``asyncmomentum`` command."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from asyncmomentum import __version__
from asyncmomentum.applications import bench, demo, sweep


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``asyncmomentum`` command, with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="asyncmomentum",
        description="Momentum that retunes itself to the asynchrony of training.",
    )
    parser.add_argument("--version", action="version", version=f"asyncmomentum {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (demo, sweep, bench):
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.handler(args) or 0)
