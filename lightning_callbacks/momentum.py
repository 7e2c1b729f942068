"""AsyncMomentumCallback: asynchrony-aware momentum for any optimizer of a Lightning run.

Asynchronous SGD with ``M`` workers carries an implicit momentum ``1 - 1/M`` (Mitliagkas et al.,
2016). This callback keeps the *total* momentum of a run at a target by setting, before every
optimizer step, the *algorithmic* momentum that the core's
:class:`~asyncmomentum.core.tracker.AsynchronyTracker` asks for, and logs what it did.
"""

from __future__ import annotations

import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from asyncmomentum.core import formulas
from asyncmomentum.core.measuring.metrics import StalenessMetric
from asyncmomentum.core.measuring.staleness import DEFAULT_HORIZON, DEFAULT_WARMUP
from asyncmomentum.core.tracker import AsynchronyTracker
from asyncmomentum.core.validation import (
    check_bool,
    check_momentum,
    check_staleness,
    check_state,
)
from asyncmomentum.runtimes.adapter import OptimizerView
from asyncmomentum.runtimes.batch_size import batch_size_of
from lightning_callbacks.roles import ServedUpdates, StalenessSource

__all__ = ["AsyncMomentumCallback"]

#: Layout version of :meth:`AsyncMomentumCallback.state_dict`.
STATE_FORMAT = 1


@dataclass
class _Tracked:
    """One optimizer of the run whose momentum is tuned (or, for AsyncMomentumSGD, watched).

    ``own``: the optimizer measures staleness and sets its momentum itself (AsyncMomentumSGD);
    this callback only reads its tracker. Otherwise this callback's tracker (the view's) sets
    the groups' momentum (or first beta) through the view.
    """

    optimizer: Optimizer
    index: int
    view: OptimizerView
    own: bool
    metric: StalenessMetric
    suffix: str
    group_suffixes: list[str]
    pending_staleness: int | None = None
    steps_since_log: int = 0
    last_clock: int = 0
    warned_clip: bool = False
    hooks: list[RemovableHandle] = field(default_factory=list)


class AsyncMomentumCallback(Callback):
    r"""Tune the momentum of every optimizer to the asynchrony of the run, and log it.

    Asynchronous training adds an implicit momentum ``1 - 1/M`` for ``M`` asynchronous workers;
    to keep the total momentum at ``target_momentum`` the optimizer should apply the
    *algorithmic* momentum ``target - (1 - 1/M)`` (the ``"additive"`` rule; see
    :func:`asyncmomentum.core.tuning.rules.rule_names`). Before every optimizer step (Lightning's
    ``on_before_optimizer_step``, called inside the closure) this callback:

    - with an :class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD`: does nothing to it. The
    optimizer
      measures staleness and tunes itself, after the closure; a second tuner would fight it.
      The callback reads the optimizer's own tracker and logs it. This callback's
      ``target_momentum``, ``workers``, ``rule``, ... do not apply to it (a warning says so
      when they differ from the optimizer's).
    - with any other optimizer whose param groups carry ``momentum`` (SGD-like) or ``betas``
      (Adam-like: the first beta plays the role of momentum): feeds the staleness reported for
      this step (by :class:`~lightning_callbacks.StaleGradients` or
      :meth:`observe_staleness`) to an :class:`~asyncmomentum.core.tracker.AsynchronyTracker` and
      writes
      the momentum it asks for into every group. A group may carry its own
      ``target_momentum``. These optimizers cannot take negative momentum
      (``torch.optim.SGD`` refuses it, Adam's ``beta1`` must lie in ``[0, 1)``), so a negative
      value is clipped at 0, with one warning per optimizer.

    Optimizers with neither ``momentum`` nor ``betas`` are skipped with a warning; if no
    optimizer of the run has a momentum to tune, training stops with a ``ValueError``.

    Under :class:`~lightning_callbacks.AsyncParameterServerStrategy` (a
    :class:`~lightning_callbacks.roles.ServedUpdates` strategy) the updates are applied by the
    server's copy of the optimizer, in rank 0: the callback tunes and logs that one (a torch
    optimizer gets the momentum for its next update after each update the server reports, with
    its exact staleness), shows ``updates/s`` and ``M_hat`` in the progress bar, and does
    nothing in the other processes.

    At the trainer's logging interval (``Trainer(log_every_n_steps=...)``), it logs to every
    logger of the trainer:

    - ``momentum/implicit``: ``1 - 1/M_hat``.
    - ``momentum/algorithmic``: the momentum the optimizer applies (after any clipping).
    - ``momentum/total``: algorithmic and implicit composed under ``rule``.
    - ``momentum/measured``: the total momentum measured from the trajectory, for an
      ``AsyncMomentumSGD(measure_momentum=True)`` once its meter has a reading.
    - ``curvature/lambda_max``: the largest curvature an ``AsyncMomentumSGD(rule="stability")``
      works with, once it has one.
    - ``staleness/mean``, ``staleness/max``: over the gradients applied since the previous log
      line, reduced exactly over all ranks
      (:class:`~asyncmomentum.core.measuring.metrics.StalenessMetric`);
      absent when no staleness was observed in that window.
    - ``workers/estimated``: ``M_hat``, the tracker's smoothed estimate (a moving average over
      ``horizon`` updates, after ``warmup`` observations), which sets the momentum.

    With several tuned optimizers, names get a ``/<OptimizerClass>`` suffix (``-1``, ``-2``
    for repeats); with several param groups, ``momentum/algorithmic`` and ``momentum/total``
    get a ``/<group name or pgN>`` suffix. The values are also put in
    ``trainer.callback_metrics``.

    Resuming from a Lightning checkpoint continues the estimate: the trackers of
    non-AsyncMomentumSGD optimizers are saved in this callback's state, AsyncMomentumSGD saves
    its own in the optimizer's state. The state key is the class name, whatever the settings:
    the estimate of ``M`` does not depend on the target, and one trainer takes one such callback
    (Lightning refuses two, which would both set the momentum).

    Args:
        target_momentum: total momentum to keep, in (-1, 1).
        workers: known number of asynchronous workers ``M``; skips estimation for the optimizers
            this callback tunes. Staleness is still recorded for logging.
        rule: a name in :func:`asyncmomentum.core.tuning.rules.rule_names` (the feedback rules
            run inside :class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD`, which this
            callback logs).
        momentum_bounds: ``(low, high)`` clip range of the algorithmic momentum, inside (-1, 1).
        log: log the metrics above; ``False`` only tunes.
        horizon: span, in updates, of the staleness moving average.
        warmup: observations before the estimate leaves ``M = 1``.

    Raises:
        ValueError: for a bad argument (when constructed) or when no optimizer of the run has a
            momentum to tune (when training starts).

    Example::

        trainer = pl.Trainer(
            callbacks=[StaleGradients(workers=8), AsyncMomentumCallback(target_momentum=0.9)],
            log_every_n_steps=10,
        )
    """

    def __init__(
        self,
        target_momentum: float = 0.9,
        *,
        workers: float | None = None,
        rule: str = "additive",
        momentum_bounds: tuple[float, float] = formulas.DEFAULT_MOMENTUM_BOUNDS,
        log: bool = True,
        horizon: int = DEFAULT_HORIZON,
        warmup: int = DEFAULT_WARMUP,
    ) -> None:
        check_bool(log, "log")
        self.target_momentum = check_momentum(target_momentum)
        self._tracker_options: dict[str, Any] = {
            "rule": rule,
            "momentum_bounds": momentum_bounds,
            "workers": workers,
            "horizon": horizon,
            "warmup": warmup,
        }
        # A throwaway tracker validates every option with the core's own checks and messages.
        checked = AsynchronyTracker(**self._tracker_options)
        if checked.uses_meter or checked.uses_curvature:
            raise ValueError(
                f"rule {rule!r} needs what only the optimizer sees (the momentum meter's "
                "trajectory, a curvature probe): use AsyncMomentumSGD(rule="
                f"{rule!r}, ...) in configure_optimizers; this callback then logs what it does"
            )
        self.rule = checked.rule_name
        self.momentum_bounds = checked.momentum_bounds
        self.workers = checked.estimator.workers
        self.horizon = checked.estimator.horizon
        self.warmup = checked.estimator.warmup
        # Not `self.log`: Lightning overwrites that attribute of callbacks with `pl_module.log`.
        self.enable_logging = log
        # Trackers of the optimizers this callback drives, by position in trainer.optimizers.
        # They outlive a fit so that fitting again with the same callback continues the estimate.
        self._trackers: dict[int, AsynchronyTracker] = {}
        self._tracked: list[_Tracked] = []
        self._warned_no_logger = False
        # Under a ServedUpdates strategy the server's threads step the optimizers: what they
        # touch (metrics, counters) is guarded by this lock.
        self._lock = threading.Lock()
        self._served = False
        self._listening_to: Any = None
        # Samples of the batches since the last optimizer step (several under accumulation).
        self._batch_samples = 0

    def __getstate__(self) -> dict[str, Any]:
        """The callback without its lock (spawned processes get a fresh one)."""
        state = dict(self.__dict__)
        state.pop("_lock")
        state["_listening_to"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled callback, with a fresh lock.

        Args:
            state: what :meth:`__getstate__` returned.
        """
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def trackers(self) -> dict[int, AsynchronyTracker]:
        """The trackers of the optimizers this callback tunes, by position in the trainer's list.

        An :class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD` has none here: it uses its own
        ``optimizer.tracker``.
        """
        return dict(self._trackers)

    # -- what the callback is told ------------------------------------------------------------

    def observe_staleness(
        self, staleness: int, optimizer: Optimizer | LightningOptimizer | None = None
    ) -> None:
        """Report the staleness of the gradient the next step of ``optimizer`` will apply.

        :class:`~lightning_callbacks.StaleGradients` calls this every step; a system that
        knows its staleness (e.g. a parameter server tagging gradients with versions) can too.
        A second report before the step replaces the first. An
        :class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD` measures its own staleness (give it
        ``step(staleness=...)``), so reports for it are ignored.

        Args:
            staleness: updates applied between the read of the parameters and this gradient's
                application (a non-negative integer).
            optimizer: the optimizer that will apply the gradient; ``None`` for every optimizer
                this callback tunes.

        Raises:
            ValueError: for a negative or non-integer staleness, or an optimizer not in the run.
            RuntimeError: outside training (the optimizers are not known then).
        """
        tau = check_staleness(staleness)
        if not self._tracked:
            raise RuntimeError(
                "observe_staleness() was called outside training: the callback learns the "
                "run's optimizers in on_train_start and lets them go when training ends; "
                "report staleness from training hooks (e.g. on_train_batch_start)"
            )
        if optimizer is None:
            targets = self._tracked
        else:
            found = self._find(optimizer)
            if found is None:
                raise ValueError(
                    f"{type(optimizer).__name__} is not an optimizer this callback tunes; pass "
                    "one of trainer.optimizers that has a momentum, or None for all of them"
                )
            targets = [found]
        for tracked in targets:
            if not tracked.own:
                tracked.pending_staleness = tau

    # -- binding to the run -------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the optimizers to tune and hook their steps (after checkpoint restore)."""
        self._release()
        self._batch_samples = 0
        strategy = trainer.strategy
        self._served = isinstance(strategy, ServedUpdates)
        served = cast(ServedUpdates, strategy)
        optimizers = served.served_optimizers if self._served else trainer.optimizers
        if self._served and not optimizers:
            return  # the server runs in another process (rank 0), which tunes and logs
        views = [(i, OptimizerView(opt)) for i, opt in enumerate(optimizers)]
        skipped = [view.name for _, view in views if not _is_tracked(view)]
        tunable = [(i, view) for i, view in views if _is_tracked(view)]
        if not tunable:
            raise ValueError(
                "AsyncMomentumCallback found no optimizer with a momentum to tune among "
                f"{[type(opt).__name__ for opt in optimizers]}: it needs param groups "
                "with 'momentum' (SGD-like) or 'betas' (Adam-like), or an AsyncMomentumSGD. "
                "Change the optimizer in configure_optimizers, or remove the callback."
            )
        if skipped:
            rank_zero_warn(
                f"AsyncMomentumCallback skips {skipped}: their param groups have neither "
                "'momentum' nor 'betas', so there is no momentum to tune"
            )
        suffixes = _optimizer_suffixes([view.optimizer for _, view in tunable])
        for (index, view), suffix in zip(tunable, suffixes, strict=True):
            self._tracked.append(self._track(index, view, suffix, pl_module.device))
        if self._served and self._listening_to is not strategy:
            served.add_update_listener(self._after_served_update)
            self._listening_to = strategy
        self._warn_about_settings(trainer)

    def _track(
        self, index: int, view: OptimizerView, suffix: str, device: torch.device
    ) -> _Tracked:
        optimizer = view.optimizer
        own = view.is_async_momentum
        if not own:
            tracker = self._trackers.setdefault(index, AsynchronyTracker(**self._tracker_options))
            view = OptimizerView(optimizer, tracker)
        tracked = _Tracked(
            optimizer=optimizer,
            index=index,
            view=view,
            own=own,
            # On the module's device, so that its cross-rank reduction works under NCCL too. A
            # served optimizer sees every update of the job: nothing to reduce, and the other
            # processes must not wait for this one.
            metric=(
                StalenessMetric(sync_on_compute=False)
                if self._served
                else StalenessMetric().to(device)
            ),
            suffix=suffix,
            group_suffixes=_group_suffixes(optimizer.param_groups),
        )
        if own:
            tracked.last_clock = view.tracker.clock.value
        else:
            # Before the first step too: the momentum is right from the start (known workers).
            self._apply_momentum(tracked)
        tracked.hooks.append(optimizer.register_step_post_hook(self._make_post_hook(tracked)))
        return tracked

    def _warn_about_settings(self, trainer: pl.Trainer) -> None:
        if self.enable_logging and not trainer.loggers and not self._warned_no_logger:
            self._warned_no_logger = True
            rank_zero_warn(
                "AsyncMomentumCallback(log=True) but the Trainer has no logger: it tunes the "
                "momentum and fills trainer.callback_metrics, nothing is written"
            )
        for tracked in self._tracked:
            if tracked.own:
                self._warn_if_optimizer_differs(tracked.view)
        drives_any = any(not t.own for t in self._tracked)
        has_source = self._served or any(
            isinstance(cb, StalenessSource)
            for cb in trainer.callbacks  # type: ignore[attr-defined]  # Lightning sets it, undeclared
        )
        if drives_any and self.workers is None and not has_source:
            rank_zero_warn(
                "AsyncMomentumCallback tunes a torch optimizer but nothing reports staleness "
                "(no StaleGradients callback) and workers=None: until observe_staleness() is "
                "called the estimate stays M = 1 and the momentum stays at target_momentum"
            )

    def _warn_if_optimizer_differs(self, view: OptimizerView) -> None:
        tracker = view.tracker
        groups = view.optimizer.param_groups
        targets = {t for g in groups if (t := view.target_momentum(g)) is not None}
        differences = []
        if targets and targets != {self.target_momentum}:
            differences.append(
                f"momentum {sorted(targets)} vs target_momentum {self.target_momentum}"
            )
        if self.workers is not None and tracker.estimator.workers != self.workers:
            differences.append(f"workers {tracker.estimator.workers} vs {self.workers}")
        # The feedback rules live only in the optimizer: the callback cannot be set to them.
        feedback = tracker.uses_meter or tracker.uses_curvature
        if tracker.rule_name != self.rule and not feedback:
            differences.append(f"rule {tracker.rule_name!r} vs {self.rule!r}")
        if differences:
            rank_zero_warn(
                f"{view.name} tunes its own momentum with its own settings, which differ "
                f"from AsyncMomentumCallback's ({'; '.join(differences)}); the optimizer's "
                "apply. Pass the settings to AsyncMomentumSGD to change them."
            )

    def _make_post_hook(self, tracked: _Tracked) -> Any:
        def after_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
            view = tracked.view
            with self._lock:
                tracked.steps_since_log += 1
                if tracked.own:
                    clock = view.tracker.clock.value
                    # A step refused for a non-finite gradient does not tick the clock.
                    if clock != tracked.last_clock:
                        tracked.metric.update(view.tracker.last_staleness)
                    tracked.last_clock = clock

        return after_step

    def _after_served_update(self, index: int, staleness: int) -> None:
        """A server applied an update of the served optimizer ``index`` (in a server thread).

        An optimizer this callback tunes takes the staleness into its tracker and gets the
        momentum for the next update (one update late: the server reports after it applies).
        """
        tracked = next((t for t in self._tracked if t.index == index), None)
        if tracked is None or tracked.own:
            return
        with self._lock:
            tracked.view.tracker.observe(staleness)
            tracked.metric.update(staleness)
            self._apply_momentum(tracked)

    def _find(self, optimizer: Optimizer | LightningOptimizer) -> _Tracked | None:
        if isinstance(optimizer, LightningOptimizer):  # what self.optimizers() returns
            optimizer = optimizer.optimizer
        return next((t for t in self._tracked if t.optimizer is optimizer), None)

    def _release(self) -> None:
        for tracked in self._tracked:
            for handle in tracked.hooks:
                handle.remove()
        self._tracked = []

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Unhook the optimizers."""
        self._release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Unhook the optimizers when training fails."""
        self._release()

    # -- tuning -------------------------------------------------------------------------------

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Count the batch's samples, for the next optimizer step to hand to its rule."""
        self._batch_samples += batch_size_of(batch) or 0

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Feed this step's staleness to the tracker and set the momentum it asks for.

        An AsyncMomentumSGD whose rule reads batch sizes (``rule="auto"``) gets the samples of
        the batches since the last step instead (it tunes itself).
        """
        samples, self._batch_samples = self._batch_samples, 0
        tracked = self._find(optimizer)
        if tracked is None:
            return
        if tracked.own:
            tracker = tracked.view.tracker
            if samples and tracker.uses_batch_size:
                tracker.observe_batch_size(samples)
            return
        tau, tracked.pending_staleness = tracked.pending_staleness, None
        if tau is not None:
            tracked.view.tracker.observe(tau)
            tracked.metric.update(tau)
        self._apply_momentum(tracked)

    def _apply_momentum(self, tracked: _Tracked) -> None:
        view = tracked.view
        for group in tracked.optimizer.param_groups:
            target = view.target_momentum(group)
            if target is None:
                target = self.target_momentum
            else:
                target = check_momentum(target, "a param group's target_momentum")
            value = view.tracker.algorithmic_momentum(target)
            if value < 0.0:
                # torch.optim.SGD rejects momentum < 0 at construction and Adam needs beta1 >= 0:
                # their updates are not meant for it. AsyncMomentumSGD is.
                self._warn_clip_once(tracked, value)
                value = 0.0
            view.set_momentum(group, value)

    def _warn_clip_once(self, tracked: _Tracked, value: float) -> None:
        if tracked.warned_clip:
            return
        tracked.warned_clip = True
        view = tracked.view
        name = view.name
        what = (
            "beta1 (betas[0]) must lie in [0, 1)"
            if view.momentum_key(tracked.optimizer.param_groups[0]) == "betas"
            else ("momentum must be >= 0 (torch optimizers reject negative momentum)")
        )
        rank_zero_warn(
            f"the asynchrony (M_hat = {view.tracker.estimated_workers:.3g}) asks for a negative "
            f"algorithmic momentum ({value:.3g}), but for {name} {what}; clipping it at 0, so "
            "the total momentum exceeds the target. Use asyncmomentum.AsyncMomentumSGD, which "
            "applies negative momentum. (Warned once.)"
        )

    # -- logging ------------------------------------------------------------------------------

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Log at the trainer's interval, after the step (AsyncMomentumSGD tunes inside it)."""
        stepped = any(t.steps_since_log for t in self._tracked)
        if not (self.enable_logging and stepped and _should_log(trainer)):
            return
        with self._lock:
            metrics = self._collect_metrics()
        step = _logging_step(trainer)
        if self._served:
            # The progress bar shows the server's pace and the asynchrony it measures.
            pl_module.log(
                "updates/s",
                cast(ServedUpdates, trainer.strategy).updates_per_second,
                prog_bar=True,
                logger=False,
            )
            estimated = next(
                (v for k, v in metrics.items() if k.startswith("workers/estimated")), None
            )
            if estimated is not None:
                pl_module.log("M_hat", estimated, prog_bar=True, logger=False)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        device = pl_module.device
        trainer.callback_metrics.update(
            {name: torch.tensor(value, device=device) for name, value in metrics.items()}
        )

    def _collect_metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for tracked in self._tracked:
            suffix = tracked.suffix
            summary = _compute_and_reset(tracked.metric)
            tracked.steps_since_log = 0
            tracker = tracked.view.tracker
            metrics[f"momentum/implicit{suffix}"] = tracker.implicit_momentum
            metrics[f"workers/estimated{suffix}"] = tracker.estimated_workers
            measured = tracked.view.measured_total_momentum
            if measured is not None:
                metrics[f"momentum/measured{suffix}"] = measured
            curvature = tracker.curvature
            if curvature is not None:
                metrics[f"curvature/lambda_max{suffix}"] = curvature
            if int(summary["count"]) > 0:
                metrics[f"staleness/mean{suffix}"] = float(summary["mean"])
                metrics[f"staleness/max{suffix}"] = float(summary["max"])
            groups = tracked.optimizer.param_groups
            # strict=False: the suffixes are fixed at setup; a group added later (e.g. by
            # add_param_group in a finetuning callback) is tuned but not logged here.
            for group, group_suffix in zip(groups, tracked.group_suffixes, strict=False):
                algorithmic = tracked.view.applied_momentum(group)
                metrics[f"momentum/algorithmic{suffix}{group_suffix}"] = algorithmic
                metrics[f"momentum/total{suffix}{group_suffix}"] = tracker.total_momentum(
                    algorithmic
                )
        return metrics

    # -- checkpointing ------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        """The trackers this callback drives (AsyncMomentumSGD saves its own)."""
        return {
            "format": STATE_FORMAT,
            "tuners": {index: tracker.state_dict() for index, tracker in self._trackers.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the estimates from :meth:`state_dict`; a bad state raises and changes nothing.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        check_state(
            state_dict, "AsyncMomentumCallback", expected_format=STATE_FORMAT, keys=("tuners",)
        )
        tuners = state_dict["tuners"]
        if not isinstance(tuners, dict):
            raise ValueError(
                "AsyncMomentumCallback state has a corrupt 'tuners' entry (not a dict)"
            )
        restored = {}
        for index, tracker_state in tuners.items():
            tracker = AsynchronyTracker(**self._tracker_options)
            tracker.load_state_dict(tracker_state)  # raises on a corrupt state, before any change
            restored[int(index)] = tracker
        self._trackers = restored


# -- helpers ------------------------------------------------------------------------------------


def _is_tracked(view: OptimizerView) -> bool:
    """Whether this callback watches the optimizer (it tunes itself) or tunes it."""
    return view.is_async_momentum or view.tunable_from_outside


def _optimizer_suffixes(optimizers: list[Optimizer]) -> list[str]:
    """``""`` for a single optimizer, else ``/Class``, ``/Class-1``, ... in order."""
    if len(optimizers) == 1:
        return [""]
    seen: Counter[str] = Counter()
    suffixes = []
    for optimizer in optimizers:
        name = type(optimizer).__name__
        suffixes.append(f"/{name}" if seen[name] == 0 else f"/{name}-{seen[name]}")
        seen[name] += 1
    return suffixes


def _group_suffixes(groups: list[dict[str, Any]]) -> list[str]:
    """``""`` for a single group, else ``/<name>`` or ``/pgN`` (1-based), made unique."""
    if len(groups) == 1:
        return [""]
    names = [str(g.get("name", f"pg{i}")) for i, g in enumerate(groups, start=1)]
    if len(set(names)) != len(names):
        names = [f"pg{i}" for i in range(1, len(groups) + 1)]
    return [f"/{name}" for name in names]


def _compute_and_reset(metric: StalenessMetric) -> dict[str, Tensor]:
    # Every rank calls compute (a collective under DDP) even with an empty window, which
    # torchmetrics warns about; an empty window is normal here and reported as count 0.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*compute.*before.*update.*")
        summary = metric.compute()
    metric.reset()
    return summary


def _logging_step(trainer: pl.Trainer) -> int:
    # Lightning indexes its own training log rows by the batches that stepped an optimizer (not
    # global_step, which counts every optimizer's steps); LearningRateMonitor uses the same
    # counter, so these rows line up with theirs.
    epoch_loop = getattr(trainer.fit_loop, "epoch_loop", None)
    return int(getattr(epoch_loop, "_batches_that_stepped", trainer.global_step))


def _should_log(trainer: pl.Trainer) -> bool:
    # The rule Lightning applies to its own step metrics, at the end of a batch: the counter
    # is incremented after on_train_batch_end, hence the + 1.
    every: int = trainer.log_every_n_steps  # type: ignore[attr-defined]  # Lightning sets it, undeclared
    if every <= 0:
        return False
    return (_logging_step(trainer) + 1) % every == 0 or trainer.should_stop
