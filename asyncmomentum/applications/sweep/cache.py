"""The sweep's cache: one JSON line per finished run, keyed by every parameter of the run.

Runs are deterministic given their :class:`~asyncmomentum.applications.sweep.runs.RunSpec`, so a
re-run only
computes what is missing. Lines are appended as runs finish (by the parent process only: no
locking needed) and flushed, so an interrupted (or killed) sweep keeps what it finished; a line
cut short by a crash is skipped when the cache is read back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from asyncmomentum.applications.problems import PROBLEMS_VERSION
from asyncmomentum.applications.sweep.runs import RunResult, RunSpec
from asyncmomentum.core.tuning.rules import rule_class

__all__ = ["CACHE_NAME", "CACHE_VERSION", "RunCache"]

CACHE_NAME = "cache.jsonl"
#: Bump when a change of the sweep's code changes what a run measures.
CACHE_VERSION = 1


def cache_key(spec: RunSpec) -> str:
    """The cache key of a run: the code versions, the rule's revision and every field of the spec.

    A rule's runs carry its :attr:`~asyncmomentum.core.tuning.rules.base.TuningRule.revision`,
    so changing one rule recomputes its runs only.
    """
    rule = spec.rule
    revision = "" if rule is None else f"|{rule}@{rule_class(rule).revision}"
    return f"sweep={CACHE_VERSION}|problems={PROBLEMS_VERSION}{revision}|{spec.key()}"


class RunCache:
    """Finished runs of a sweep, read from and appended to ``<directory>/cache.jsonl``.

    Args:
        directory: the sweep's output directory (must exist).
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / CACHE_NAME
        self._results: dict[str, RunResult] = {}
        self.skipped_lines = 0
        self._load()
        self._file: TextIO | None = None

    def _load(self) -> None:
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as lines:
            for line in lines:
                try:
                    entry = json.loads(line)
                    self._results[entry["key"]] = RunResult(**entry["result"])
                except (ValueError, KeyError, TypeError):
                    # A line cut short by an interrupted write, or from another cache format.
                    self.skipped_lines += 1

    def __len__(self) -> int:
        return len(self._results)

    def get(self, spec: RunSpec) -> RunResult | None:
        """The cached result of ``spec``, if any.

        Args:
            spec: the run.
        """
        return self._results.get(cache_key(spec))

    def put(self, spec: RunSpec, result: RunResult) -> None:
        """Record a finished run, in memory and on disk (flushed at once).

        Args:
            spec: the run.
            result: what it measured.
        """
        key = cache_key(spec)
        self._results[key] = result
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        entry = {"key": key, "result": result.to_dict()}
        self._file.write(json.dumps(entry, allow_nan=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file (reopened by the next :meth:`put`)."""
        if self._file is not None:
            self._file.close()
            self._file = None
