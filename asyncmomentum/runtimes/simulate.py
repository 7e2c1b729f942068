"""Seeded stale-gradient simulators: what ``M`` asynchronous workers would do to a model.

Two layers:

* **Staleness models** (:class:`StalenessModel`): endless, seeded streams of the staleness ``tau``
  of successive updates, i.e. the number of updates other workers applied between the moment a
  worker read the parameters and the moment its gradient is applied.

  - :func:`geometric`: ``P(tau = l) = (1 - q) q^l``, the model of Mitliagkas et al. (2016).
  - :func:`workers`: a true event queue of ``M`` workers with exponential compute times (equal
    rates, or heterogeneous ones to model stragglers).
  - :func:`round_robin`: ``M`` workers in lock step, ``tau = M - 1`` exactly.

* **The simulator** (:func:`simulate`): runs asynchronous SGD on one core, deterministically, for
  any ``nn.Module`` and any torch optimizer: each gradient is computed at the parameters of
  ``tau`` updates ago, kept in a bounded :class:`SnapshotRing`.

Theory of the worker queue. Worker ``i`` computes for an ``Exp(r_i)`` time; let ``R = sum r``.
While worker ``i`` computes, the others apply updates at total rate ``R - r_i`` and ``i``
finishes at rate ``r_i``; by memorylessness the number of updates that land first is geometric,
``P(tau = l | i) = p_i (1 - p_i)^l`` with ``p_i = r_i / R``. A share ``p_i`` of all updates comes
from worker ``i``, so ``tau`` is the mixture

    P(tau = l) = sum_i p_i^2 (1 - p_i)^l,     E[tau] = sum_i (1 - p_i) = M - 1.

With equal rates (``p_i = 1/M``) this is exactly geometric with ``q = 1 - 1/M``. With unequal
rates the mean is still ``M - 1`` but the distribution spreads: more updates are fresh
(``P(tau = 0) = sum p_i^2 > 1/M``) and the far tail decays like ``(1 - p_min)^l``, slower than
``(1 - 1/M)^l``, because the straggler's rare updates are very stale. For rates ``[1, 1, 1, 0.1]``
the variance is 60.6 instead of 12, ``P(tau >= 40)`` is 8.7e-3 instead of 1.0e-5 and the 99 %
quantile is 35 instead of 16, while ``P(tau >= 10)`` is *lower*, 0.043 instead of 0.056 (the
tails cross at ``l = 13``). The mean, hence ``M = 1 + E[tau]``, does not see the difference, and
not only on average: every update adds one to the staleness of the ``M - 1`` gradients in flight,
so over any ``N`` consecutive updates the mean staleness is ``M - 1`` up to a boundary term (the
staleness in flight at the window's ends, divided by ``N``), whatever the rates. An estimator that
clips the tail (to resist stragglers) reads a smaller ``M`` under heterogeneous rates.
"""

from __future__ import annotations

import abc
import heapq
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from asyncmomentum.core import formulas
from asyncmomentum.core.optimizer import NonFiniteGradientError
from asyncmomentum.core.validation import check_choice, check_int, check_real
from asyncmomentum.runtimes.adapter import OptimizerView
from asyncmomentum.runtimes.batch_size import batch_size_of

__all__ = [
    "STALENESS_MODELS",
    "GeometricStaleness",
    "History",
    "RoundRobinStaleness",
    "SnapshotRing",
    "StalenessModel",
    "WorkerQueueStaleness",
    "geometric",
    "round_robin",
    "simulate",
    "staleness_model",
    "workers",
]

#: Names accepted by :func:`staleness_model`, for command lines and sweeps.
STALENESS_MODELS: tuple[str, ...] = ("geometric", "exponential", "round_robin")

#: Tail mass beyond the default cap of an unbounded staleness distribution: draws above the
#: ``(1 - 1e-6)`` quantile are clamped to it, which bounds the snapshots a simulator keeps.
DEFAULT_TAIL_MASS = 1e-6

# Draws per numpy call in the geometric stream: vectorized sampling without unbounded memory.
_CHUNK = 4096


def _as_generator(seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(check_int(seed, "seed (or a numpy Generator)", 0))


class StalenessModel(abc.ABC):
    """An endless, seeded source of staleness values ``tau``.

    Attributes:
        name: the model's family, one of :data:`STALENESS_MODELS`.
        workers: the nominal number of asynchronous workers ``M`` it models (may be fractional
            for :func:`geometric`, where it is ``1 / (1 - q)``).
        max_staleness: every draw is ``<= max_staleness``; a simulator keeps
            ``max_staleness + 1`` parameter snapshots at most.
    """

    name: str
    workers: float
    max_staleness: int

    @abc.abstractmethod
    def stream(self, seed: int | np.random.Generator) -> Iterator[int]:
        """Endless staleness values, the same sequence for the same integer seed.

        Args:
            seed: a non-negative integer, or a numpy ``Generator`` to draw from (which advances).
        """

    def pmf(self) -> np.ndarray | None:
        """``P(tau = l)`` for ``l = 0 .. max_staleness`` (the cap included), if known.

        The probabilities are those of the draws themselves: the cap's entry holds the mass of
        the clamped tail. Models with a start-up transient give their steady state.
        """
        return None

    def expected_mean(self) -> float | None:
        """The theoretical mean staleness of the draws (steady state, cap included), if known."""
        pmf = self.pmf()
        if pmf is None:
            return None
        return float(np.dot(np.arange(pmf.size), pmf))

    def sample(self, n: int, seed: int | np.random.Generator) -> np.ndarray:
        """The first ``n`` values of :meth:`stream` as an ``int64`` array.

        Args:
            n: number of draws (>= 0).
            seed: as in :meth:`stream`.
        """
        n = check_int(n, "n", 0)
        return np.fromiter(islice(self.stream(seed), n), dtype=np.int64, count=n)


def _geometric_cap(q: float, tail_mass: float = DEFAULT_TAIL_MASS) -> int:
    """Smallest ``L`` with ``P(tau > L) = q^(L + 1) <= tail_mass``."""
    if q == 0.0:
        return 0
    cap = max(0, math.ceil(math.log(tail_mass) / math.log(q)) - 1)
    while cap > 0 and q**cap <= tail_mass:  # guard against rounding up one too many
        cap -= 1
    while q ** (cap + 1) > tail_mass:
        cap += 1
    return cap


@dataclass(frozen=True)
class GeometricStaleness(StalenessModel):
    """``P(tau = l) = (1 - q) q^l``, clamped at ``max_staleness``; see :func:`geometric`.

    Args:
        q: the ratio, in [0, 1); the mean is ``q / (1 - q)`` and ``M = 1 / (1 - q)``.
        max_staleness: the cap (>= 0); draws above it are clamped to it.
    """

    q: float
    max_staleness: int

    def __post_init__(self) -> None:
        _check_q(self.q)
        check_int(self.max_staleness, "max_staleness", 0)

    @property
    def name(self) -> str:  # type: ignore[override]
        """``"geometric"``."""
        return "geometric"

    @property
    def workers(self) -> float:  # type: ignore[override]
        """``M = 1 / (1 - q)``, the number of memoryless workers with this staleness."""
        return 1.0 / (1.0 - self.q)

    def stream(self, seed: int | np.random.Generator) -> Iterator[int]:
        """Endless geometric draws (see :meth:`StalenessModel.stream`).

        Args:
            seed: a non-negative integer, or a numpy ``Generator``.
        """
        rng = _as_generator(seed)
        success = 1.0 - self.q
        while True:
            # numpy's geometric counts trials up to the first success (>= 1): failures = that - 1.
            draws = rng.geometric(success, size=_CHUNK) - 1
            yield from np.minimum(draws, self.max_staleness).tolist()

    def pmf(self) -> np.ndarray:
        """Geometric probabilities up to the cap, the cap holding the tail ``q^max_staleness``."""
        levels = np.arange(self.max_staleness + 1, dtype=np.float64)
        pmf = (1.0 - self.q) * self.q**levels
        pmf[-1] = self.q**self.max_staleness
        return pmf


def geometric(q: float, *, max_staleness: int | None = None) -> GeometricStaleness:
    """Geometric staleness ``P(tau = l) = (1 - q) q^l``: ``M = 1 / (1 - q)`` memoryless workers.

    This is the model of "Asynchrony begets Momentum" (Mitliagkas et al., 2016): with
    ``q = 1 - 1/M`` the mean is ``M - 1`` and the implicit momentum is ``q``.

    Args:
        q: the ratio, in [0, 1).
        max_staleness: cap on the draws; default the ``(1 - 1e-6)`` quantile, the smallest
            ``L`` with ``q^(L + 1) <= 1e-6``.

    Example:
        >>> model = geometric(0.75)
        >>> model.workers, model.max_staleness
        (4.0, 48)
    """
    q = _check_q(q)
    cap = _geometric_cap(q) if max_staleness is None else max_staleness
    return GeometricStaleness(q, cap)


def _check_q(q: Any) -> float:
    """``q`` as a float in [0, 1), else ``ValueError``."""
    return check_real(
        q, "q (q = 1 - 1/M for M workers)", minimum=0.0, maximum=1.0, max_inclusive=False
    )


def _mixture_tail(shares: np.ndarray, level: int) -> float:
    """``P(tau > level)`` of the worker-queue mixture with rate shares ``p_i``."""
    return float(np.sum(shares * (1.0 - shares) ** (level + 1)))


def _mixture_cap(shares: np.ndarray, tail_mass: float = DEFAULT_TAIL_MASS) -> int:
    """Smallest ``L`` with ``P(tau > L) <= tail_mass`` for the worker-queue mixture."""
    # The tail is at most (1 - p_min)^(L + 1): that cap is enough; bisect below it.
    low, high = 0, _geometric_cap(1.0 - float(shares.min()), tail_mass)
    while low < high:
        middle = (low + high) // 2
        if _mixture_tail(shares, middle) <= tail_mass:
            high = middle
        else:
            low = middle + 1
    return low


@dataclass(frozen=True)
class WorkerQueueStaleness(StalenessModel):
    """``M`` workers with exponential compute times in an event queue; see :func:`workers`.

    Args:
        rates: compute rates of the workers (> 0), one per worker; a worker's compute time is
            ``Exp(rate)``, i.e. of mean ``1 / rate``.
        max_staleness: the cap (>= 0); draws above it are clamped to it.
    """

    rates: tuple[float, ...]
    max_staleness: int

    def __post_init__(self) -> None:
        _check_rates(self.rates)
        check_int(self.max_staleness, "max_staleness", 0)
        # Frozen and hashable even when built from a list.
        object.__setattr__(self, "rates", tuple(float(rate) for rate in self.rates))

    @property
    def name(self) -> str:  # type: ignore[override]
        """``"exponential"``."""
        return "exponential"

    @property
    def workers(self) -> float:  # type: ignore[override]
        """``M``, the number of workers."""
        return float(len(self.rates))

    @property
    def shares(self) -> np.ndarray:
        """``p_i = r_i / R``: the share of updates from worker ``i`` and its success probability."""
        rates = np.asarray(self.rates, dtype=np.float64)
        return rates / rates.sum()

    def stream(self, seed: int | np.random.Generator) -> Iterator[int]:
        """Staleness of successive updates of a simulated event queue.

        All workers read version 0 at time 0, so the first draws show the start-up (the ``k``-th
        update, counted from 0, never has ``tau > k``); the queue then settles into the mixture
        of :meth:`pmf`.

        Args:
            seed: a non-negative integer, or a numpy ``Generator``.
        """
        rng = _as_generator(seed)
        rates = self.rates
        version = 0
        read_version = [0] * len(rates)
        # (finish time, worker): the next worker to apply is the one that finishes first.
        queue = [(rng.exponential(1.0 / rate), worker) for worker, rate in enumerate(rates)]
        heapq.heapify(queue)
        while True:
            now, worker = queue[0]
            yield min(version - read_version[worker], self.max_staleness)
            version += 1
            # The worker applies, reads the new version and starts its next gradient.
            read_version[worker] = version
            heapq.heapreplace(queue, (now + rng.exponential(1.0 / rates[worker]), worker))

    def pmf(self) -> np.ndarray:
        """The steady-state mixture ``sum_i p_i^2 (1 - p_i)^l``, the cap holding the tail."""
        shares = self.shares[:, None]
        levels = np.arange(self.max_staleness + 1, dtype=np.float64)[None, :]
        per_worker = shares * (1.0 - shares) ** levels  # P(tau = l | worker i)
        per_worker[:, -1] = (1.0 - shares[:, 0]) ** self.max_staleness
        return (shares * per_worker).sum(axis=0)


def _check_rates(rates: Sequence[float]) -> None:
    if len(rates) == 0:
        raise ValueError("rates must hold one positive rate per worker, got an empty sequence")
    for rate in rates:
        check_real(
            rate, "each rate (a worker's updates per unit time)", minimum=0.0, min_inclusive=False
        )


def workers(
    M: int, rates: Sequence[float] | None = None, *, max_staleness: int | None = None
) -> WorkerQueueStaleness:
    """``M`` asynchronous workers in a true event queue (``name == "exponential"``).

    Each worker reads the current version, computes for an ``Exp(rate)`` time, then applies its
    gradient; its staleness is the number of updates the others applied in between. With equal
    rates ``tau`` is geometric with ``q = 1 - 1/M`` (mean ``M - 1``) by memorylessness; with
    heterogeneous rates it is the mixture ``sum_i p_i^2 (1 - p_i)^l``, ``p_i = r_i / sum r``:
    the same mean ``M - 1``, a heavier far tail (see the module docstring).

    Args:
        M: number of workers (>= 1).
        rates: compute rate of each worker (> 0), ``M`` of them; ``None`` means equal rates. A
            slow straggler is one small rate, e.g. ``[1, 1, 1, 0.1]``.
        max_staleness: cap on the draws; default the ``(1 - 1e-6)`` quantile of the mixture.

    Example:
        >>> model = workers(4, [1.0, 1.0, 1.0, 0.25])
        >>> round(model.expected_mean(), 3)
        3.0
    """
    M = check_int(M, "M (the number of workers)", 1)
    if rates is None:
        rates = (1.0,) * M
    else:
        rates = tuple(rates)
        if len(rates) != M:
            raise ValueError(f"rates must hold M = {M} rates, one per worker, got {len(rates)}")
        _check_rates(rates)
        rates = tuple(float(rate) for rate in rates)
    model_rates = np.asarray(rates, dtype=np.float64)
    cap = _mixture_cap(model_rates / model_rates.sum()) if max_staleness is None else max_staleness
    return WorkerQueueStaleness(rates, cap)


@dataclass(frozen=True)
class RoundRobinStaleness(StalenessModel):
    """``M`` workers taking turns: every draw is ``M - 1``; see :func:`round_robin`.

    Args:
        M: number of workers (>= 1).
    """

    M: int

    def __post_init__(self) -> None:
        check_int(self.M, "M (the number of workers)", 1)

    @property
    def name(self) -> str:  # type: ignore[override]
        """``"round_robin"``."""
        return "round_robin"

    @property
    def workers(self) -> float:  # type: ignore[override]
        """``M``."""
        return float(self.M)

    @property
    def max_staleness(self) -> int:  # type: ignore[override]
        """``M - 1``."""
        return self.M - 1

    def stream(self, seed: int | np.random.Generator) -> Iterator[int]:
        """``M - 1`` forever (the seed is accepted for a uniform interface and unused).

        Args:
            seed: ignored beyond validation.
        """
        if not isinstance(seed, np.random.Generator):
            _as_generator(seed)
        while True:
            yield self.M - 1

    def pmf(self) -> np.ndarray:
        """All the mass at ``M - 1``."""
        pmf = np.zeros(self.M)
        pmf[-1] = 1.0
        return pmf


def round_robin(M: int) -> RoundRobinStaleness:
    """``M`` workers in lock step: each applies once per round, so ``tau = M - 1`` exactly.

    This is the steady state. At the very start (all workers read version 0) the ``k``-th
    update has ``tau = k`` for ``k < M - 1``; :func:`simulate` reproduces that start-up by clamping
    ``tau`` to the number of updates so far.

    Args:
        M: number of workers (>= 1).
    """
    return RoundRobinStaleness(check_int(M, "M (the number of workers)", 1))


def staleness_model(name: str, workers: int) -> StalenessModel:
    """A staleness model by name, for command lines and sweeps.

    Args:
        name: ``"geometric"`` (``q = 1 - 1/M``), ``"exponential"`` (``M`` equal-rate workers in
            an event queue) or ``"round_robin"``; see :data:`STALENESS_MODELS`.
        workers: the number of workers ``M`` (>= 1).
    """
    check_choice(name, "staleness model", STALENESS_MODELS)
    M = check_int(workers, "workers", 1)
    if name == "geometric":
        return geometric(1.0 - 1.0 / M)
    if name == "exponential":
        return _workers_model(M)
    return round_robin(M)


# `staleness_model` takes an argument named `workers`, which shadows the function in its body.
_workers_model = workers


# -- the simulator ------------------------------------------------------------------------------


def _shaped_like(piece: Tensor, target: Tensor) -> Tensor:
    """A flat ``piece`` of a snapshot row, viewed with ``target``'s shape if that is not flat."""
    return piece if target.dim() == 1 else piece.view(target.shape)


class SnapshotRing:
    """The last ``capacity`` values of a list of tensors, in preallocated flat memory.

    The building block of stale-gradient simulation: :meth:`push` after every update, then
    :meth:`load` the values of ``age`` updates ago into the tensors to compute a stale gradient,
    and ``load(0)`` (or leave a :meth:`stale` block) to put the current values back.

    Tensors of one dtype and device share one buffer of shape ``(capacity, total elements)``, so
    a snapshot is one flat vector per dtype and device (:meth:`flat`), a push or a load is one
    multi-tensor (foreach) copy, and :meth:`is_finite` is one reduction. Memory:
    ``capacity`` times the tensors' size.

    Args:
        tensors: the tensors to snapshot (usually parameters); they are copied in place, never
            replaced, so optimizers and modules keep their references.
        capacity: number of snapshots kept (>= 1); ages ``0 .. capacity - 1`` can be loaded.

    Example:
        >>> w = torch.zeros(2)
        >>> ring = SnapshotRing([w], capacity=3)
        >>> for value in (1.0, 2.0, 3.0):
        ...     _ = w.fill_(value)
        ...     ring.push()
        >>> with ring.stale(2):
        ...     w.tolist()
        [1.0, 1.0]
        >>> w.tolist()
        [3.0, 3.0]
    """

    def __init__(self, tensors: Iterable[Tensor], capacity: int) -> None:
        self.tensors = list(tensors)
        if not self.tensors:
            raise ValueError("SnapshotRing needs at least one tensor to snapshot, got none")
        self._capacity = check_int(capacity, "capacity", 1)
        # Group by (device, dtype): one flat buffer each, tensors in their original order.
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, tensor in enumerate(self.tensors):
            groups.setdefault((tensor.device, tensor.dtype), []).append(index)
        self._groups = list(groups.values())
        self._sizes = [[self.tensors[i].numel() for i in group] for group in self._groups]
        self._buffers = [
            torch.empty((self._capacity, sum(sizes)), dtype=dtype, device=device)
            for (device, dtype), sizes in zip(groups, self._sizes, strict=True)
        ]
        # Flat views of the tensors (contiguous ones; others are copied through their shape),
        # so a copy to or from a flat row needs no per-tensor reshaping.
        self._targets = [
            [self._flat_or_self(self.tensors[i]) for i in group] for group in self._groups
        ]
        self._newest = -1
        self._pushed = 0

    @staticmethod
    def _flat_or_self(tensor: Tensor) -> Tensor:
        return tensor.view(-1) if tensor.is_contiguous() else tensor

    @property
    def capacity(self) -> int:
        """Number of snapshots kept."""
        return self._capacity

    @property
    def pushed(self) -> int:
        """Number of pushes so far (not bounded by the capacity)."""
        return self._pushed

    def __len__(self) -> int:
        """Number of snapshots held: ``min(pushed, capacity)``."""
        return min(self._pushed, self._capacity)

    def _slot(self, age: int) -> int:
        if (
            isinstance(age, bool)
            or not isinstance(age, numbers.Integral)
            or not (0 <= age < len(self))
        ):
            raise ValueError(
                f"age must be an integer in [0, {len(self) - 1}] (this ring holds {len(self)} "
                f"snapshots of capacity {self._capacity}), got {age!r}; push() first, or make "
                "the ring larger"
            )
        return (self._newest - int(age)) % self._capacity

    def _pieces(self, slot: int) -> list[list[Tensor]]:
        """Per group, views of one row shaped like the copy targets."""
        pieces = []
        for buffer, sizes, targets in zip(self._buffers, self._sizes, self._targets, strict=True):
            row = torch.split_with_sizes(buffer[slot], sizes)
            pieces.append(
                [_shaped_like(piece, target) for piece, target in zip(row, targets, strict=True)]
            )
        return pieces

    def flat(self, age: int = 0) -> list[Tensor]:
        """The snapshot of ``age`` pushes ago as one flat vector per (device, dtype) group.

        The groups come in the order they first appear in ``tensors``; views: do not modify
        them.

        Args:
            age: how many pushes back, in ``0 .. len(self) - 1``.
        """
        slot = self._slot(age)
        return [buffer[slot] for buffer in self._buffers]

    def snapshot(self, age: int = 0) -> list[Tensor]:
        """The snapshot of ``age`` pushes ago as views shaped like ``tensors``, in their order.

        Args:
            age: how many pushes back, in ``0 .. len(self) - 1``.
        """
        by_index: dict[int, Tensor] = {}
        for group, pieces in zip(self._groups, self._pieces(self._slot(age)), strict=True):
            for index, piece in zip(group, pieces, strict=True):
                by_index[index] = piece.view(self.tensors[index].shape)
        return [by_index[i] for i in range(len(self.tensors))]

    @torch.no_grad()
    def push(self) -> None:
        """Store the tensors' current values as the newest snapshot, dropping the oldest if full."""
        slot = (self._newest + 1) % self._capacity
        for pieces, targets in zip(self._pieces(slot), self._targets, strict=True):
            torch._foreach_copy_(pieces, targets)
        self._newest = slot
        self._pushed += 1

    @torch.no_grad()
    def load(self, age: int = 0) -> None:
        """Copy the values of ``age`` pushes ago into the tensors (``0``: the newest).

        Args:
            age: how many pushes back, in ``0 .. len(self) - 1``.
        """
        for pieces, targets in zip(self._pieces(self._slot(age)), self._targets, strict=True):
            torch._foreach_copy_(targets, pieces)

    @torch.no_grad()
    def is_finite(self, age: int = 0) -> bool:
        """Whether every value of the snapshot of ``age`` pushes ago is finite (no NaN or inf).

        Args:
            age: how many pushes back, in ``0 .. len(self) - 1``.
        """
        # A sum is cheaper than isfinite() and is non-finite whenever a value is; only when it
        # is (NaN, inf, or an overflow of finite values) is the exact test needed.
        return all(
            math.isfinite(row.sum().item()) or bool(torch.isfinite(row).all())
            for row in self.flat(age)
        )

    @contextmanager
    def stale(self, age: int) -> Iterator[None]:
        """Within the block the tensors hold the values of ``age`` pushes ago.

        After it (even on an exception) they hold the newest snapshot again.

        Assumes the tensors equal the newest snapshot on entry (push after every change).

        Args:
            age: how many pushes back, in ``0 .. len(self) - 1``; 0 copies nothing.
        """
        self._slot(age)  # validate before touching anything
        if age == 0:
            yield
            return
        self.load(age)
        try:
            yield
        finally:
            self.load(0)


@dataclass
class History:
    """What :func:`simulate` saw, one entry per applied update.

    Attributes:
        loss: loss of the batch each (stale) gradient was computed on, at the stale parameters.
        staleness: the staleness ``tau`` actually used for each update (after clamping).
        algorithmic_momentum: momentum parameter group 0 applied at each step (an
            AsyncMomentumSGD's tuned momentum, ``betas[0]`` for Adam-like optimizers, 0 for
            optimizers without momentum).
        implicit_momentum: the optimizer's ``implicit_momentum`` if it has one (its estimate),
            else ``1 - 1/M`` of the staleness model's nominal ``M``.
        estimated_workers: the optimizer's ``estimated_workers`` if it has one, else ``M``.
        diverged: a loss, gradient or parameter became NaN or inf; the run stopped there. A
            non-finite loss or gradient was not applied and has no entry; a step that made the
            parameters non-finite was applied and has one.
    """

    loss: list[float] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)
    algorithmic_momentum: list[float] = field(default_factory=list)
    implicit_momentum: list[float] = field(default_factory=list)
    estimated_workers: list[float] = field(default_factory=list)
    diverged: bool = False

    def __len__(self) -> int:
        """Number of applied updates."""
        return len(self.staleness)

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per update (``step`` counted from 0), for ``csv.DictWriter`` and pandas."""
        return [
            {
                "step": step,
                "loss": loss,
                "staleness": tau,
                "algorithmic_momentum": algorithmic,
                "implicit_momentum": implicit,
                "estimated_workers": estimated,
            }
            for step, (loss, tau, algorithmic, implicit, estimated) in enumerate(
                zip(
                    self.loss,
                    self.staleness,
                    self.algorithmic_momentum,
                    self.implicit_momentum,
                    self.estimated_workers,
                    strict=True,
                )
            )
        ]


def _endless_batches(batches: Iterable[Any]) -> Iterator[Any]:
    """Yield from ``batches``, iterating it again when it ends.

    Each pass is a new epoch (a DataLoader reshuffles). A one-shot iterator cannot start again:
    running out of it raises.
    """
    iterator = iter(batches)
    one_shot = iterator is batches
    served = 0
    while True:
        for batch in iterator:
            served += 1
            yield batch
        if served == 0:
            raise ValueError("batches is empty: give at least one batch")
        if one_shot:
            raise ValueError(
                f"batches ran out after {served} batches: a one-shot iterator cannot be "
                "restarted; pass a re-iterable (list, DataLoader) or an endless generator"
            )
        iterator = iter(batches)


def _optimized_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The optimizer's parameters, each once, in group order."""
    seen: set[int] = set()
    tensors = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                tensors.append(p)
    return tensors


def _apply(view: OptimizerView, tau: int, loss: float, batch_size: int | None) -> bool:
    """Step the optimizer unless a gradient is NaN or inf; return whether it stepped."""
    # An optimizer that checks its gradients itself (AsyncMomentumSGD) raises or skips and
    # counts a bad one; any other one is refused it. Either way nothing changes.
    try:
        return view.step(tau, refuse_nonfinite=True, loss=loss, batch_size=batch_size).applied
    except NonFiniteGradientError:
        return False


def _check_simulate_args(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    optimizer: torch.optim.Optimizer,
    staleness: StalenessModel,
    steps: int,
    seed: int,
) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise ValueError("loss_fn must be callable as loss_fn(model, batch) -> scalar tensor")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if not isinstance(staleness, StalenessModel):
        raise ValueError(
            "staleness must be a StalenessModel (geometric(q), workers(M), round_robin(M), "
            f"staleness_model(name, M)), got {type(staleness).__name__}"
        )
    check_int(steps, "steps", 0)
    check_int(seed, "seed", 0)


def _scalar_loss(loss: Any) -> Tensor:
    if not (isinstance(loss, Tensor) and loss.numel() == 1 and loss.is_floating_point()):
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn(model, batch) must return a floating-point scalar tensor, got {shape}"
        )
    return loss


def simulate(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    staleness: StalenessModel,
    steps: int,
    *,
    seed: int = 0,
    on_step: Callable[[int, History], None] | None = None,
) -> History:
    """Train ``model`` as ``M`` asynchronous workers would, on one core, reproducibly.

    Update ``t`` draws ``tau`` from ``staleness`` (clamped to ``t``, the number of updates so
    far: at the start no older parameters exist, and this clamp is exactly the start-up of
    round-robin workers), computes the gradient of the next batch at the parameters of ``tau``
    updates ago, restores the current parameters and applies the gradient with ``optimizer``
    (with ``step(staleness=tau)`` for an :class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD`, so
    its tuner sees the simulated asynchrony; any other optimizer just steps, e.g.
    ``torch.optim.SGD(momentum=0.9)`` as the usual fixed-momentum baseline).

    Past parameters live in a :class:`SnapshotRing` of ``min(max_staleness, steps) + 1``
    snapshots of the optimizer's parameters. Only parameters are snapshotted: buffers (batch-norm
    statistics) are shared, as they are by Hogwild workers. The same ``seed`` (and the same
    model, data and optimizer) gives the same :class:`History` bit for bit: the seed drives the
    staleness stream and torch's random generator (dropout, DataLoader shuffling) inside the run,
    and the caller's random state is restored afterwards.

    A NaN or inf loss, gradient or parameter stops the run with ``History.diverged`` set rather
    than raising: a non-finite gradient is not applied, and the model is left at the last
    finite parameters (except when the step itself overflowed the parameters).

    Args:
        model: the module ``loss_fn`` evaluates; put it in train or eval mode yourself.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss of one batch.
        batches: any iterable of batches. A re-iterable one (list, DataLoader) is iterated
            again whenever it ends (a new epoch); a one-shot iterator must not run out before
            ``steps`` batches (a ``ValueError`` is raised if it does).
        optimizer: a torch optimizer over (some of) ``model``'s parameters.
        staleness: where ``tau`` comes from: :func:`geometric`, :func:`workers`,
            :func:`round_robin` or :func:`staleness_model`.
        steps: number of updates to apply (>= 0).
        seed: seed of the run (>= 0).
        on_step: called as ``on_step(t, history)`` after update ``t`` is recorded, e.g. to
            evaluate or log; the model holds the current parameters then.

    Returns:
        The :class:`History` of the run, one entry per applied update.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 1)
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
        >>> def mse(m, batch):
        ...     x, y = batch
        ...     return torch.nn.functional.mse_loss(m(x), y)
        >>> from asyncmomentum.core.optimizer import AsyncMomentumSGD
        >>> opt = AsyncMomentumSGD(model.parameters(), lr=0.05, momentum=0.9, warmup=0)
        >>> history = simulate(model, mse, data, opt, workers(4), steps=200)
        >>> len(history), history.diverged, 3.0 < history.estimated_workers[-1] < 5.0
        (200, False, True)
    """
    _check_simulate_args(model, loss_fn, optimizer, staleness, steps, seed)
    history = History()
    params = _optimized_tensors(optimizer)
    if steps == 0 or not params:
        return history
    # Independent streams for the staleness and for torch, both from the one seed.
    staleness_seed, torch_seed = np.random.SeedSequence(seed).spawn(2)
    taus = staleness.stream(np.random.default_rng(staleness_seed))
    ring = SnapshotRing(params, capacity=min(staleness.max_staleness, steps) + 1)
    ring.push()
    cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(int(torch_seed.generate_state(1)[0]))
        loop = _endless_batches(batches)
        _run(model, loss_fn, loop, optimizer, staleness, steps, taus, ring, history, on_step)
    return history


def _run(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Iterator[Any],
    optimizer: torch.optim.Optimizer,
    staleness: StalenessModel,
    steps: int,
    taus: Iterator[int],
    ring: SnapshotRing,
    history: History,
    on_step: Callable[[int, History], None] | None,
) -> None:
    """The simulation loop of :func:`simulate` (arguments already checked)."""
    view = OptimizerView(optimizer)
    # Optimizers without an estimate of their own report the staleness model's nominal M.
    estimator = view.tracker.estimator if view.is_async_momentum else None
    nominal_workers = float(staleness.workers)
    nominal_implicit = formulas.implicit_momentum(nominal_workers)
    for step in range(steps):
        tau = min(next(taus), step)
        batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        with ring.stale(tau):
            loss = _scalar_loss(loss_fn(model, batch))
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                history.diverged = True
                return
            loss.backward()
        if not _apply(view, tau, loss_value, batch_size_of(batch)):
            history.diverged = True
            return
        ring.push()
        history.loss.append(loss_value)
        history.staleness.append(tau)
        history.algorithmic_momentum.append(view.applied_momentum())
        history.implicit_momentum.append(
            nominal_implicit if estimator is None else estimator.implicit_momentum
        )
        history.estimated_workers.append(
            nominal_workers if estimator is None else estimator.estimated_workers
        )
        if not ring.is_finite(0):  # the step overflowed: recorded, but the run stops
            history.diverged = True
            return
        if on_step is not None:
            on_step(step, history)
