"""Stability-aware momentum: the largest momentum the delayed heavy-ball recursion tolerates.

Along one eigendirection of curvature ``lambda`` the linearized asynchronous heavy ball is

    w_{t+1} = (1 + mu) w_t - mu w_{t-1} - a w_{t - tau_t},        a = lr * lambda,

with ``tau_t`` drawn from the staleness distribution ``p``. Its mean (the "mean-field" recursion
of the issue) replaces ``w_{t - tau_t}`` by ``sum_l p(l) w_{t-l}``; :func:`spectral_radius` is the
spectral radius of that linear recursion. With *random* delays the mean says too little: every
update applies one whole stale gradient, not the average of many, and the spread of the delays
feeds energy back. :func:`mean_square_radius` is the per-step growth factor of the root mean
square of ``w`` for independent delays (exact for them, see ``docs/stability-rule.md``); it
equals :func:`spectral_radius` for a constant delay and exceeds it otherwise.

:func:`largest_stable_momentum` scans momentum from the cap down and refines the largest stable
value by bisection (the radius is not monotone in ``mu``); :class:`StalenessHistogram` keeps the
observed staleness, bounded and windowed. The rule that puts them to work online is
:class:`~asyncmomentum.core.tuning.rules.stability.StabilityRule`; the curvature comes from a
:class:`~asyncmomentum.core.measuring.curvature.CurvatureEstimator`.

All the stability tests work on the unit circle: with ``u = z^-1`` the recursion's
characteristic function is ``D(u) = 1 - (1 + mu) u + mu u^2 + a u P(u)``, ``P(u) = sum_l p(l) u^l``.
The recursion is stable iff ``D`` has no zero in the disc ``|u| <= 1`` (a winding number on
the circle), and mean-square stable iff, in addition, the staleness-noise gain
``a^2 mean_w (1 - |P|^2) / |D|^2`` is below 1. Both are evaluated with one FFT of ``p`` and a few
vectorized operations per momentum value.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch

from asyncmomentum.core import formulas
from asyncmomentum.core.validation import (
    MAX_COUNT,
    check_choice,
    check_int,
    check_momentum,
    check_real,
    check_staleness,
    check_state,
)

__all__ = [
    "DEFAULT_TAIL_MASS",
    "StalenessHistogram",
    "CRITERIA",
    "check_pmf",
    "is_stable",
    "largest_stable_momentum",
    "mean_square_radius",
    "spectral_radius",
    "truncate_pmf",
]

#: Mass of the staleness tail that :func:`truncate_pmf` may fold into the last kept lag.
DEFAULT_TAIL_MASS = 1e-3

#: Layout version of the state dicts of this module.
STATE_FORMAT = 1

Criterion = Literal["mean_square", "mean_field"]
#: The stability criteria, for :func:`~asyncmomentum.core.validation.check_choice`.
CRITERIA: tuple[Criterion, ...] = ("mean_square", "mean_field")

# Points on the circle for the frequency-domain tests: the winding number is exact while
# adjacent samples differ by less than half a turn, i.e. for zeros farther than about
# 2 pi / _FREQUENCIES (8e-4) from the circle and supports of up to ~1000 lags.
_FREQUENCIES = 8192
_MAX_FREQUENCIES = 1 << 17
# Momenta per test of the scan after the cap (see _first_stable).
_SCAN_CHUNK = 4


# -- staleness distributions ----------------------------------------------------------------------


def check_pmf(staleness_pmf: Any) -> np.ndarray:
    """Return ``staleness_pmf`` as a float64 array normalized to sum 1, else raise ``ValueError``.

    Args:
        staleness_pmf: ``P(tau = l)`` for ``l = 0, 1, ...``: a 1-D sequence of finite,
            non-negative numbers with a positive sum (counts are fine: they are normalized).
    """
    try:
        pmf = np.asarray(staleness_pmf, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"staleness_pmf must be a 1-D sequence of probabilities, got {staleness_pmf!r}"
        ) from None
    if pmf.ndim != 1 or pmf.size == 0:
        raise ValueError(
            f"staleness_pmf must be a non-empty 1-D sequence (P(tau = 0), P(tau = 1), ...), "
            f"got shape {pmf.shape}"
        )
    if not np.isfinite(pmf).all() or (pmf < 0).any():
        raise ValueError("staleness_pmf must hold finite, non-negative probabilities")
    total = pmf.sum()
    if not total > 0:
        raise ValueError("staleness_pmf must have a positive sum; it is all zeros")
    return pmf / total


def truncate_pmf(staleness_pmf: Any, tail_mass: float = DEFAULT_TAIL_MASS) -> np.ndarray:
    """The pmf on the shortest support ``0..L`` that holds ``>= 1 - tail_mass`` of the mass.

    The tail beyond ``L`` is folded into ``P(L)`` (lumped, not dropped), so the result still
    sums to 1 and keeps the mean within ``tail_mass * (E[tau | tau > L] - L)``. Folding moves
    that mass to *shorter* delays, which is slightly optimistic; with the default ``1e-3`` it is
    far below anything the rule can resolve. Trailing zeros are removed.

    Args:
        staleness_pmf: see :func:`check_pmf`.
        tail_mass: largest mass to fold, in [0, 1).
    """
    pmf = check_pmf(staleness_pmf)
    check_real(tail_mass, "tail_mass", minimum=0.0, maximum=1.0, max_inclusive=False)
    cumulative = np.cumsum(pmf)
    last = int(np.searchsorted(cumulative, 1.0 - tail_mass - 1e-12))
    last = min(last, int(np.flatnonzero(pmf).max()))
    kept = pmf[: last + 1].copy()
    kept[-1] += 1.0 - kept.sum()
    return kept


# -- the recursion --------------------------------------------------------------------------------


def _characteristic_polynomial(mu: float, a: float, pmf: np.ndarray) -> np.ndarray:
    """Coefficients, highest power first, of the characteristic polynomial.

    The polynomial is ``z^(L+1) - (1 + mu) z^L + mu z^(L-1) + a sum_l p_l z^(L-l)``.
    """
    lags = max(pmf.size - 1, 1)  # at least one lag: the momentum term needs w_{t-1}
    coefficients = np.zeros(lags + 2)
    coefficients[0] = 1.0
    coefficients[1] = -(1.0 + mu)
    coefficients[2] += mu
    coefficients[1 : 1 + pmf.size] += a * pmf
    return coefficients


def spectral_radius(
    mu: float, a: float, staleness_pmf: Any, *, tail_mass: float = DEFAULT_TAIL_MASS
) -> float:
    """Spectral radius of the mean-field delayed heavy-ball recursion.

    The recursion is ``w_{t+1} = (1 + mu) w_t - mu w_{t-1} - a sum_l p(l) w_{t-l}``; the radius
    is the largest modulus of the roots of its characteristic polynomial (the eigenvalues of its
    companion matrix). Below 1 the recursion decays; above, it blows up. Exact for a constant
    delay; optimistic for random delays (see :func:`mean_square_radius`).

    Args:
        mu: algorithmic momentum.
        a: ``lr * lambda``, learning rate times curvature (>= 0 for a minimum).
        staleness_pmf: ``P(tau = l)``; truncated with :func:`truncate_pmf`.
        tail_mass: see :func:`truncate_pmf`.
    """
    pmf = truncate_pmf(staleness_pmf, tail_mass)
    roots = np.roots(_characteristic_polynomial(check_real(mu, "mu"), check_real(a, "a"), pmf))
    return float(np.abs(roots).max())


def _circle(
    pmf: np.ndarray, radius: np.ndarray, points: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample the circle ``|u| = 1 / radius`` of each radius (one per row).

    Returns ``u`` on the circle, ``P(u)`` there, and ``sum_l p_l radius^(-2 l)``.
    """
    decay = radius ** -np.arange(pmf.size, dtype=np.float64)  # (rows, lags)
    # numpy's FFT is sum_l x_l e^{-2 pi i k l / N}: P at u_k = e^{-2 pi i k / N} / radius.
    transform = np.fft.fft(pmf * decay, points, axis=1)
    u = np.exp(-2j * np.pi * np.arange(points) / points) / radius
    return u, transform, (pmf * decay * decay).sum(axis=1, keepdims=True)


def _points_for(pmf: np.ndarray) -> int:
    points = _FREQUENCIES
    while points < 8 * (pmf.size + 2) and points < _MAX_FREQUENCIES:
        points *= 2
    return points


def _stability_at(
    mus: np.ndarray,
    a: float,
    pmf: np.ndarray,
    radius: float | np.ndarray,
    criterion: Criterion,
    points: int | None = None,
    circle: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Whether each momentum in ``mus`` gives a recursion that decays faster than ``radius^t``.

    ``"mean_field"``: every root of the characteristic polynomial lies inside ``|z| < radius``.
    ``"mean_square"``: that, and the second moment for independent delays decays faster than
    ``radius^(2t)`` (the staleness-noise gain on the circle is below 1). ``radius`` is one
    number, or one per momentum. ``circle``: :func:`_circle` of ``pmf`` at that one radius,
    when the caller tests many momenta at it in several calls (it depends on neither ``mu``
    nor ``a``). Each momentum's verdict is computed on its own row, so it does not depend on
    which others are tested with it.
    """
    mus = np.asarray(mus, dtype=np.float64)[:, None]
    radius = np.asarray(radius, dtype=np.float64)
    # One radius for every momentum (a scan, a bisection step): one circle, broadcast to the
    # rows, instead of one identical transform per row.
    rows = 1 if radius.ndim == 0 else mus.shape[0]
    radius = np.broadcast_to(radius, (rows,))[:, None]
    if circle is None:
        circle = _circle(pmf, radius, points or _points_for(pmf))
    u, transform, tail_weight = circle
    d = 1.0 - (1.0 + mus) * u + mus * u * u + a * u * transform
    magnitude = np.abs(d)
    # Winding number of D around 0 on the circle: zero iff no root of D inside |u| <= 1/radius,
    # i.e. no root of the characteristic polynomial outside |z| < radius.
    safe = np.where(magnitude > 0, d, 1.0)
    turns = np.angle(np.roll(safe, -1, axis=1) / safe).sum(axis=1)
    stable = (np.abs(turns) < np.pi) & (magnitude.min(axis=1) > 0)
    if criterion == "mean_square" and a != 0.0:  # a = 0: no delayed term, no staleness noise
        squared = magnitude**2
        spread = np.broadcast_to(
            np.clip(tail_weight - np.abs(transform) ** 2, 0.0, None), squared.shape
        )
        # |D|^2 is 0 where the circle passes through a root (or underflows next to one): that
        # row is not stable, so its gain is infinite, not 0/0 (NaN, and numpy's warning).
        gain = np.divide(spread, squared, out=np.full_like(squared, np.inf), where=squared > 0)
        stable &= (a * a / radius[:, 0] ** 2) * np.mean(gain, axis=1) < 1.0
    return stable


def is_stable(
    mu: float,
    a: float,
    staleness_pmf: Any,
    *,
    margin: float = 0.0,
    criterion: Criterion = "mean_square",
    tail_mass: float = DEFAULT_TAIL_MASS,
) -> bool:
    """Whether the delayed heavy ball decays faster than ``(1 - margin)^t``.

    Args:
        mu: algorithmic momentum.
        a: ``lr * lambda``.
        staleness_pmf: ``P(tau = l)``; truncated with :func:`truncate_pmf`.
        margin: required decay per step, in [0, 1): the radius must stay below ``1 - margin``.
        criterion: ``"mean_square"`` (:func:`mean_square_radius`, the default) or
            ``"mean_field"`` (:func:`spectral_radius`).
        tail_mass: see :func:`truncate_pmf`.
    """
    margin = check_real(margin, "margin", minimum=0.0, maximum=1.0, max_inclusive=False)
    pmf = truncate_pmf(staleness_pmf, tail_mass)
    mus = np.array([check_real(mu, "mu")])
    criterion = check_choice(criterion, "criterion", CRITERIA)
    return bool(_stability_at(mus, check_real(a, "a"), pmf, 1.0 - margin, criterion)[0])


def mean_square_radius(
    mu: float, a: float, staleness_pmf: Any, *, tail_mass: float = DEFAULT_TAIL_MASS
) -> float:
    """Per-step growth factor of the root mean square of the delayed heavy ball.

    For independent delays ``tau_t ~ p`` the second moment ``E[w_t^2]`` grows or decays like
    ``r^(2t)``; this returns ``r`` (so it compares with :func:`spectral_radius`, which it is
    never below, and which it equals for a constant delay). Found by bisection on the radius of
    the circle on which the stability test of the module docstring is run.

    Args:
        mu: algorithmic momentum.
        a: ``lr * lambda``.
        staleness_pmf: ``P(tau = l)``; truncated with :func:`truncate_pmf`.
        tail_mass: see :func:`truncate_pmf`.
    """
    pmf = truncate_pmf(staleness_pmf, tail_mass)
    mu, a = check_real(mu, "mu"), check_real(a, "a")
    mus = np.array([mu])
    low = mean_field = spectral_radius(mu, a, pmf, tail_mass=0.0)
    high = max(2.0 * low, 1.0)
    while not _stability_at(mus, a, pmf, high, "mean_square")[0]:
        if high > 1e6:  # only for absurd inputs: say so instead of looping
            return math.inf
        low, high = high, 2.0 * high
    for _ in range(48):
        middle = 0.5 * (low + high)
        # Near the mean-field root the integrand peaks: sample the circle more densely there.
        gap = max(middle - mean_field, 1e-9)
        points = min(_MAX_FREQUENCIES, max(_points_for(pmf), 1 << math.ceil(math.log2(16 / gap))))
        if _stability_at(mus, a, pmf, middle, "mean_square", points)[0]:
            high = middle
        else:
            low = middle
        if high - low < 1e-7:
            break
    return high


def largest_stable_momentum(
    a: float,
    staleness_pmf: Any,
    *,
    cap: float,
    floor: float = formulas.DEFAULT_MOMENTUM_BOUNDS[0],
    margin: float = 0.0,
    curvature_margin: float = 0.0,
    criterion: Criterion = "mean_square",
    tail_mass: float = DEFAULT_TAIL_MASS,
    grid_step: float = 0.05,
    tolerance: float = 1e-3,
) -> float:
    """The largest momentum in ``[floor, cap]`` at which the delayed heavy ball is stable.

    Stable means: the radius (see ``criterion``) stays below ``1 - margin`` for a curvature
    inflated by ``1 + curvature_margin`` (a safety factor on ``lr * lambda_max``, which also
    absorbs estimation error). The radius is not monotone in ``mu``, so the momenta
    ``cap, cap - grid_step, ...`` are tested first, and the gap above the largest stable one is
    then bisected to ``tolerance``. If no momentum in the range is stable (the learning rate is
    too large for this staleness), the one with the smallest radius on the grid is returned:
    the least unstable choice.

    Args:
        a: ``lr * lambda_max``, learning rate times the largest curvature (>= 0).
        staleness_pmf: ``P(tau = l)``; truncated with :func:`truncate_pmf`.
        cap: the largest momentum to return (the target), in (-1, 1).
        floor: the smallest momentum to return, in (-1, cap].
        margin: required decay per step, in [0, 1).
        curvature_margin: relative safety factor on ``a`` (>= 0).
        criterion: ``"mean_square"`` (default) or ``"mean_field"``; see :func:`is_stable`.
        tail_mass: see :func:`truncate_pmf`.
        grid_step: spacing of the scan (> 0).
        tolerance: width of the final bisection (> 0).
    """
    a = check_real(a, "a = lr * lambda_max", minimum=0.0)
    cap = check_momentum(cap, "cap")
    floor = check_momentum(floor, "floor")
    if floor > cap:
        raise ValueError(f"floor must be <= cap, got floor={floor!r}, cap={cap!r}")
    margin = check_real(margin, "margin", minimum=0.0, maximum=1.0, max_inclusive=False)
    curvature_margin = check_real(curvature_margin, "curvature_margin", minimum=0.0)
    grid_step = check_real(grid_step, "grid_step", minimum=0.0, min_inclusive=False)
    tolerance = check_real(tolerance, "tolerance", minimum=0.0, min_inclusive=False)
    criterion = check_choice(criterion, "criterion", CRITERIA)
    pmf = truncate_pmf(staleness_pmf, tail_mass)
    a_test = a * (1.0 + curvature_margin)
    radius = 1.0 - margin
    # Every test below is on the one circle of this radius: its transform is taken once.
    circle = _circle(pmf, np.array([[radius]]), _points_for(pmf))

    def stable(mus: np.ndarray) -> np.ndarray:
        return _stability_at(mus, a_test, pmf, radius, criterion, circle=circle)

    steps = math.floor((cap - floor) / grid_step + 1e-9)
    grid = np.append(cap - grid_step * np.arange(steps + 1), floor)
    grid = grid[grid >= floor - 1e-12]
    index = _first_stable(grid, stable)  # the largest stable momentum of the grid
    if index is None:
        return _least_unstable(grid, a_test, pmf, criterion)
    if index == 0:
        return cap
    low, high = float(grid[index]), float(grid[index - 1])
    while high - low > tolerance:
        middle = 0.5 * (low + high)
        if stable(np.array([middle]))[0]:
            low = middle
        else:
            high = middle
    return low


def _first_stable(grid: np.ndarray, stable: Any) -> int | None:
    """The index of the first momentum of ``grid`` that ``stable`` passes (``None``: none).

    Tested from the top in chunks, the cap alone first: the answer is often near the top, a
    momentum costs about as much as the call around it, and the verdicts do not depend on the
    chunking. A scan of the whole grid costs about 20 ms on a CPU core.
    """
    start, size = 0, 1
    while start < grid.size:
        verdict = stable(grid[start : start + size])
        if verdict.any():
            return start + int(np.argmax(verdict))
        start, size = start + size, _SCAN_CHUNK
    return None


def _least_unstable(grid: np.ndarray, a: float, pmf: np.ndarray, criterion: Criterion) -> float:
    """The momentum of ``grid`` with the smallest radius (bisection on all radii at once).

    A momentum whose radius is known to exceed another's (its lower end above the other's upper
    end) cannot be the answer and leaves the bisection: after a few halvings only the close
    contenders are still tested, each on its own row, so the answer is the one the bisection
    of every momentum to the end gives.
    """
    low = np.zeros(grid.size)
    high = np.ones(grid.size)
    # Double the radius until every momentum is stable on it (one radius for all, where the
    # bisection starts). A momentum stable on a circle is not tested on the larger ones: that
    # it stays stable there is the premise of the bisection on the radius itself.
    unstable = np.arange(grid.size)
    while high[0] < 1e6:
        unstable = unstable[~_stability_at(grid[unstable], a, pmf, high[0], criterion)]
        if not unstable.size:
            break
        high *= 2.0
    contenders = np.arange(grid.size)
    for _ in range(30):
        middle = 0.5 * (low[contenders] + high[contenders])
        verdict = _stability_at(grid[contenders], a, pmf, middle, criterion)
        high[contenders] = np.where(verdict, middle, high[contenders])
        low[contenders] = np.where(verdict, low[contenders], middle)
        contenders = contenders[low[contenders] <= high.min()]
    return float(grid[int(np.argmin(high))])


# -- the observed staleness -----------------------------------------------------------------------


class StalenessHistogram:
    """Histogram of the staleness of the last ``window`` applied gradients.

    Bounded twice: a ring of the last ``window`` observations (older ones leave the histogram,
    so it follows a change of regime within ``window`` updates) and a cap ``max_staleness`` at
    which larger values are counted (a straggler of ``tau = 10_000`` costs one bin, not a
    10,000-long array). Observing costs O(1).

    Args:
        window: number of recent observations kept (>= 1).
        max_staleness: largest bin; larger observations are counted there (>= 0).
    """

    def __init__(self, window: int = 4096, max_staleness: int = 1024) -> None:
        self.window = check_int(window, "window", 1)
        self.max_staleness = check_int(max_staleness, "max_staleness", 0)
        self._ring = np.zeros(window, dtype=np.int64)
        self._counts = np.zeros(max_staleness + 1, dtype=np.int64)
        self._observed = 0
        self._total = 0  # the sum of the window's (capped) observations, kept for `mean`

    def observe(self, tau: int) -> None:
        """Count the staleness of one applied gradient.

        Args:
            tau: updates applied between the gradient's read and its application (>= 0).
        """
        value = min(check_staleness(tau), self.max_staleness)
        slot = self._observed % self.window
        if self._observed >= self.window:
            leaving = int(self._ring[slot])
            self._counts[leaving] -= 1
            self._total -= leaving
        self._ring[slot] = value
        self._counts[value] += 1
        self._total += value
        self._observed += 1

    @property
    def count(self) -> int:
        """Observations so far (not bounded by the window)."""
        return self._observed

    @property
    def size(self) -> int:
        """Observations in the histogram now: ``min(count, window)``."""
        return min(self._observed, self.window)

    @property
    def mean(self) -> float:
        """Mean staleness of the window (capped values count at the cap); 0 when empty."""
        if self.size == 0:
            return 0.0
        return self._total / self.size

    def pmf(self, tail_mass: float = DEFAULT_TAIL_MASS) -> np.ndarray | None:
        """Empirical ``P(tau = l)`` of the window, truncated by :func:`truncate_pmf`.

        ``None`` before the first observation.

        Args:
            tail_mass: see :func:`truncate_pmf`.
        """
        if self.size == 0:
            return None
        return truncate_pmf(self._counts, tail_mass)

    def reset(self) -> None:
        """Forget every observation."""
        self._ring[:] = 0
        self._counts[:] = 0
        self._observed = 0
        self._total = 0

    def state_dict(self) -> dict[str, Any]:
        """The observations of the window, oldest first, and the total count."""
        size = self.size
        order = (self._observed - size + np.arange(size)) % self.window
        # A tensor, not a numpy array: torch.load(weights_only=True) refuses numpy objects.
        recent = torch.from_numpy(self._ring[order].copy())
        return {"format": STATE_FORMAT, "count": self._observed, "recent": recent}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore observations from :meth:`state_dict` (the configuration stays this object's).

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        check_state(
            state_dict, "StalenessHistogram", expected_format=STATE_FORMAT, keys=("count", "recent")
        )
        recent = np.asarray(state_dict["recent"], dtype=np.int64).ravel()
        try:
            count = check_int(state_dict["count"], "count", 0, maximum=MAX_COUNT)
        except ValueError as error:
            raise ValueError(f"StalenessHistogram state is corrupt: {error}") from None
        if (recent < 0).any() or count < recent.size:
            raise ValueError("StalenessHistogram state is corrupt: bad 'count' or 'recent'")
        recent = np.minimum(recent[-self.window :], self.max_staleness)
        self.reset()
        # Put the kept observations where the ring's cursor (count % window) expects them.
        self._ring[(count - recent.size + np.arange(recent.size)) % self.window] = recent
        self._counts[:] = np.bincount(recent, minlength=self._counts.size)
        self._total = int(recent.sum())
        self._observed = count

    def __repr__(self) -> str:
        return (
            f"StalenessHistogram(size={self.size}, mean={self.mean:.3g}, window={self.window}, "
            f"max_staleness={self.max_staleness})"
        )
