"""StaleGradients: make a Lightning run asynchronous on one machine, for studies.

Each training step computes its gradient at the parameters of ``tau`` optimizer steps ago, with
``tau`` drawn from one of :mod:`asyncmomentum.runtimes.simulate`'s staleness models, then applies
it to the
current parameters: what ``M`` asynchronous workers sharing one model would do, reproducibly.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from asyncmomentum.core.validation import check_choice, check_int, check_state
from asyncmomentum.runtimes.adapter import OptimizerView
from asyncmomentum.runtimes.simulate import (
    STALENESS_MODELS,
    SnapshotRing,
    StalenessModel,
    staleness_model,
)
from lightning_callbacks.roles import StalenessObserver, StalenessSource

__all__ = ["StaleGradients"]

#: Layout version of :meth:`StaleGradients.state_dict`.
STATE_FORMAT = 1


class StaleGradients(StalenessSource, Callback):
    r"""Simulate ``M`` asynchronous workers in a Lightning run: gradients at stale parameters.

    Every optimizer step draws a staleness ``tau`` from
    :func:`asyncmomentum.runtimes.simulate.staleness_model` (``model``, ``workers``), seeded. The
    step's
    forward and backward run at the parameters of ``tau`` steps ago; the current parameters are
    restored before the optimizer applies the gradient (in ``on_before_optimizer_step``, inside
    Lightning's closure). That is the update rule of asynchronous SGD,
    ``w_{t+1} = w_t - lr * grad f(w_{t - tau})``, on one process, reproducible bit for bit.

    Parameter snapshots are kept in a :class:`~asyncmomentum.runtimes.simulate.SnapshotRing` of
    ``max_staleness`` entries (the model's cap, or lower if given), allocated when training
    starts: memory is that many copies of the trained parameters.
    Until the ring has filled (at the start of each fit, also after resuming, since snapshots are
    not checkpointed), ``tau`` is clamped to the snapshots available, as at the start of a real
    asynchronous run. Module buffers (e.g. BatchNorm statistics) are not snapshotted.

    The staleness reaches the tuners as follows (the value reported is the clamped one, the true
    staleness of the gradient):

    - an :class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD` receives ``step(staleness=tau)``:
    a step
      pre-hook (``Optimizer.register_step_pre_hook``) adds the keyword to Lightning's
      ``optimizer.step(closure=...)`` call, so the optimizer's own tuner observes it exactly,
      without patching anything. An explicit ``staleness=`` from user code is left alone.
    - every :class:`~lightning_callbacks.AsyncMomentumCallback` of the trainer (every
      :class:`~lightning_callbacks.roles.StalenessObserver`) gets
      :meth:`~lightning_callbacks.AsyncMomentumCallback.observe_staleness`, for the other
      optimizers it tunes.

    Under data parallelism every rank draws the same ``tau`` (same seed), so the replicas stay
    identical: the simulated workers are asynchronous copies of the whole data-parallel group.

    Only automatic optimization is supported (one optimizer, one step per batch, or per
    accumulation window with ``accumulate_grad_batches``: every micro-batch of a window uses the
    same snapshot).

    Args:
        workers: number of simulated asynchronous workers ``M`` (>= 1).
        model: a staleness model in :data:`asyncmomentum.runtimes.simulate.STALENESS_MODELS`:
            ``"exponential"`` (``M`` workers with exponential compute times in an event queue),
            ``"geometric"`` (``q = 1 - 1/M``) or ``"round_robin"`` (``tau = M - 1``).
        seed: seed of the staleness stream (a non-negative integer).
        max_staleness: a lower cap on ``tau`` than the model's, to bound memory on big models.

    Raises:
        ValueError: for a bad argument, or (when fitting) manual optimization.
    """

    def __init__(
        self,
        workers: int,
        model: str = "exponential",
        seed: int = 0,
        *,
        max_staleness: int | None = None,
    ) -> None:
        check_choice(model, "model", STALENESS_MODELS)
        self.staleness_model: StalenessModel = staleness_model(model, workers)
        self.model = model
        self.workers = workers
        self.seed = check_int(seed, "seed", 0)
        cap = self.staleness_model.max_staleness
        if max_staleness is not None:
            cap = min(cap, check_int(max_staleness, "max_staleness", 0))
        self.max_staleness = cap
        self._ring: SnapshotRing | None = None
        self._stream: Iterator[int] | None = None
        self._draws = 0
        self._staleness: int | None = None
        self._last_staleness: int | None = None
        self._params: list[Tensor] = []
        self._current: list[Tensor] = []
        self._swapped = False
        self._stepped = False
        self._observers: list[StalenessObserver] = []
        self._hooks: list[RemovableHandle] = []

    @property
    def staleness(self) -> int | None:
        """Staleness of the gradient of the step in progress; ``None`` between steps.

        A step is in progress from ``on_train_batch_start`` to ``on_train_batch_end`` of the
        batch that steps.
        """
        return self._staleness

    @property
    def last_staleness(self) -> int | None:
        """Staleness of the most recently applied gradient; ``None`` before the first."""
        return self._last_staleness

    @property
    def snapshots(self) -> int:
        """Parameter snapshots held now (at most :attr:`max_staleness`)."""
        return 0 if self._ring is None else len(self._ring)

    # -- binding to the run -------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse manual optimization, where a training step may step any optimizer any time."""
        if stage == "fit" and not pl_module.automatic_optimization:
            raise ValueError(
                "StaleGradients supports automatic optimization only (one optimizer step per "
                "batch); this LightningModule sets automatic_optimization = False"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Collect the trained parameters, start an empty ring, hook AsyncMomentumSGD steps."""
        self._release()
        self._params = _trained_parameters(trainer.optimizers)
        if not self._params:
            raise ValueError("StaleGradients found no trainable parameter in the optimizers")
        self._current = [p.detach().clone() for p in self._params]
        # Snapshots of the parameters each step applied to: age 0 is the one before the latest
        # update, i.e. the parameters of 1 step ago.
        self._ring = SnapshotRing(self._params, self.max_staleness) if self.max_staleness else None
        self._staleness = None
        self._stepped = False
        self._observers = [
            cb
            for cb in trainer.callbacks  # type: ignore[attr-defined]  # Lightning sets it, undeclared
            if isinstance(cb, StalenessObserver)
        ]
        for optimizer in trainer.optimizers:
            if OptimizerView(optimizer).is_async_momentum:
                self._hooks.append(optimizer.register_step_pre_hook(self._pass_staleness))

    def _pass_staleness(
        self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Step pre-hook: call ``AsyncMomentumSGD.step`` with ``staleness=tau``."""
        if self._staleness is None or kwargs.get("staleness") is not None:
            return None
        return args, {**kwargs, "staleness": self._staleness}

    # -- each step ----------------------------------------------------------------------------

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Draw this step's staleness (once per accumulation window) and load the snapshot."""
        if self._staleness is None:
            self._staleness = min(self._next_draw(), self.snapshots)
            for observer in self._observers:
                observer.observe_staleness(self._staleness)
        if self._staleness > 0:
            self._load_snapshot(self._staleness)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Restore the current parameters and remember them: the update applies to them."""
        self._restore()
        if self._ring is not None:
            self._ring.push()
        self._last_staleness = self._staleness
        # The staleness stays pending until the batch ends: with a gradient scaler, Lightning
        # runs this hook (inside the closure) before it calls optimizer.step, whose pre-hook
        # still has to pass the staleness on.
        self._stepped = True

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Restore the current parameters after a micro-batch that did not step; end the step."""
        self._restore()
        if self._stepped:
            self._staleness = None
            self._stepped = False

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the current parameters if a batch was cut short.

        ``on_train_batch_start`` returning -1 ends the epoch before ``on_train_batch_end``.
        """
        self._restore()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the parameters, unhook and free the snapshots."""
        self._finish()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Never leave stale parameters in the model when training fails."""
        self._finish()

    def _next_draw(self) -> int:
        if self._stream is None:
            # Resumed (or first) stream: skip what earlier runs drew, so it continues exactly.
            self._stream = self.staleness_model.stream(self.seed)
            for _ in islice(self._stream, self._draws):
                pass
        self._draws += 1
        return next(self._stream)

    @torch.no_grad()
    def _load_snapshot(self, staleness: int) -> None:
        """Load the parameters of ``staleness`` (>= 1) steps ago, keeping the current ones."""
        assert self._ring is not None
        if not self._swapped:
            for backup, p in zip(self._current, self._params, strict=True):
                backup.copy_(p)
            self._swapped = True
        self._ring.load(staleness - 1)

    @torch.no_grad()
    def _restore(self) -> None:
        if self._swapped:
            for p, backup in zip(self._params, self._current, strict=True):
                p.copy_(backup)
            self._swapped = False

    def _release(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _finish(self) -> None:
        self._restore()
        self._release()
        self._ring = None
        self._current = []
        self._params = []
        self._staleness = None
        self._stepped = False

    # -- checkpointing ------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        """The position in the staleness stream (snapshots are not saved: see the class doc)."""
        return {
            "format": STATE_FORMAT,
            "model": self.model,
            "workers": self.workers,
            "seed": self.seed,
            "draws": self._draws,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the staleness stream where the checkpoint left it.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        check_state(state_dict, "StaleGradients", expected_format=STATE_FORMAT)
        draws = check_int(state_dict.get("draws"), "the checkpoint's 'draws'", 0)
        same = (state_dict.get("model"), state_dict.get("workers"), state_dict.get("seed")) == (
            self.model,
            self.workers,
            self.seed,
        )
        if not same:
            rank_zero_warn(
                "the checkpoint's StaleGradients ran another stream "
                f"({state_dict.get('model')!r}, workers={state_dict.get('workers')}, "
                f"seed={state_dict.get('seed')}); this one starts from its beginning"
            )
            draws = 0
        self._draws = draws
        self._stream = None


def _trained_parameters(optimizers: list[Optimizer]) -> list[Tensor]:
    """Every parameter some optimizer updates, once, in order."""
    seen: set[int] = set()
    params = []
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params
