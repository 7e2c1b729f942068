"""The two roles the callbacks play for each other, so that neither imports the other.

A :class:`StalenessSource` (e.g. :class:`~lightning_callbacks.StaleGradients`) knows the staleness
of every step and reports it to each :class:`StalenessObserver` of the trainer (e.g.
:class:`~lightning_callbacks.AsyncMomentumCallback`), which warns when it tunes an optimizer and
no source is there.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["ServedUpdates", "StalenessObserver", "StalenessSource"]


@runtime_checkable
class StalenessObserver(Protocol):
    """A callback that takes the staleness of the gradient the next optimizer step applies."""

    def observe_staleness(self, staleness: int, optimizer: Any = None) -> None:
        """Report the staleness of the next step's gradient.

        Args:
            staleness: updates applied between the read of the parameters and this gradient's
                application.
            optimizer: the optimizer that will apply it; ``None`` for all of them.
        """


class StalenessSource:
    """Marks a callback that reports the staleness of every step.

    It reports to the trainer's :class:`StalenessObserver` callbacks.
    """


@runtime_checkable
class ServedUpdates(Protocol):
    """A strategy whose updates a parameter server applies (e.g. the asynchronous strategy).

    The optimizers Lightning steps in each process then apply nothing; the server's own copies
    do, in the process that hosts the server (rank 0), from its threads.
    """

    @property
    def served_optimizers(self) -> list[Any]:
        """The optimizers that apply the updates in this process (empty where no server runs)."""
        ...

    @property
    def updates_per_second(self) -> float:
        """Updates the server applied per second so far (0 where no server runs)."""
        ...

    def add_update_listener(self, listener: Any) -> None:
        """Call ``listener(optimizer_index, staleness)`` after every applied update.

        It runs in the server's thread, right after the update.

        Args:
            listener: the function to call.
        """
        ...
