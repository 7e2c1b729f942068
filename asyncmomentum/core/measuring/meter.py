"""Momentum meter: the total momentum a run actually has, measured from its own trajectory.

Every applied update moves the parameters by ``D_{t+1} = w_{t+1} - w_t``. A heavy ball with
momentum ``m`` spreads a gradient over the following increments as ``-lr m^k``; asynchrony spreads
it further, because the gradient computed at version ``s`` is applied ``tau`` updates later. The
meter measures that spreading directly: it attributes each gradient to the version it was
*computed at* (the version the optimizer read, not the one it was applied at) and fits the
lag kernel ``K`` of

    D_{t+1} = sum_{k=0..L} K(k) g_{t-k} + noise,        g_s = gradient computed at version s,

by least squares, pooled over a fixed random sample of coordinates. With algorithmic momentum
``mu`` and staleness ``P(tau = l) = p(l)`` the kernel is ``K = -lr (p * mu^k)``, so the share
of a gradient's total effect that lands in the first update is

    kappa_0 = K(0) / sum K = p(0) (1 - mu).

A heavy ball with momentum ``m`` has ``kappa_0 = 1 - m``; the meter reports

    total = 1 - kappa_0        (the heavy ball with the same immediate share),

which is ``mu`` without asynchrony and ``1 - 1/M`` for ``M`` memoryless workers with ``mu = 0``
(``p(0) = 1/M``). Given the algorithmic momentum the optimizer applied, it also splits the
total into ``algorithmic`` and ``implicit = 1 - kappa_0 / (1 - mu)`` and composes them under
any tuning rule (:class:`Composition`). The derivation, why the *applied* gradient cannot work,
and the measured accuracy are in ``docs/momentum-meter.md``. The closed-loop rule
(:class:`~asyncmomentum.core.tuning.rules.closed_loop.ClosedLoopRule`) feeds on its readings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from asyncmomentum.core import formulas
from asyncmomentum.core.validation import check_int, check_real, check_state

__all__ = ["Composition", "MomentumMeter", "MomentumReading"]

#: Layout version of the state dicts of this module.
STATE_FORMAT = 1

# Parameter dtypes numpy can view without a copy.
_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)
# A tail ratio above this is not extrapolated (the kernel does not decay within the window).
_MAX_TAIL_RATIO = 0.9
# Ridge added to the normal equations, relative to their mean diagonal: only against exact
# singularity (a coordinate that never moves), far below the statistical noise.
_RIDGE = 1e-9


class Composition(Protocol):
    """How algorithmic and implicit momentum compose to a total.

    Every tuning rule (:class:`~asyncmomentum.core.tuning.rules.base.TuningRule`) is one.
    """

    def total_momentum(self, algorithmic: float, implicit: float) -> float:
        """The total momentum of ``algorithmic`` on top of ``implicit``.

        Args:
            algorithmic: the momentum an optimizer applies.
            implicit: the implicit momentum of the asynchrony.
        """
        ...


def _check_composition(rule: Any) -> Composition | None:
    if rule is not None and not callable(getattr(rule, "total_momentum", None)):
        raise ValueError(
            "rule must be a tuning rule object (e.g. asyncmomentum.core.tuning.rules."
            f"make_rule(name)) or None for the additive composition, got {rule!r}"
        )
    return rule


@dataclass(frozen=True)
class MomentumReading:
    """One measurement of the momentum of a run.

    Attributes:
        total: measured total momentum ``1 - kappa_0`` (no assumption about the optimizer).
        immediate_share: ``kappa_0``, the share of a gradient's total effect on the parameters
            that lands in the first update after the version it was computed at.
        algorithmic: mean algorithmic momentum of the measured updates, as recorded
            (``nan`` if the optimizer did not say).
        implicit: ``1 - kappa_0 / (1 - algorithmic)``: the momentum the asynchrony adds.
        standard_error: standard error of ``total`` by a delete-one-block jackknife over four
            time blocks of the window (``nan`` if it could not be computed).
        rows: number of increments (versions) the fit used.
        coordinates: number of coordinates the fit used.
        kernel: fitted lag kernel ``K(k) / sum K``, ``k = 0 .. max_lag``.
        serial: how many readings the meter had produced when this one was made (starts at 1).
    """

    total: float
    immediate_share: float
    algorithmic: float
    implicit: float
    standard_error: float
    rows: int
    coordinates: int
    kernel: np.ndarray
    serial: int

    def total_momentum(self, rule: Composition | None = None) -> float:
        """Algorithmic and measured implicit momentum composed under ``rule``.

        The compositional rule gives :attr:`total` whatever the algorithmic momentum; the
        additive one (and the feedback rules) ``algorithmic + implicit``. Without a recorded
        algorithmic momentum this is :attr:`total`.

        Args:
            rule: a tuning rule object (its ``total_momentum``); ``None``: the additive
                composition.
        """
        _check_composition(rule)
        if math.isnan(self.algorithmic):
            return self.total
        if rule is None:
            return formulas.additive_total(self.algorithmic, self.implicit)
        return rule.total_momentum(self.algorithmic, self.implicit)


class MomentumMeter:
    """Measures the total momentum of a run from a fixed random sample of its coordinates.

    Call :meth:`record` once per applied update, right after the parameters changed, with the
    update's version and the version its gradient was computed at. The meter reads the sampled
    coordinates of the parameters (``p``) and of the applied gradient (``p.grad``) itself:
    ``2 * tensors`` small gathers per update, on the parameters' device. Every ``refresh``
    updates it fits the lag kernel on the last ``window`` versions (two ``(n, C) x (C, n)``
    products with ``n <= window``, ``C = coordinates``; timings in ``docs/performance.md``)
    and publishes a :class:`MomentumReading`.

    Assumptions: every update of these parameters goes through :meth:`record` with consecutive
    versions (one optimizer owns them: a simulator, a parameter server; a gap resets the
    meter); gradients are dense. See ``docs/momentum-meter.md`` for the limits.

    Args:
        params: the optimizer's parameters: an iterable of tensors or of param-group dicts
            (from groups, :meth:`record` reads ``lr`` and ``momentum`` of the first group when
            they are not given).
        coordinates: number of sampled coordinates (>= 1).
        max_tensors: coordinates are drawn from at most this many tensors, chosen with
            probability proportional to their size (each tensor costs two gathers per update).
        block: coordinates come in aligned runs of this many consecutive elements (8 float32
            are half a cache line): scattered values right after the optimizer streamed every
            parameter cost cache misses, runs of 8 a tenth of them (``docs/performance.md``).
        window: number of recent versions kept (>= ``max_lag + min_rows + 2``).
        max_lag: length ``L`` of the fitted kernel (>= 1); longer staleness or momentum
            memory is extrapolated geometrically.
        refresh: updates between fits (>= 1).
        period: if given (> ``window``), measure in spans: record the ``window`` updates whose
            version is below ``window`` modulo ``period``, fit at the end of each span, and do
            nothing (one modulo) for the others. Divides the cost by ``period / window`` at the
            price of a reading every ``period`` updates; ``None`` (the default) records all.
        min_rows: fewest increments a fit uses; no reading before.
        rule: composition of :attr:`measured_total_momentum`: a tuning rule object (e.g. the
            optimizer's tracker's ``rule``); ``None``: the additive composition.
        seed: seed of the coordinate sample.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[Mapping[str, Any]],
        *,
        coordinates: int = 512,
        max_tensors: int = 8,
        block: int = 8,
        window: int = 512,
        max_lag: int = 48,
        refresh: int = 256,
        period: int | None = None,
        min_rows: int = 128,
        rule: Composition | None = None,
        seed: int = 0,
    ) -> None:
        for name, value, minimum in (
            ("coordinates", coordinates, 1),
            ("max_tensors", max_tensors, 1),
            ("block", block, 1),
            ("max_lag", max_lag, 1),
            ("refresh", refresh, 1),
            ("min_rows", min_rows, 1),
            ("seed", seed, 0),
        ):
            check_int(value, name, minimum)
        check_int(window, "window", max_lag + min_rows + 2)
        if period is not None:
            check_int(period, "period", window + 1)
        self.period = period
        self.rule = _check_composition(rule)
        self.window = window
        self.max_lag = max_lag
        self.refresh = refresh
        self.min_rows = min_rows
        self._groups, tensors = _split_params(params)
        self._tensors, self._indices = _sample_coordinates(
            tensors, coordinates, max_tensors, block, np.random.default_rng(seed)
        )
        self.coordinates = sum(int(i.numel()) for i in self._indices)
        device = self._tensors[0].device
        # On the CPU the gathers go through numpy: a torch op costs about ten times as much in
        # dispatch, which matters at two gathers per tensor per update.
        self._on_cpu = device.type == "cpu"
        stops = np.cumsum([int(i.numel()) for i in self._indices])
        self._layout = [
            (tensor, index.cpu().numpy(), int(stop - index.numel()), int(stop))
            for tensor, index, stop in zip(self._tensors, self._indices, stops, strict=True)
        ]
        # Rings indexed by version % window: parameters at a version, and the sum (and count)
        # of the gradients computed at that version. On the parameters' device, so that
        # recording never waits for an accelerator; a fit copies the window to the CPU.
        self._params_ring = torch.zeros(
            window, self.coordinates, dtype=torch.float32, device=device
        )
        self._grads_ring = torch.zeros_like(self._params_ring)
        self._param_views: list[tuple[int, np.ndarray | None] | None] = [None] * len(self._layout)
        self._ring_views = self._views_of_rings()
        self._grad_counts = np.zeros(window, dtype=np.int64)
        self._lrs = np.zeros(window)  # per update (indexed by its version)
        self._momenta = np.full(window, np.nan)
        self._staleness = np.zeros(window, dtype=np.int64)  # recent tau, for the settling delay
        self._first: int | None = None  # first version whose parameters are known
        self._newest: int | None = None  # newest version whose parameters are known
        self._records = 0
        self._since_fit = 0
        self.dropped = 0  # gradients computed at versions that had left the window
        self.gaps = 0  # resets after non-consecutive versions
        self._reading: MomentumReading | None = None
        self._serial = 0

    def _views_of_rings(self) -> tuple[np.ndarray, ...]:
        """NumPy views of (parameter ring, gradient ring) on the CPU: no torch op per write."""
        if not self._on_cpu:
            return ()
        return self._params_ring.numpy(), self._grads_ring.numpy()

    # -- recording ------------------------------------------------------------------------------

    @torch.no_grad()
    def record(
        self,
        version: int,
        version_read: int,
        *,
        lr: float | None = None,
        momentum: float | None = None,
    ) -> None:
        """Record one applied update. Call it right after the parameters changed.

        Args:
            version: the update's version: the parameters went from version ``version`` to
                ``version + 1`` (``VersionClock.tick()``'s return value).
            version_read: the version the applied gradient was computed at
                (``version - staleness``).
            lr: learning rate of the update (increments are divided by it, so a schedule does not
                distort the kernel); default: the first group's, else 1.
            momentum: algorithmic momentum of the update; default: the first group's, else
                unknown (the reading's ``algorithmic`` is then ``nan``).
        """
        version = check_int(version, "version", 0)
        version_read = check_int(version_read, "version_read", 0)
        if version_read > version:
            raise ValueError(
                f"version_read ({version_read}) must be <= version ({version}): a gradient "
                "cannot be computed at parameters newer than the update applying it"
            )
        if self.period is not None and version % self.period >= self.window:
            self._pause()
            return
        lr, momentum = self._group_hyperparameters(lr, momentum)
        if any(t.grad is not None and t.grad.is_sparse for t in self._tensors):
            raise ValueError(
                "MomentumMeter does not support sparse gradients; build it over the dense "
                "parameters only"
            )
        if self._newest is None or version != self._newest:
            if self._newest is not None:
                self.gaps += 1
            self._restart(version + 1)
        else:
            self._advance(version, lr, momentum)
        self._add_gradient(version, version_read)
        self._records += 1
        self._since_fit += 1
        if self._since_fit >= self.refresh:
            self._since_fit = 0
            self.estimate()

    def _pause(self) -> None:
        """Between measuring spans: fit what the span recorded, once, then idle.

        The next span starts afresh, which is not a gap.
        """
        if self._newest is None:
            return
        self._since_fit = 0
        self.estimate()
        self._newest = None

    def _group_hyperparameters(
        self, lr: float | None, momentum: float | None
    ) -> tuple[float, float]:
        group = self._groups[0] if self._groups else {}
        if lr is None:
            lr = group.get("lr", 1.0)
        if momentum is None:
            momentum = group.get("momentum")
        lr = check_real(lr, "lr", minimum=0.0, allow_tensor=True)
        return lr, math.nan if momentum is None else float(momentum)

    def _gather_into(self, ring: Tensor, slot: int, *, grad: bool, add: bool) -> None:
        """Write or add the sampled coordinates of the parameters (or gradients) into a ring.

        Writes (``add=False``) or adds the sampled coordinates of the parameters, or of their
        gradients (``grad=True``), into ``ring[slot]``. A tensor without a gradient contributes
        zeros: the update did not touch it.
        """
        if not self._on_cpu:
            parts = []
            for tensor, index in zip(self._tensors, self._indices, strict=True):
                source = tensor.grad if grad else tensor
                if source is None:
                    parts.append(torch.zeros(index.numel(), device=index.device))
                else:
                    parts.append(torch.take(source.detach(), index).float())
            row = torch.cat(parts)
            if add:
                ring[slot].add_(row)
            else:
                ring[slot].copy_(row)
            return
        out = self._ring_views[ring is self._grads_ring][slot]
        for k, (tensor, positions, start, stop) in enumerate(self._layout):
            values = self._sampled(k, tensor, positions, grad)
            if values is None:
                if not add:
                    out[start:stop] = 0.0
            elif add:
                out[start:stop] += values
            else:
                out[start:stop] = values

    def _sampled(self, k: int, tensor: Tensor, index: np.ndarray, grad: bool) -> np.ndarray | None:
        """The sampled values of a CPU tensor (or of its gradient), through a numpy view."""
        if grad:
            source = tensor.grad
            if source is None:
                return None
            view = _flat_view(source)
        else:
            # The view of a parameter is kept while its storage stays (optimizers update in
            # place); a new storage (``p.data = ...``) gets a new view.
            source, pointer = tensor, tensor.data_ptr()
            cached = self._param_views[k]
            if cached is None or cached[0] != pointer:
                cached = self._param_views[k] = (pointer, _flat_view(tensor))
            view = cached[1]
        if view is None:  # strided or bfloat16: let torch index it
            return torch.take(source.detach(), torch.from_numpy(index)).float().numpy()
        return view[index]

    def _restart(self, version: int) -> None:
        self._first = self._newest = version
        self._grad_counts[:] = 0
        self._grads_ring.zero_()
        self._gather_into(self._params_ring, version % self.window, grad=False, add=False)

    def _advance(self, version: int, lr: float, momentum: float) -> None:
        slot = (version + 1) % self.window
        self._gather_into(self._params_ring, slot, grad=False, add=False)
        if self._on_cpu:  # version + 1 is new: no gradient computed at it yet
            self._ring_views[1][slot] = 0.0
        else:
            self._grads_ring[slot] = 0.0
        self._grad_counts[slot] = 0
        self._lrs[version % self.window] = lr
        self._momenta[version % self.window] = momentum
        self._newest = version + 1

    def _add_gradient(self, version: int, version_read: int) -> None:
        self._staleness[self._records % self.window] = version - version_read
        # record() set both before it adds a gradient.
        assert self._first is not None
        assert self._newest is not None
        oldest = max(self._first, self._newest - self.window + 1)
        if version_read < oldest:
            self.dropped += 1
            return
        slot = version_read % self.window
        self._gather_into(self._grads_ring, slot, grad=True, add=True)
        self._grad_counts[slot] += 1

    # -- estimation -----------------------------------------------------------------------------

    @property
    def reading(self) -> MomentumReading | None:
        """The latest reading (refreshed every ``refresh`` records), ``None`` before enough data."""
        return self._reading

    @property
    def measured_total_momentum(self) -> float | None:
        """The latest reading's total momentum composed under :attr:`rule`; ``None`` before."""
        return None if self._reading is None else self._reading.total_momentum(self.rule)

    def settle(self) -> int:
        """Versions newer than this many updates are not fitted yet.

        Their gradients may still come (the 99th percentile of the recent staleness, at least 1).
        """
        recent = self._staleness[: min(self._records, self.window)]
        if recent.size == 0:
            return 1
        return max(1, int(np.quantile(recent, 0.99, method="higher")))

    @torch.no_grad()
    def estimate(self) -> MomentumReading | None:
        """Fit the kernel now on the window; update and return :attr:`reading`.

        Returns:
            The new reading; ``None``, the previous reading kept, if there is not enough data.
        """
        if self._newest is None:
            return None
        newest, first = self._newest, self._first
        assert first is not None  # set with _newest
        low = max(first, newest - self.window + 1)
        high = newest - 1 - self.settle()  # the last update whose regressors are complete
        rows = high - (low + self.max_lag) + 1
        if rows < self.min_rows:
            return None
        versions = np.arange(low, high + 1)
        slots = torch.as_tensor(versions % self.window, device=self._params_ring.device)
        params = self._params_ring.index_select(0, slots).cpu().double()
        following = self._params_ring[(high + 1) % self.window].cpu().double()
        grads = self._grads_ring.index_select(0, slots).cpu().double()
        increments = torch.diff(params, dim=0, append=following[None])  # update v: w_{v+1} - w_v
        lrs = self._lrs[versions % self.window]
        increments /= torch.as_tensor(np.where(lrs > 0, lrs, 1.0))[:, None]
        fit = _fit_kernel(grads, increments, self.max_lag)
        if fit is None:
            return None
        momenta = self._momenta[versions[self.max_lag :] % self.window]
        algorithmic = float(np.mean(momenta)) if not np.isnan(momenta).any() else math.nan
        reading = _reading_from(fit, algorithmic, rows, self._serial + 1)
        if reading is None:
            return None
        self._serial += 1
        self._reading = reading
        return reading

    # -- lifecycle ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the trajectory (the coordinate sample stays)."""
        self._first = self._newest = None
        self._grad_counts[:] = 0
        self._records = self._since_fit = 0
        self._reading = None

    def state_dict(self) -> dict[str, Any]:
        """Everything the meter has seen (rings, counters, latest reading's serial)."""
        return {
            "format": STATE_FORMAT,
            "coordinates": self.coordinates,
            "params_ring": self._params_ring.cpu().clone(),
            "grads_ring": self._grads_ring.cpu().clone(),
            # Tensors, not numpy arrays: torch.load(weights_only=True) refuses numpy objects.
            "grad_counts": torch.from_numpy(self._grad_counts.copy()),
            "lrs": torch.from_numpy(self._lrs.copy()),
            "momenta": torch.from_numpy(self._momenta.copy()),
            "staleness": torch.from_numpy(self._staleness.copy()),
            "first": self._first,
            "newest": self._newest,
            "records": self._records,
            "since_fit": self._since_fit,
            "serial": self._serial,
            "dropped": self.dropped,
            "gaps": self.gaps,
        }

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can take ``state_dict``.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        check_state(
            state_dict, "MomentumMeter", expected_format=STATE_FORMAT, keys=_METER_STATE_KEYS
        )
        shape = (self.window, self.coordinates)
        for key in ("params_ring", "grads_ring"):
            ring = state_dict[key]
            if not isinstance(ring, Tensor) or tuple(ring.shape) != shape:
                found = tuple(ring.shape) if isinstance(ring, Tensor) else type(ring).__name__
                raise ValueError(
                    f"MomentumMeter state has a {key} of shape {found} but this meter keeps "
                    f"{shape}: build it with the same window and coordinates"
                )
            if not ring.is_floating_point() or not bool(torch.isfinite(ring).all()):
                raise ValueError(f"MomentumMeter state is corrupt: a non-finite {key}")
        for key in ("grad_counts", "lrs", "momenta", "staleness"):
            value = state_dict[key]
            if not isinstance(value, Tensor) or tuple(value.shape) != (self.window,):
                raise ValueError(f"MomentumMeter state is corrupt: {key} is not {self.window} long")
        for key in ("records", "since_fit", "serial", "dropped", "gaps"):
            check_int(state_dict[key], f"MomentumMeter state {key}", 0)
        for key in ("first", "newest"):
            if state_dict[key] is not None:
                check_int(state_dict[key], f"MomentumMeter state {key}", 0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` of a meter built with the same arguments.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        self.check_state_dict(state_dict)
        device = self._params_ring.device
        self._params_ring = state_dict["params_ring"].to(device, torch.float32).clone()
        self._grads_ring = state_dict["grads_ring"].to(device, torch.float32).clone()
        self._ring_views = self._views_of_rings()
        self._grad_counts = np.asarray(state_dict["grad_counts"], dtype=np.int64).copy()
        self._lrs = np.asarray(state_dict["lrs"], dtype=np.float64).copy()
        self._momenta = np.asarray(state_dict["momenta"], dtype=np.float64).copy()
        self._staleness = np.asarray(state_dict["staleness"], dtype=np.int64).copy()
        self._first, self._newest = state_dict["first"], state_dict["newest"]
        self._records = int(state_dict["records"])
        self._since_fit = int(state_dict["since_fit"])
        self._serial = int(state_dict["serial"]) - 1
        self.dropped, self.gaps = int(state_dict["dropped"]), int(state_dict["gaps"])
        self._reading = None
        if self._serial >= 0:
            self.estimate()
        self._serial = max(self._serial, int(state_dict["serial"]))

    def __repr__(self) -> str:
        total = None if self._reading is None else round(self._reading.total, 4)
        return (
            f"MomentumMeter(coordinates={self.coordinates}, tensors={len(self._tensors)}, "
            f"window={self.window}, max_lag={self.max_lag}, records={self._records}, "
            f"total={total})"
        )


# -- the fit --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _KernelFit:
    kernel: np.ndarray  # K(0..L)
    tail: float  # extrapolated sum of K beyond L
    share_error: float  # jackknife standard error of kappa_0
    coordinates: int


#: Time blocks of the delete-one-block jackknife that gives a reading's standard error.
_JACKKNIFE_BLOCKS = 4


def _fit_kernel(grads: Tensor, increments: Tensor, max_lag: int) -> _KernelFit | None:
    """Least-squares lag kernel of ``increments[t] = sum_k K(k) grads[t - k]``, ``t >= max_lag``.

    ``grads`` and ``increments`` are ``(versions, coordinates)``: row ``v`` holds the gradient
    computed at version ``v`` and the increment of update ``v``. Each coordinate is scaled by
    the RMS of its gradients so that every coordinate weighs alike (a robust pooling: no layer
    with large gradients dominates); the kernel itself is scale free. The normal equations are
    summed per block of consecutive rows, so that a delete-one-block jackknife gives an honest
    error: the noise of the fit is the timing of the updates, shared by all coordinates and
    correlated in time, which a per-observation least-squares error misses by 10x.
    """
    scale = grads.pow(2).mean(dim=0).sqrt()
    used = scale > 0
    if int(used.sum()) == 0:
        return None
    grads = grads[:, used] / scale[used]
    increments = increments[:, used] / scale[used]
    versions, lags = grads.shape[0], max_lag + 1
    first_row = max_lag
    bounds = torch.linspace(first_row, versions, _JACKKNIFE_BLOCKS + 1).round().long()
    products = grads @ grads.T  # products[u, s] = <g_u, g_s>
    cross = increments @ grads.T  # cross[t, s] = <y_t, g_s>
    gram = torch.empty(_JACKKNIFE_BLOCKS, lags, lags, dtype=torch.float64)
    response = torch.empty(_JACKKNIFE_BLOCKS, lags, dtype=torch.float64)
    lag_index = torch.arange(lags)
    for offset in range(lags):
        # gram[j, j + d] sums <g_{t-j}, g_{t-j-d}> over rows t; diagonal[i] = <g_{i+d}, g_i>,
        # so row t and lag j read i = t - j - d: block sums are differences of a cumsum.
        cumulative = _cumsum0(torch.diagonal(products, -offset))
        j = lag_index[: lags - offset]
        sums = (
            cumulative[bounds[1:, None] - j - offset] - cumulative[bounds[:-1, None] - j - offset]
        )
        gram[:, j, j + offset] = sums
        gram[:, j + offset, j] = sums
        # response[k] sums <y_t, g_{t-k}>; diagonal[i] = <y_{i+k}, g_i> reads i = t - k.
        cumulative = _cumsum0(torch.diagonal(cross, -offset))
        response[:, offset] = cumulative[bounds[1:] - offset] - cumulative[bounds[:-1] - offset]
    kernel = _solve(gram.sum(dim=0), response.sum(dim=0))
    if kernel is None:
        return None
    partials: list[float] = []
    for block in range(_JACKKNIFE_BLOCKS):
        partial = _solve(gram.sum(dim=0) - gram[block], response.sum(dim=0) - response[block])
        if partial is not None:
            partials.append(_immediate_share(partial))
    shares = np.array([x for x in partials if math.isfinite(x)])
    count = shares.size
    error = (
        math.sqrt((count - 1) / count * np.sum((shares - shares.mean()) ** 2))
        if count > 1
        else math.nan
    )
    return _KernelFit(kernel, _geometric_tail(kernel), error, int(used.sum()))


def _cumsum0(values: Tensor) -> Tensor:
    """Cumulative sums with a leading 0: ``out[b] - out[a]`` is ``values[a:b].sum()``."""
    return torch.cat([values.new_zeros(1), values.cumsum(0)])


def _solve(gram: Tensor, response: Tensor) -> np.ndarray | None:
    """The kernel of the normal equations, ``None`` if they are singular."""
    ridge = _RIDGE * float(torch.diagonal(gram).mean()) * torch.eye(gram.shape[0], dtype=gram.dtype)
    try:
        kernel = torch.linalg.solve(gram + ridge, response)
    except RuntimeError:  # singular: no usable signal in this window
        return None
    return kernel.numpy() if bool(torch.isfinite(kernel).all()) else None


def _immediate_share(kernel: np.ndarray) -> float:
    """``kappa_0 = K(0) / sum K``, the tail included; ``nan`` if the sum vanishes."""
    total_effect = kernel.sum() + _geometric_tail(kernel)
    return float(kernel[0] / total_effect) if total_effect != 0 else math.nan


def _geometric_tail(kernel: np.ndarray) -> float:
    """Sum of the kernel beyond its last lag, extrapolated from the decay of its second half.

    With ``h1`` the sum of lags ``1 .. L/2`` and ``h2`` of ``L/2+1 .. L``, a geometric kernel
    has ``h2 / h1 = r`` for every block of ``L/2`` lags, so the rest is ``h2 r / (1 - r)``. No
    extrapolation when the blocks disagree in sign or do not decay.
    """
    half = (kernel.size - 1) // 2
    if half < 1:
        return 0.0
    h1, h2 = kernel[1 : half + 1].sum(), kernel[half + 1 : 2 * half + 1].sum()
    if h1 == 0 or np.sign(h1) != np.sign(h2) or np.sign(h1) != np.sign(kernel.sum()):
        return 0.0
    ratio = min(h2 / h1, _MAX_TAIL_RATIO)
    return float(h2 * ratio / (1.0 - ratio))


def _reading_from(
    fit: _KernelFit, algorithmic: float, rows: int, serial: int
) -> MomentumReading | None:
    share = _immediate_share(fit.kernel)
    if not math.isfinite(share):
        return None
    implicit = 1.0 - share / (1.0 - algorithmic) if not math.isnan(algorithmic) else math.nan
    return MomentumReading(
        total=1.0 - share,
        immediate_share=share,
        algorithmic=algorithmic,
        implicit=float(implicit),
        standard_error=fit.share_error,
        rows=rows,
        coordinates=fit.coordinates,
        kernel=fit.kernel / (fit.kernel.sum() + fit.tail),
        serial=serial,
    )


_METER_STATE_KEYS = (
    "params_ring",
    "grads_ring",
    "grad_counts",
    "lrs",
    "momenta",
    "staleness",
    "first",
    "newest",
    "records",
    "since_fit",
    "serial",
    "dropped",
    "gaps",
)


def _flat_view(tensor: Tensor) -> np.ndarray | None:
    """A numpy view of ``tensor``'s elements in flat (row-major) order.

    ``None`` if numpy cannot view it without a copy (strided, or a dtype numpy lacks).
    """
    if tensor.dtype not in _NUMPY_FLOATS or not tensor.is_contiguous():
        return None
    return tensor.detach().numpy().reshape(-1)


# -- coordinates ----------------------------------------------------------------------------------


def _split_params(
    params: Iterable[Tensor] | Iterable[Mapping[str, Any]],
) -> tuple[list[Mapping[str, Any]], list[Tensor]]:
    """(param groups, tensors) from an iterable of tensors or of param-group dicts."""
    items = list(params)
    if not items:
        raise ValueError("MomentumMeter needs at least one parameter, got none")
    if all(isinstance(item, Mapping) for item in items):
        groups = items
        tensors = [p for group in groups for p in group["params"]]  # type: ignore[index]
    elif all(isinstance(item, Tensor) for item in items):
        groups, tensors = [], items
    else:
        raise ValueError(
            "params must be an iterable of tensors or of param-group dicts (optimizer.param_groups)"
        )
    dense = [p for p in tensors if p.numel() > 0 and p.is_floating_point()]
    if not dense:
        raise ValueError("MomentumMeter needs at least one non-empty floating-point parameter")
    return groups, dense  # type: ignore[return-value]


def _sample_coordinates(
    tensors: list[Tensor],
    coordinates: int,
    max_tensors: int,
    block: int,
    rng: np.random.Generator,
) -> tuple[list[Tensor], list[Tensor]]:
    """Choose up to ``max_tensors`` tensors, then about ``coordinates`` flat indices in them.

    The tensors are drawn with probability proportional to size, on one device; the indices
    come in aligned runs of ``block`` consecutive elements, the runs drawn uniformly without
    replacement over the chosen tensors.
    """
    device = max(tensors, key=lambda t: t.numel()).device
    tensors = [t for t in tensors if t.device == device]
    sizes = np.array([t.numel() for t in tensors], dtype=np.float64)
    count = min(max_tensors, len(tensors))
    chosen = np.sort(rng.choice(len(tensors), size=count, replace=False, p=sizes / sizes.sum()))
    # Runs of each chosen tensor: aligned blocks, the last one possibly short.
    runs = [math.ceil(tensors[i].numel() / block) for i in chosen]
    first_run = np.concatenate([[0], np.cumsum(runs)])
    wanted = min(math.ceil(coordinates / block), int(first_run[-1]))
    picked_runs = np.sort(rng.choice(int(first_run[-1]), size=wanted, replace=False))
    picked, indices = [], []
    for i, position in enumerate(chosen):
        mine = picked_runs[(picked_runs >= first_run[i]) & (picked_runs < first_run[i + 1])]
        if mine.size == 0:
            continue
        flat = ((mine - first_run[i])[:, None] * block + np.arange(block)).ravel()
        flat = flat[flat < tensors[position].numel()]
        picked.append(tensors[position])
        indices.append(torch.as_tensor(flat, dtype=torch.long, device=device))
    return picked, indices
