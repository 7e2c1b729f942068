"""One point of a training trace, as Hogwild and the parameter server record it."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["TracePoint"]


class TracePoint(NamedTuple):
    """The state of training after an applied update, for logs and plots (``zip(*trace)``).

    Hogwild records one per worker progress report (means since the worker's previous report);
    the parameter server one per applied update (``trace_every``), of that update alone.
    """

    #: Updates applied by all workers so far (this one included, on the server).
    update: int
    #: The worker's loss (Hogwild: its mean since its previous report; the server: on the batch
    #: it computed this gradient from, at stale parameters).
    loss: float
    #: Updates applied between the worker's read and its update (Hogwild: the mean since its
    #: previous report).
    staleness: float
    #: Momentum the optimizer applies (first parameter group).
    algorithmic_momentum: float
    #: Implicit momentum ``1 - 1/M_hat`` of the measured asynchrony.
    implicit_momentum: float
    #: The worker: Hogwild's rank (from 0), the server's worker rank (from 1).
    worker: int
    #: ``M_hat``, the estimated number of asynchronous workers.
    estimated_workers: float
    #: Seconds since training began (Hogwild: since the start signal; the server: since
    #: serving began).
    time: float
