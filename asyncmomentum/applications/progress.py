"""Progress for people and for logs: a tqdm bar on a terminal, periodic lines elsewhere.

A bar redrawn with carriage returns is unreadable in a file or a CI log (one line, tens of
kilobytes). When the stream is not a terminal, :func:`progress_bar` prints one plain line every
``interval`` seconds and one at the end instead. The clock (rate, ETA) can start at the first
report (:meth:`Progress.start`), so that process start-up does not count as work.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["LineProgress", "Progress", "progress_bar"]

#: Seconds between two lines when the output is not a terminal.
LINE_INTERVAL = 30.0


def _clock(seconds: float) -> str:
    seconds = max(round(seconds), 0)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class Progress:
    """What both kinds of progress offer: ``to(n)``, ``update(dn)``, ``start()``, ``close()``."""

    n: int = 0
    total: int = 0

    def update(self, count: int = 1, work: float = 0.0) -> None:
        """Add ``count`` finished units, worth ``work`` of the ``total_work`` (if one was given)."""
        self.to(self.n + count)

    def to(self, value: int) -> None:  # pragma: no cover - overridden
        """Set the finished units to ``value`` (never backwards, never past the total)."""
        raise NotImplementedError

    def start(self) -> None:  # pragma: no cover - overridden
        """Restart the clock now: rate and ETA count from here (call at the first report)."""
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - overridden
        """Print the last state and stop."""
        raise NotImplementedError

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Disabled(Progress):
    def to(self, value: int) -> None:
        self.n = max(self.n, value)

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


class LineProgress(Progress):
    """Plain lines, for a file or a log: ``label: n/total (p%) in 01:02, about 03:04 left``.

    Args:
        total: units of work.
        label: what is counted.
        unit: the unit's name.
        file: where the lines go.
        interval: seconds between lines (a last line is printed by :meth:`close`).
        total_work: the units' estimated cost in all, when they differ (the sweep starts with
            its most expensive runs): the time left is then estimated from the work done, not
            from the count.
    """

    def __init__(
        self,
        total: int,
        label: str,
        unit: str,
        file: TextIO,
        interval: float = LINE_INTERVAL,
        total_work: float | None = None,
    ) -> None:
        self.total_work, self.work, self._base_work = total_work, 0.0, 0.0
        self.total, self.label, self.unit, self.file, self.interval = (
            total,
            label,
            unit,
            file,
            interval,
        )
        self.n = 0
        self._base = 0
        self._started = self._printed = time.monotonic()
        self._closed = False

    def start(self) -> None:
        """Restart the clock now."""
        self._started = self._printed = time.monotonic()
        self._base, self._base_work = self.n, self.work

    def update(self, count: int = 1, work: float = 0.0) -> None:
        """Add ``count`` finished units, worth ``work`` of ``total_work``."""
        self.work += work
        self.to(self.n + count)

    def to(self, value: int) -> None:
        """Set the finished units; prints a line if ``interval`` seconds passed since the last."""
        value = min(max(value, self.n), self.total)
        if value == self.n:
            return
        self.n = value
        if time.monotonic() - self._printed >= self.interval:
            self._print()

    def _print(self) -> None:
        now = time.monotonic()
        self._printed = now
        elapsed = now - self._started
        done = self.n - self._base
        text = f"{self.label}: {self.n}/{self.total} {self.unit}"
        if self.total:
            text += f" ({100.0 * self.n / self.total:.0f}%)"
        text += f" in {_clock(elapsed)}"
        if self.total_work and self.work > self._base_work and self.n < self.total:
            left = max(self.total_work - self.work, 0.0)
            text += f", about {_clock(elapsed / (self.work - self._base_work) * left)} left"
        elif done > 0 and self.n < self.total:
            text += f", about {_clock(elapsed / done * (self.total - self.n))} left"
        print(text, file=self.file, flush=True)

    def close(self) -> None:
        """Print the last line (once)."""
        if not self._closed:
            self._closed = True
            self._print()


class _Bar(Progress):
    def __init__(self, total: int, label: str, unit: str, file: TextIO) -> None:
        from tqdm.auto import tqdm

        self._bar: Any = tqdm(total=total, desc=label, unit=unit, file=file, dynamic_ncols=True)
        self.total = total

    # Read-only here: tqdm keeps the count (every write to n goes through the overridden to()).
    @property
    def n(self) -> int:  # type: ignore[override]
        return int(self._bar.n)

    def to(self, value: int) -> None:
        value = min(value, self.total)
        if value > self._bar.n:
            self._bar.update(value - self._bar.n)

    def start(self) -> None:
        # tqdm's rate is (n - initial) / (now - start_t), smoothed from the last print: count
        # from here, with what is already done as the starting point.
        now = self._bar._time()
        self._bar.start_t = self._bar.last_print_t = now
        self._bar.initial = self._bar.last_print_n = self._bar.n
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def progress_bar(
    total: int,
    label: str,
    *,
    unit: str = "it",
    enabled: bool = True,
    file: TextIO | None = None,
    interval: float = LINE_INTERVAL,
    total_work: float | None = None,
) -> Progress:
    """A progress display for ``total`` units: a bar on a terminal, else periodic lines.

    Args:
        total: units of work.
        label: what is counted (the bar's description).
        unit: the unit's name.
        enabled: ``False`` shows nothing.
        file: the stream (default: ``sys.stderr``).
        interval: seconds between lines when the stream is not a terminal.
        total_work: the units' estimated cost in all, for the time left (see
            :class:`LineProgress`); pass each unit's with ``update(work=...)``.
    """
    stream = sys.stderr if file is None else file
    if not enabled or total <= 0:
        return _Disabled()
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return _Bar(total, label, unit, stream)
    return LineProgress(total, label, unit, stream, interval, total_work)
