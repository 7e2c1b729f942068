"""Ending child processes: the one way every runtime stops what it started.

Hogwild's supervisor and the parameter server's launcher talk to their children differently
(progress streamed over pipes; one result per child), but end them the same way: wait until a
deadline, then SIGTERM, then SIGKILL, so that nothing outlives its launcher and nothing waits
forever.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

__all__ = ["end_processes"]


def end_processes(processes: Sequence[Any], deadline: float, grace: float) -> None:
    """Join every child until ``deadline``; terminate, then kill, the ones still running.

    Args:
        processes: the children (``multiprocessing`` processes).
        deadline: ``time.monotonic()`` until which they may end by themselves (0: now).
        grace: seconds between SIGTERM and SIGKILL, and after SIGKILL.
    """
    for process in processes:
        process.join(timeout=max(deadline - time.monotonic(), 0.0))
    alive = [process for process in processes if process.is_alive()]
    for process in alive:
        process.terminate()
    for process in alive:
        process.join(timeout=grace)
        if process.is_alive():
            process.kill()
            process.join(timeout=grace)
