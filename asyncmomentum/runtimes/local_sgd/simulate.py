"""A seeded, reproducible simulator of asynchronous local SGD (the DiLoCo family) on one core.

``M`` workers of given speeds share one global model. A worker reads the global parameters at
version ``v``, takes ``H = sync_every`` inner steps with its own inner optimizer (whose state it
keeps across rounds, as DiLoCo does), and pushes the pseudo-gradient ``params_read -
params_after_H``; the server applies it with the outer optimizer and the staleness
``tau = version_now - v`` counted in outer updates, and the worker reads the new global
parameters and starts its next round at once.

Time is simulated, not measured: a round of worker ``i`` takes ``H / speed_i`` (times a seeded
log-normal factor ``exp(jitter * N(0, 1))`` when ``jitter > 0``), and an event queue orders the
pushes (ties in time go first-in first-out, so ``M`` equal workers without jitter take turns and
every push after the first round is exactly ``M - 1`` updates stale). The inner steps of a round
are computed when its push is processed, from the parameters noted at the read, so the result
does not depend on when the host computes them, and a run is a pure function of its seed.

``synchronous=True`` runs synchronous DiLoCo instead: every round all ``M`` workers start from the
same global parameters, the outer optimizer steps once on the average pseudo-gradient
(staleness 0), and the round lasts as long as its slowest worker.

The problem (model, data, loss) is a :class:`LocalSGDProblem`; the outer optimizer is built by a
factory over the global parameters (``AsyncMomentumSGD(p, lr, momentum=0.9, nesterov=True)``,
``torch.optim.SGD``, :class:`DelayedNesterov`, ...), the inner one by a factory over a worker's
parameters (``torch.optim.AdamW``, ``torch.optim.SGD``, ...).

:class:`DelayedNesterov` is the outer optimizer of Liu et al. (2024), with two variants that use
the measured staleness (see its docstring).
"""

from __future__ import annotations

import copy
import heapq
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.runtimes.local_sgd.pseudo_gradient import (
    apply_pseudo_gradient,
    check_outer_optimizer,
    check_sync_every,
    flat_parameters,
)

__all__ = [
    "DelayedNesterov",
    "LocalSGDHistory",
    "LocalSGDProblem",
    "applied_momentum",
    "simulate_local_sgd",
]

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


@dataclass(frozen=True)
class LocalSGDProblem:
    """What the simulator trains: a model, its data and its loss, behind one small interface.

    Attributes:
        name: a short name for tables.
        make_model: ``seed -> nn.Module`` with seeded initial weights (the global model).
        loss_fn: ``(model, batch) -> scalar loss``, the inner steps' objective.
        batches: ``seed -> endless iterator of batches``; worker ``i`` of a run with seed ``s``
            draws from ``batches(worker_seed(s, i))``.
        heldout_loss: ``model -> float``, the loss on held-out data the history records.
    """

    name: str
    make_model: Callable[[int], nn.Module]
    loss_fn: Callable[[nn.Module, Any], Tensor]
    batches: Callable[[int], Iterator[Any]]
    heldout_loss: Callable[[nn.Module], float]


@dataclass
class LocalSGDHistory:
    """What a simulated run returns.

    Attributes:
        updates: outer updates applied at each evaluation.
        times: simulated wall time of each evaluation.
        losses: held-out loss at each evaluation (``inf`` once the run diverged).
        momentum: the outer momentum the outer optimizer applied at each evaluation (``nan`` for
            an optimizer without one).
        staleness: the staleness of every applied push, in order (all zeros when synchronous).
        pusher: the worker of every applied push (synchronous: ``-1``, all pushed at once).
        pushes_per_worker: pushes each worker made.
        diverged: a pseudo-gradient or the held-out loss became non-finite; the run stopped.
        inner_steps: inner steps computed, over all workers.
        final_params: the global parameters at the end, flat.
    """

    updates: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    momentum: list[float] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)
    pusher: list[int] = field(default_factory=list)
    pushes_per_worker: list[int] = field(default_factory=list)
    diverged: bool = False
    inner_steps: int = 0
    final_params: Tensor | None = None

    @property
    def final_loss(self) -> float:
        """The last recorded held-out loss."""
        return self.losses[-1] if self.losses else math.nan

    def loss_at_time(self, time: float) -> float:
        """The held-out loss of the last evaluation at or before simulated ``time``."""
        best = math.nan
        for t, loss in zip(self.times, self.losses, strict=True):
            if t <= time + 1e-9:
                best = loss
        return best

    def loss_at_update(self, update: int) -> float:
        """The held-out loss of the last evaluation at or before outer update ``update``."""
        best = math.nan
        for u, loss in zip(self.updates, self.losses, strict=True):
            if u <= update:
                best = loss
        return best


def worker_seed(seed: int, worker: int) -> int:
    """The data seed of ``worker`` in a run seeded ``seed`` (independent streams per worker)."""
    return int(np.random.SeedSequence([seed, worker, 0x10CA1]).generate_state(1)[0])


def applied_momentum(outer: torch.optim.Optimizer) -> float:
    """The outer momentum ``outer`` applies now (``nan`` where it has none).

    :class:`~asyncmomentum.AsyncMomentumSGD`: its ``algorithmic_momentum``; an optimizer with an
    ``applied_momentum`` attribute (:class:`DelayedNesterov`): that; otherwise the first group's
    ``momentum`` or ``betas[0]``.
    """
    if isinstance(outer, AsyncMomentumSGD):
        return float(outer.algorithmic_momentum)
    value = getattr(outer, "applied_momentum", None)
    if value is not None:
        return float(value)
    group = outer.param_groups[0]
    if "momentum" in group:
        return float(group["momentum"])
    if "betas" in group:
        return float(group["betas"][0])
    return math.nan


def _check_speeds(speeds: Sequence[float] | None, workers: int) -> list[float]:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if speeds is None:
        return [1.0] * workers
    speeds = [float(s) for s in speeds]
    if len(speeds) != workers:
        raise ValueError(f"speeds has {len(speeds)} entries for {workers} workers")
    if not all(math.isfinite(s) and s > 0 for s in speeds):
        raise ValueError(f"speeds must be finite and > 0, got {speeds}")
    return speeds


class _Worker:
    """One simulated worker: its own model copy, inner optimizer, data stream and clock draws."""

    def __init__(
        self,
        index: int,
        template: nn.Module,
        inner: OptimizerFactory,
        batches: Iterator[Any],
        speed: float,
    ) -> None:
        self.index = index
        self.model = copy.deepcopy(template)
        self.params: list[Tensor] = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = inner(self.params)
        self.batches = batches
        self.speed = speed
        self.read_params: Tensor | None = None
        self.read_version = 0
        self.pushes = 0

    def read(self, flat: Tensor, version: int) -> None:
        self.read_params = flat.clone()
        self.read_version = version

    def run_round(self, loss_fn: Callable[[nn.Module, Any], Tensor], steps: int) -> Tensor:
        assert self.read_params is not None
        with torch.no_grad():
            offset = 0
            for p in self.params:
                p.copy_(self.read_params[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        self.model.train()
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(self.model, next(self.batches))
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():
            return self.read_params - torch.nn.utils.parameters_to_vector(self.params)


def _evaluate(problem: LocalSGDProblem, model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        value = float(problem.heldout_loss(model))
    model.train()
    return value if math.isfinite(value) else math.inf


def simulate_local_sgd(
    problem: LocalSGDProblem,
    *,
    workers: int,
    outer: OptimizerFactory,
    inner: OptimizerFactory | None = None,
    sync_every: int = 10,
    speeds: Sequence[float] | None = None,
    jitter: float = 0.0,
    synchronous: bool = False,
    max_time: float | None = None,
    max_updates: int | None = None,
    eval_interval: float | None = None,
    seed: int = 0,
) -> LocalSGDHistory:
    """Simulate (a)synchronous local SGD and return its :class:`LocalSGDHistory`.

    Args:
        problem: model, data and loss.
        workers: ``M``, the number of workers.
        outer: ``global_params -> outer optimizer``; it must be over exactly those parameters.
        inner: ``worker_params -> inner optimizer`` (default ``SGD(lr=0.05, momentum=0.9)``).
        sync_every: ``H``, inner steps per round (``>= 1``).
        speeds: relative speed of each worker (default all 1); a round takes ``H / speed``.
        jitter: standard deviation of the log of a round's duration factor (0: none).
        synchronous: run synchronous DiLoCo (average of ``M`` pseudo-gradients per outer step).
        max_time: stop once simulated time passes this.
        max_updates: stop after this many outer updates.
        eval_interval: evaluate the held-out loss every this much simulated time (default: ten
            evaluations over ``max_time``, or one per round of ``H`` time units).
        seed: seeds the model, the workers' data and the jitter.

    Raises:
        ValueError: bad arguments (``sync_every < 1``, neither stopping rule, ...), or an outer
            optimizer over other parameters; all before anything runs.
    """
    steps = check_sync_every(sync_every)
    speeds = _check_speeds(speeds, workers)
    if max_time is None and max_updates is None:
        raise ValueError("give max_time or max_updates (or both) so the run ends")
    if max_time is not None and not (math.isfinite(max_time) and max_time > 0):
        raise ValueError(f"max_time must be finite and > 0, got {max_time}")
    if max_updates is not None and max_updates < 1:
        raise ValueError(f"max_updates must be >= 1, got {max_updates}")
    if not (math.isfinite(jitter) and jitter >= 0):
        raise ValueError(f"jitter must be finite and >= 0, got {jitter}")
    if eval_interval is None:
        eval_interval = max_time / 10 if max_time is not None else float(steps)
    if not (math.isfinite(eval_interval) and eval_interval > 0):
        raise ValueError(f"eval_interval must be finite and > 0, got {eval_interval}")
    if inner is None:

        def inner(p: list[Tensor]) -> torch.optim.Optimizer:
            return torch.optim.SGD(p, lr=0.05, momentum=0.9)

    model = problem.make_model(seed)
    params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
    optimizer = outer(params)
    check_outer_optimizer(optimizer, params)
    pool = [
        _Worker(i, model, inner, problem.batches(worker_seed(seed, i)), speeds[i])
        for i in range(workers)
    ]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC10C]))

    def duration(worker: _Worker) -> float:
        factor = math.exp(jitter * float(rng.standard_normal())) if jitter > 0 else 1.0
        return steps / worker.speed * factor

    state = _Run(problem, model, optimizer, eval_interval, max_time, max_updates)
    if synchronous:
        _run_synchronous(state, pool, params, steps, duration)
    else:
        _run_asynchronous(state, pool, params, steps, duration)
    state.history.pushes_per_worker = [w.pushes for w in pool]
    state.history.final_params = flat_parameters(params)
    return state.history


class _Run:
    """The bookkeeping both modes share: version, clock, evaluations, stopping."""

    def __init__(
        self,
        problem: LocalSGDProblem,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        eval_interval: float,
        max_time: float | None,
        max_updates: int | None,
    ) -> None:
        self.problem = problem
        self.model = model
        self.optimizer = optimizer
        self.eval_interval = eval_interval
        self.max_time = max_time
        self.max_updates = max_updates
        self.version = 0
        self.next_eval = 0.0
        self.history = LocalSGDHistory()

    def evaluate_until(self, time: float) -> None:
        """Record evaluations due up to ``time`` (the model as it stands before ``time``)."""
        while self.next_eval <= time + 1e-9 and (
            self.max_time is None or self.next_eval <= self.max_time + 1e-9
        ):
            self._record(self.next_eval)
            self.next_eval += self.eval_interval

    def _record(self, time: float) -> None:
        h = self.history
        loss = math.inf if h.diverged else _evaluate(self.problem, self.model)
        h.updates.append(self.version)
        h.times.append(time)
        h.losses.append(loss)
        h.momentum.append(applied_momentum(self.optimizer))
        if not math.isfinite(loss):
            h.diverged = True

    def done(self, next_time: float) -> bool:
        if self.history.diverged:
            return True
        if self.max_updates is not None and self.version >= self.max_updates:
            return True
        return self.max_time is not None and next_time > self.max_time + 1e-9

    def apply(self, params: list[Tensor], delta: Tensor, staleness: int) -> bool:
        """Apply a push; ``False`` (and the run marked diverged) for a non-finite one."""
        if not bool(torch.isfinite(delta).all()):
            self.history.diverged = True
            return False
        apply_pseudo_gradient(self.optimizer, params, delta, staleness=staleness)
        self.version += 1
        self.history.staleness.append(staleness)
        return True

    def finish(self, time: float) -> None:
        end = time if self.max_time is None else self.max_time
        self.evaluate_until(end)
        h = self.history
        if not h.times or h.updates[-1] != self.version or h.diverged:
            self._record(end if not h.times else max(end, h.times[-1]))


def _run_asynchronous(
    state: _Run,
    pool: list[_Worker],
    params: list[Tensor],
    steps: int,
    duration: Callable[[_Worker], float],
) -> None:
    queue: list[tuple[float, int, int]] = []
    order = 0
    flat = flat_parameters(params)
    for worker in pool:
        worker.read(flat, 0)
        heapq.heappush(queue, (duration(worker), order, worker.index))
        order += 1
    now = 0.0
    while queue:
        time, _, index = queue[0]
        state.evaluate_until(time - 1e-9 if time > 0 else 0.0)
        if state.done(time):
            break
        heapq.heappop(queue)
        now = time
        worker = pool[index]
        delta = worker.run_round(state.problem.loss_fn, steps)
        state.history.inner_steps += steps
        if not state.apply(params, delta, state.version - worker.read_version):
            break
        worker.pushes += 1
        state.history.pusher.append(index)
        worker.read(flat_parameters(params), state.version)
        heapq.heappush(queue, (now + duration(worker), order, index))
        order += 1
    state.finish(now)


def _run_synchronous(
    state: _Run,
    pool: list[_Worker],
    params: list[Tensor],
    steps: int,
    duration: Callable[[_Worker], float],
) -> None:
    now = 0.0
    while True:
        round_time = max(duration(w) for w in pool)
        state.evaluate_until(now + round_time - 1e-9)
        if state.done(now + round_time):
            break
        flat = flat_parameters(params)
        total = torch.zeros_like(flat)
        for worker in pool:
            worker.read(flat, state.version)
            total += worker.run_round(state.problem.loss_fn, steps)
            worker.pushes += 1
        state.history.inner_steps += steps * len(pool)
        now += round_time
        if not state.apply(params, total / len(pool), 0):
            break
        state.history.pusher.append(-1)
    state.finish(now)


class DelayedNesterov(torch.optim.Optimizer):
    """Delayed Nesterov (DN), the outer optimizer of Liu et al. 2024 (arXiv 2401.09135).

    Our reading of the paper's algorithm. Every push ``g`` is added to a buffer ``D`` and applied
    at once as a plain gradient step ``w -= lr * c * g`` (``c``, the "momentum activation",
    defaults to ``1 / N``). Every ``N`` pushes (a milestone) the momentum is updated with the
    buffer's mean and only then applied: ``m = beta * m + D / N``, ``w -= lr * beta * m``,
    ``D = 0``. With ``c = 1 / N`` the ``N`` pushes between milestones move the weights by exactly
    one Nesterov step on their average, ``lr * (mean(g) + beta * m)`` (torch's ``nesterov=True``
    form), the gradient part applied as the pushes arrive and the momentum part delayed: what
    synchronous DiLoCo would do with the ``N`` pseudo-gradients, without waiting for them. The
    paper sets ``N`` to the number of workers.

    The milestone step is taken by an :class:`~asyncmomentum.AsyncMomentumSGD` (Nesterov, target
    ``momentum``) on ``mean(g)``, whose gradient part is then undone (it was applied by the pushes
    already), so two variants that use the measured staleness are the same code:

    - ``tune=True``: the milestone momentum is tuned to the staleness *at the milestone level*
      (the milestones applied since the buffered pseudo-gradients' parameters were read; with
      ``N = M`` equal workers this is 0 or 1, mean ``(M - 1) / M``), so the implicit momentum
      of milestone-level asynchrony is taken out of ``beta``.
    - ``buffer="measured"``: ``N`` is ``round(1 + mean staleness)`` of the recent pushes (the
      estimated ``M``, read from a per-push tuner), re-read at every milestone; for runs where
      ``M`` is not known.

    Args:
        params: the global parameters.
        lr: the outer learning rate ``eta``.
        momentum: ``beta`` (the target, when ``tune=True``).
        buffer: ``N``, or ``"measured"``.
        activation: ``c`` (default ``1 / N``).
        tune: tune the milestone momentum to the milestone-level staleness.
    """

    accepts_staleness = True

    def __init__(
        self,
        params: Any,
        lr: float,
        momentum: float = 0.9,
        buffer: int | str = 1,
        activation: float | None = None,
        tune: bool = False,
    ) -> None:
        if not (isinstance(buffer, int) and buffer >= 1) and buffer != "measured":
            raise ValueError(f"buffer must be an integer >= 1 or 'measured', got {buffer!r}")
        super().__init__(params, {"lr": lr})
        self._params = [p for g in self.param_groups for p in g["params"]]
        self.buffer = buffer
        self.activation = activation
        self._milestone = AsyncMomentumSGD(
            self._params, lr=lr, momentum=momentum, nesterov=True, tune=tune, warmup=5
        )
        # Only a staleness meter (its gradients are zero, so its steps never move anything).
        self._meter_param = torch.zeros(1, requires_grad=True)
        self._meter = AsyncMomentumSGD([self._meter_param], lr=0.0, momentum=0.9, warmup=5)
        self._sum = [torch.zeros_like(p) for p in self._params]
        self._reads: list[int] = []  # versions the buffered pushes were read at
        self._pushes = 0
        self._milestones = 0
        self._milestone_at: list[int] = []  # pushes applied when each milestone was taken
        self._since = 0

    @property
    def size(self) -> int:
        """The buffer length ``N`` in use."""
        if self.buffer == "measured":
            return max(1, round(self._meter.estimated_workers))
        return int(self.buffer)

    @property
    def applied_momentum(self) -> float:
        """``beta`` the next milestone applies."""
        return float(self._milestone.algorithmic_momentum)

    @torch.no_grad()
    # It refuses a closure, so it returns None where torch's signature would return the loss.
    def step(  # type: ignore[override]  # noqa: D102
        self, closure: Any = None, *, staleness: int | None = None
    ) -> None:
        if closure is not None:
            raise ValueError("DelayedNesterov takes no closure")
        tau = 0 if staleness is None else int(staleness)
        self._meter_param.grad = torch.zeros(1)
        self._meter.step(staleness=tau)
        size = self.size
        c = self.activation if self.activation is not None else 1.0 / size
        lr = self.param_groups[0]["lr"]
        for p, acc in zip(self._params, self._sum, strict=True):
            if p.grad is None:
                continue
            acc.add_(p.grad)
            p.add_(p.grad, alpha=-lr * c)
        self._reads.append(self._pushes - tau)
        self._pushes += 1
        self._since += 1
        if self._since < size:
            return
        # Milestone: a Nesterov step on the buffer's mean, minus its gradient part (applied).
        count = self._since
        stale = self._milestone_staleness()
        for p, acc in zip(self._params, self._sum, strict=True):
            p.grad = acc / count
        self._milestone.step(staleness=stale)
        for p, acc in zip(self._params, self._sum, strict=True):
            p.add_(acc, alpha=lr / count)
            acc.zero_()
            p.grad = None
        self._milestones += 1
        self._since = 0
        self._reads.clear()
        self._milestone_at.append(self._pushes)

    def _milestone_staleness(self) -> int:
        """Milestones applied since the buffered pushes were read (rounded mean)."""
        at = self._milestone_at
        done = len(at)
        lags = [done - sum(1 for m in at if m <= v) for v in self._reads]
        return round(sum(lags) / len(lags)) if lags else 0
