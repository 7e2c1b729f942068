"""Progress output fit for a log: a bar on a terminal, a few plain lines elsewhere."""

from __future__ import annotations

import io

from asyncmomentum.applications.progress import LineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_a_terminal_gets_periodic_lines_and_no_carriage_returns():
    log = io.StringIO()
    progress = progress_bar(1000, "sweep: grid", unit="runs", file=log, interval=0.0)
    assert isinstance(progress, LineProgress)
    for _ in range(1000):
        progress.update()
    progress.close()
    text = log.getvalue()
    assert "\r" not in text
    assert text.splitlines()[-1].startswith("sweep: grid: 1000/1000 runs (100%) in ")


def test_lines_are_rate_limited_and_the_last_one_is_always_printed():
    log = io.StringIO()
    with progress_bar(50, "runs", file=log, interval=3600.0) as progress:
        for _ in range(50):
            progress.update()
    assert log.getvalue().count("\n") == 1  # the closing line only


def test_the_clock_starts_at_start_so_start_up_is_not_counted():
    log = io.StringIO()
    progress = LineProgress(10, "demo", "upd", log, interval=0.0)
    progress._started -= 3000.0  # start-up took 50 minutes...
    progress.start()  # ...then the first report came
    progress.to(5)
    assert "about 00:00 left" in log.getvalue()


def test_a_terminal_gets_a_bar_and_disabled_shows_nothing():
    terminal = Terminal()
    with progress_bar(3, "runs", file=terminal) as bar:
        bar.start()
        bar.to(3)
    assert "\r" in terminal.getvalue()
    quiet = io.StringIO()
    with progress_bar(3, "runs", file=quiet, enabled=False) as bar:
        bar.to(3)
    assert quiet.getvalue() == ""


def test_the_time_left_follows_the_work_when_units_differ_in_cost():
    log = io.StringIO()
    progress = LineProgress(4, "grid", "runs", log, interval=0.0, total_work=100.0)
    progress._started -= 60.0  # the first run, 90% of the work, took a minute
    progress.update(work=90.0)
    assert "1/4 runs (25%) in 01:00, about 00:07 left" in log.getvalue()  # not 3 minutes
