"""The one view of any torch optimizer that the runtimes need.

The simulator, the Hogwild workers, the parameter server and the Lightning glue drive any
``torch.optim`` optimizer, and :class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD` a little
differently: it measures staleness itself (``step(staleness=tau)``, ``mark_read()``), tunes its
own momentum, and its ``group["momentum"]`` is the total the user tuned, not the momentum it
applies. :class:`OptimizerView` is the only place that asks which kind an optimizer is; a runtime
asks the view instead, so that a new runtime needs this module, not the optimizer's insides.
Every view pairs its optimizer with an :class:`~asyncmomentum.core.tracker.AsynchronyTracker`:
the optimizer's own, or for any other optimizer one that the view counts updates into.

Example:
    >>> model = torch.nn.Linear(2, 1)
    >>> view = OptimizerView(torch.optim.Adam(model.parameters(), lr=1e-3))
    >>> view.momentum_key(view.optimizer.param_groups[0]), view.applied_momentum()
    ('betas', 0.9)
    >>> view.set_momentum(view.optimizer.param_groups[0], 0.5)
    >>> view.optimizer.param_groups[0]["betas"]
    (0.5, 0.999)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from asyncmomentum.core.finite_gradients import first_nonfinite, nonfinite_error
from asyncmomentum.core.measuring.meter import MomentumMeter
from asyncmomentum.core.optimizer import AsyncMomentumSGD
from asyncmomentum.core.tracker import AsynchronyTracker, MomentumSummary, StepReport

__all__ = ["MomentumKey", "MomentumSummary", "OptimizerView", "all_finite"]

#: Where a parameter group keeps its momentum: SGD-like ``"momentum"``, or Adam-like
#: ``"betas"`` whose first entry plays that role.
MomentumKey = Literal["momentum", "betas"]


def all_finite(grads: Iterable[Tensor | None]) -> bool:
    """Whether no gradient holds NaN or inf (``None`` entries are skipped).

    The check :class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD` runs before each update
    (:func:`asyncmomentum.core.finite_gradients.first_nonfinite`): one cheap pass, exact on a
    suspect.

    Args:
        grads: gradients (dense or sparse), or ``None`` for a parameter without one.
    """
    present = [g for g in grads if g is not None]
    if not present:
        return True
    # first_nonfinite takes (params, grads, buffers) per group; a gradient has its param's shape.
    return first_nonfinite([(present, present, [])]) is None


class OptimizerView:
    """The one view of any torch optimizer: its momentum, its step, its staleness hand-off.

    Args:
        optimizer: any ``torch.optim.Optimizer``; an
            :class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD` measures staleness and tunes
            its momentum itself, any other one is tuned (if at all) from outside.
        tracker: for an optimizer other than AsyncMomentumSGD, the tracker its updates are
            counted in (shared with other processes, or with the caller's own options);
            default a fresh one. An AsyncMomentumSGD uses its own.

    Raises:
        ValueError: ``optimizer`` is not a torch optimizer, or a tracker is given with an
            AsyncMomentumSGD.
    """

    def __init__(self, optimizer: Optimizer, tracker: AsynchronyTracker | None = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)!r}")
        self.optimizer = optimizer
        self._ours: AsyncMomentumSGD | None = (
            optimizer if isinstance(optimizer, AsyncMomentumSGD) else None
        )
        if self._ours is not None and tracker is not None:
            raise ValueError(
                f"{type(optimizer).__name__} measures staleness with its own tracker; "
                "don't pass a tracker (or a clock) with it"
            )
        #: The tracker the optimizer's updates are counted in.
        self.tracker: AsynchronyTracker = (
            self._ours.tracker if self._ours is not None else tracker or AsynchronyTracker()
        )

    def __repr__(self) -> str:
        return f"OptimizerView({type(self.optimizer).__name__})"

    @property
    def name(self) -> str:
        """The optimizer's class name, for messages and logs."""
        return type(self.optimizer).__name__

    # -- what it is -----------------------------------------------------------------------------

    @property
    def is_async_momentum(self) -> bool:
        """Whether it is an AsyncMomentumSGD (tuned or not): it measures staleness itself."""
        return self._ours is not None

    @property
    def tunes_itself(self) -> bool:
        """Whether it retunes its own momentum to the staleness it measures.

        True for an AsyncMomentumSGD with ``tune=True`` in some group; nobody else may then set
        its momentum.
        """
        return self._ours is not None and any(g["tune"] for g in self._ours.param_groups)

    @property
    def meter(self) -> MomentumMeter | None:
        """The optimizer's momentum meter, or ``None``."""
        return self._ours.meter if self._ours is not None else None

    @property
    def measured_total_momentum(self) -> float | None:
        """Total momentum measured from the trajectory by the meter, once it has a reading."""
        return self._ours.measured_total_momentum if self._ours is not None else None

    @property
    def uses_curvature(self) -> bool:
        """Whether the optimizer's rule needs a curvature estimate (a probe to estimate it on)."""
        return self._ours is not None and self.tracker.uses_curvature

    @property
    def needs_every_update(self) -> bool:
        """Whether one process must see every update in order (so not for Hogwild workers).

        True with the momentum meter, or a rule that feeds on it or on a curvature.
        """
        ours = self._ours
        if ours is None:
            return False
        return ours.meter is not None or self.tracker.uses_meter or self.tracker.uses_curvature

    def set_curvature_probe(self, probe: Callable[[], Tensor] | None) -> None:
        """Give a curvature-based rule the loss it estimates ``lambda_max`` on.

        Args:
            probe: returns a scalar loss of the current parameters with its graph.

        Raises:
            ValueError: the optimizer's rule uses no curvature.
        """
        if not self.uses_curvature:
            raise ValueError(
                "a curvature probe feeds an AsyncMomentumSGD whose rule uses the curvature "
                f"(rule='stability'); this optimizer is {self.describe()}"
            )
        assert self._ours is not None
        self._ours.curvature_probe = probe

    def describe(self) -> str:
        """The optimizer's class, with its rule for an AsyncMomentumSGD: for messages."""
        if self._ours is None:
            return self.name
        return f"{self.name}(rule={self.tracker.rule_name!r})"

    # -- momentum -------------------------------------------------------------------------------

    def momentum_key(self, group: dict[str, Any]) -> MomentumKey | None:
        """Where ``group`` keeps its momentum.

        ``"momentum"``, ``"betas"`` (the first entry), or ``None`` (no momentum, e.g. Adagrad).

        Args:
            group: one of the optimizer's ``param_groups``.
        """
        if group.get("momentum") is not None:
            return "momentum"
        betas = group.get("betas")
        if isinstance(betas, (tuple, list)) and len(betas) >= 1:
            return "betas"
        return None

    @property
    def has_momentum(self) -> bool:
        """Whether every parameter group has a momentum (or ``betas``)."""
        groups = self.optimizer.param_groups
        return bool(groups) and all(self.momentum_key(g) is not None for g in groups)

    @property
    def tunable_from_outside(self) -> bool:
        """Whether a tuner outside the optimizer may set its momentum (:meth:`set_momentum`).

        True for any optimizer with a momentum in every group, except an AsyncMomentumSGD.
        """
        return self._ours is None and self.has_momentum

    def applied_momentum(self, group: dict[str, Any] | None = None) -> float:
        """The momentum ``group`` applies now.

        An AsyncMomentumSGD's tuned (or fixed) one, else the group's ``momentum`` or first beta;
        0 for a group without momentum.

        Args:
            group: one of the optimizer's ``param_groups``; default the first.
        """
        if group is None:
            group = self.optimizer.param_groups[0]
        if self._ours is not None:
            return self._ours.applied_momentum(group)
        key = self.momentum_key(group)
        if key is None:
            return 0.0
        value = group["betas"][0] if key == "betas" else group["momentum"]
        return float(value.item() if isinstance(value, Tensor) else value)

    def target_momentum(self, group: dict[str, Any]) -> float | None:
        """The total momentum ``group`` is to keep, if it says.

        An AsyncMomentumSGD group with ``tune=True`` keeps its ``momentum``; a group of another
        optimizer may carry a ``target_momentum`` of its own for an outside tuner (its
        ``momentum`` is overwritten). ``None`` otherwise (a fixed group, or the tuner's own
        target applies).

        Args:
            group: one of the optimizer's ``param_groups``.
        """
        if self._ours is None:
            target = group.get("target_momentum")
        else:
            target = group["momentum"] if group["tune"] else None
        if target is None:
            return None
        return float(target.item() if isinstance(target, Tensor) else target)

    def set_momentum(self, group: dict[str, Any], value: float) -> None:
        """Set the momentum ``group`` applies, for an optimizer tuned from outside.

        A ``betas`` tuple is replaced (its first entry set); a tensor momentum or beta is
        filled in place (compiled and capturable kernels hold it).

        Args:
            group: one of the optimizer's ``param_groups``.
            value: the momentum to apply.

        Raises:
            ValueError: for an AsyncMomentumSGD (its ``momentum`` is the total the user tuned,
                and it applies what its own tracker says), or a group without momentum.
        """
        if self._ours is not None:
            raise ValueError(
                "AsyncMomentumSGD sets its applied momentum itself; its group['momentum'] is the "
                "total the user tuned and is not written from outside"
            )
        key = self.momentum_key(group)
        if key is None:
            raise ValueError(f"this {self.name} parameter group has neither momentum nor betas")
        value = float(value)
        if key == "betas":
            first, *rest = group["betas"]
            if isinstance(first, Tensor):
                first.fill_(value)
            else:
                group["betas"] = (value, *rest)
        elif isinstance(group["momentum"], Tensor):
            group["momentum"].fill_(value)
        else:
            group["momentum"] = value

    def summary(self) -> MomentumSummary:
        """Algorithmic, implicit and total momentum, ``M_hat`` and the mean staleness, now.

        The total is composed under the tracker's rule; the meter's measurement is included
        when the optimizer runs one.
        """
        return self.tracker.summary(self.applied_momentum(), self.measured_total_momentum)

    # -- the step -------------------------------------------------------------------------------

    def mark_read(self) -> None:
        """Note that the parameters were just read: the next gradient is computed from them."""
        self.tracker.mark_read()

    def zero_grad(self) -> None:
        """Drop the gradients (``set_to_none``) and mark the parameters as read."""
        self.optimizer.zero_grad(set_to_none=True)
        if self._ours is None:  # AsyncMomentumSGD's zero_grad marks its tracker itself
            self.tracker.mark_read()

    def step(
        self,
        staleness: int | None = None,
        *,
        refuse_nonfinite: bool = False,
        loss: float | Tensor | None = None,
        batch_size: int | None = None,
    ) -> StepReport:
        """Apply the gradients held by the parameters and count the update in the tracker.

        An AsyncMomentumSGD gets ``step(staleness=staleness)``: it checks the gradients itself
        and raises or skips a NaN or inf one as it was configured, and reports what it did
        (``last_step``). Any other
        optimizer gets ``step()``, and its update is counted in :attr:`tracker` with
        ``staleness`` (``None``: measured from the tracker's clock since :meth:`mark_read`).

        Args:
            staleness: updates applied since this gradient's parameters were read, if known.
            refuse_nonfinite: for an optimizer that does not check its gradients, raise
                :class:`~asyncmomentum.core.optimizer.NonFiniteGradientError` (changing nothing)
                on a NaN or inf gradient instead of writing it into the parameters.
            loss: the training loss of the gradient's batch, for an AsyncMomentumSGD whose rule
                watches it (``rule="auto"``); other optimizers do not take it.
            batch_size: the number of samples of that batch, for an AsyncMomentumSGD whose rule
                reads it (``rule="auto"``); other optimizers do not take it.

        Returns:
            Whether the update was applied, with its staleness and version.
        """
        if self._ours is not None:
            self._ours.step(staleness=staleness, loss=loss, batch_size=batch_size)
            return self._ours.last_step
        if refuse_nonfinite:
            gathered: list[tuple[list[Tensor], list[Tensor], list[Any]]] = []
            for group in self.optimizer.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                gathered.append((params, [p.grad for p in params], []))
            bad = first_nonfinite(gathered)
            if bad is not None:
                raise nonfinite_error(
                    bad,
                    "it was not applied and the parameters are unchanged. Lower the learning "
                    "rate or clip gradients.",
                )
        self.optimizer.step()
        return self.tracker.record_update(staleness)

    @staticmethod
    def all_finite(grads: Iterable[Tensor | None]) -> bool:
        """Whether no gradient holds NaN or inf; see :func:`all_finite`.

        Args:
            grads: gradients, or ``None`` for a parameter without one.
        """
        return all_finite(grads)

    # -- processes ------------------------------------------------------------------------------

    def share_memory(self) -> OptimizerView:
        """Put the optimizer's parameters and state in shared memory, for Hogwild processes.

        An AsyncMomentumSGD shares its momentum buffers (created now) and tracker
        (:meth:`~asyncmomentum.core.optimizer.AsyncMomentumSGD.share_memory`): one velocity for
        all processes. Any other optimizer shares its parameters and the state tensors it has
        already (buffers created later are per process), and the view's tracker.

        Returns:
            self.
        """
        if self._ours is not None:
            self._ours.share_memory()
            return self
        with torch.no_grad():
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    p.share_memory_()
            for state in self.optimizer.state.values():
                for value in state.values():
                    if isinstance(value, Tensor):
                        value.share_memory_()
        self.tracker.share_memory()
        return self
