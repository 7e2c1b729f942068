"""The auto rule: the stability bound of the delayed heavy ball, without a probe.

The stability rule (:mod:`asyncmomentum.core.tuning.rules.stability`) returns the largest
momentum at which the linearized delayed heavy ball is stable for ``a = lr * lambda_max`` and
the observed staleness distribution; it needs a probe loss and Hessian-vector products for
``lambda_max``, and the largest curvature is too pessimistic on cross-entropy. This rule keeps
the staleness half of that analysis (the histogram, the mean-square stability test) and replaces
the probed curvature by an *effective* ``a``: it starts optimistic and is raised by a factor
each time the applied gradients' norm shows a growing instability
(:class:`~asyncmomentum.core.measuring.instability.GrowthDetector`). The additive rule is the
floor of the result: the bound only adds momentum to the default's, so a detector fooled by a
noisy gradient cannot take the run below it (issue 20). See ``docs/auto-rule.md`` for the
derivation, the constants, and the limits.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from asyncmomentum.core import formulas
from asyncmomentum.core.measuring.instability import GrowthDetector
from asyncmomentum.core.tuning.rules.base import TuningRule
from asyncmomentum.core.tuning.rules.stability import StabilityRule
from asyncmomentum.core.validation import check_int, check_momentum, check_real, check_state

__all__ = ["DEFAULT_EFFECTIVE_CURVATURE", "AutoRule"]

#: Layout version of the state dicts of this module (1: the ladder without the additive floor;
#: 2: without the loss watch; 3: without the growth's loss reference and the recent norms; 4:
#: without the largest batch; all still read).
STATE_FORMAT = 5

# Slots of the ladder's state tensor.
_LEVEL, _QUIET, _PEAK, _RELEASED, _BINDING, _LOWERED, _LOSS_REFERENCE, _LARGEST_BATCH = range(8)
_SLOTS = 8
# Ladder slots of each older format.
_OLD_SLOTS = {1: 2, 2: 5, 3: 6, 4: 7}

#: The effective ``lr * lambda`` :class:`AutoRule` starts from (see ``docs/auto-rule.md``).
DEFAULT_EFFECTIVE_CURVATURE = 0.6
#: Weight of the past in the average of the training loss the rule watches: about ten batches,
#: so that one noisy batch is not a rise.
LOSS_SMOOTHING = 0.9


class AutoRule(TuningRule):
    """Staleness, gradient norms and losses in, the momentum the delayed heavy ball tolerates, out.

    Keeps the staleness histogram of a
    :class:`~asyncmomentum.core.tuning.rules.stability.StabilityRule` (same caching, same
    refresh) and asks it for the largest stable momentum, capped by the target, at an effective
    ``a = lr * lambda_eff``: a dimensionless number that stands for the curvature of the
    directions that set the pace of training, not the sharpest one. ``a`` walks a ladder of
    rungs ``effective_curvature * step_ratio**level``: one rung down (more momentum) after
    ``patience`` quiet updates, ``backoff`` rungs up each time the squared norm of the applied
    gradients (handed over by :meth:`observe_gradient_norm`; the optimizer does it when the rule
    is on) grows ``threshold`` times past its running minimum, the signature of an unstable
    mode. Each counted growth doubles the wait before the next step down, at most
    ``max_doublings`` times. A growth during which the averaged training loss fell by more than
    ``loss_fall`` is a network leaving a plateau, not an instability, and does not count; but
    only once the detector has read ``forgive_after`` norms: a run at its stable edge blows up
    within tens of updates, before a loss average means much. From then on, too, the detector
    reads a squared norm as at most ``spike_clip`` times its average: a network's gradient
    norm is heavy-tailed (a recurrent net's single batches reach 10-40 times the median), and
    one such batch then raises the average by a bounded factor instead of passing for a
    growth, while an unstable mode, which raises the norm by far less than that per update,
    is read unchanged. Two options, off by default, make
    the ladder bolder on networks whose gradient norm is noisy or climbs as they learn (a
    recurrent net; they cost the short runs, ``docs/auto-rule.md``): the detector can read the
    smallest of the last ``spike_window`` norms (an unstable mode raises them all; one batch's
    outlier raises one), also from ``forgive_after`` on; and for its first ``warmup`` updates
    the ladder can be kept on its first rung (the staleness histogram and the loss have not
    seen the run yet). The additive
    rule is the floor of the result: the bound only ever adds momentum to it (the additive
    rule's implicit momentum is the larger of the optimizer's estimate and the histogram's ``1 -
    1/(1 + mean tau)``, so the optimizer's warm-up at ``M = 1`` does not put the target under
    full asynchrony), until the training loss, when the caller hands it over
    (:meth:`observe_loss`), rises ``loss_rise`` times over the lowest it has been while the
    floor binds: there the default's own momentum is unstable, and each such rise lowers the
    floor by ``floor_step`` for the rest of the run. No probe, no Hessian-vector product, no
    grid. The gradient of a batch much smaller than the run's others (an epoch's short last
    batch) is noisier by that ratio, not unstable: when the caller hands the batch size
    (:meth:`observe_batch_size`; ``step(batch_size=...)`` and this package's runtimes do), the
    detector does not read the norm of a batch under ``short_batch`` times the largest seen.
    Without delays in the window (and before the first observation) it is the additive rule,
    i.e. the target; totals compose additively. See ``docs/auto-rule.md``.

    Args:
        effective_curvature: the ``a`` the rule starts from (> 0). Larger is more conservative
            (a lower momentum at a given staleness).
        min_curvature: the lowest rung, in (0, ``effective_curvature``].
        max_curvature: the highest rung (>= ``effective_curvature``).
        step_ratio: ratio of two neighbouring rungs (> 1).
        patience: quiet updates before a step down (>= 1).
        backoff: rungs up per detected instability (>= 1).
        max_doublings: how often an instability may double the patience (>= 0).
        threshold: growth of the averaged squared gradient norm over its running minimum that
            counts as an instability (> 1); see
            :class:`~asyncmomentum.core.measuring.instability.GrowthDetector`.
        smoothing: weight of the past in that average, in [0, 1).
        forgetting: relative rise of the detector's reference per update (>= 0).
        spike_window: from ``forgive_after`` on, the detector reads the smallest of this many
            latest squared norms (>= 1; 1, the default: each norm as it comes).
        loss_fall: from ``forgive_after`` on, a growth of the gradient norm during which the
            averaged training loss fell by more than this fraction (from when the growth's
            reference was set) does not count, in [0, 1) (``None``: every growth counts).
            Needs the loss watch (``loss_rise``) and a caller that hands the loss.
        forgive_after: gradient norms the detector reads before ``spike_window``,
            ``loss_fall`` and ``spike_clip`` may forgive a growth (>= 0); before that, every
            growth counts.
        spike_clip: from ``forgive_after`` on, a squared norm is read as at most this times
            the detector's average (> 1; ``None``: as it comes). One batch then raises the
            average by at most ``smoothing + (1 - smoothing) * spike_clip`` (1.6x with the
            defaults).
        warmup: updates before the ladder may step below its first rung (>= 0; 0, the
            default: from the start).
        release_level: ``None`` (the default) keeps the additive floor for the whole run; a
            number (> 0) drops it, for the rest of the run, at a growth detected while the
            floor holds the momentum above the bound whose averaged squared norm exceeds this
            times the largest average of the run so far (0.5 saves the quadratic cells where
            the additive rule diverges and costs momentum on networks whose gradient norm
            climbs as they learn: ``docs/auto-rule.md``).
        loss_rise: the rise of the averaged training loss over its lowest that counts as an
            instability (> 1; ``None``: the loss is not watched). It lowers the floor while the
            floor binds, and backs the ladder off otherwise (:meth:`observe_loss`). Without a
            loss from the caller the rule never sees one.
        floor_step: how far each such rise lowers the additive floor (> 0).
        short_batch: the gradient norm of a batch smaller than this fraction of the largest
            batch seen is not read by the growth detector, in [0, 1] (0: every norm is read).
            Needs a caller that hands the batch size; without one every norm is read.
        window: staleness observations kept.
        max_staleness: the histogram's cap.
    """

    name: ClassVar[str] = "auto"
    stateful: ClassVar[bool] = True
    revision: ClassVar[int] = 7
    #: The optimizer hands this rule the applied gradients' squared norm before each update.
    uses_gradient_norm: ClassVar[bool] = True
    #: ... and the training loss of their batch, when its caller gives it (``step(loss=...)``,
    #: a closure, or a runtime of this package).
    uses_loss: ClassVar[bool] = True
    #: ... and the size of that batch, when its caller gives it (``step(batch_size=...)``, or a
    #: runtime of this package).
    uses_batch_size: ClassVar[bool] = True

    def __init__(
        self,
        *,
        effective_curvature: float = DEFAULT_EFFECTIVE_CURVATURE,
        min_curvature: float = 0.06,
        max_curvature: float = 4.0,
        step_ratio: float = math.sqrt(2.0),
        patience: int = 12,
        backoff: int = 2,
        max_doublings: int = 2,
        threshold: float = 4.0,
        smoothing: float = 0.7,
        forgetting: float = 0.0,
        spike_window: int = 1,
        loss_fall: float | None = 0.1,
        forgive_after: int = 100,
        spike_clip: float | None = 3.0,
        warmup: int = 0,
        release_level: float | None = None,
        loss_rise: float | None = 3.0,
        floor_step: float = 0.25,
        short_batch: float = 0.5,
        window: int = 1024,
        max_staleness: int = 1024,
    ) -> None:
        self.release_level = (
            None
            if release_level is None
            else check_real(release_level, "release_level", minimum=0.0, min_inclusive=False)
        )

        self.effective_curvature = check_real(
            effective_curvature, "effective_curvature", minimum=0.0, min_inclusive=False
        )
        self.min_curvature = check_real(
            min_curvature,
            "min_curvature",
            minimum=0.0,
            maximum=self.effective_curvature,
            min_inclusive=False,
        )
        self.max_curvature = check_real(
            max_curvature, "max_curvature", minimum=self.effective_curvature
        )
        self.step_ratio = check_real(step_ratio, "step_ratio", minimum=1.0, min_inclusive=False)
        self.patience = check_int(patience, "patience", 1)
        self.backoff = check_int(backoff, "backoff", 1)
        self.max_doublings = check_int(max_doublings, "max_doublings", 0)
        self.detector = GrowthDetector(threshold, smoothing, forgetting)
        self.spike_window = check_int(spike_window, "spike_window", 1)
        self.loss_fall = (
            None
            if loss_fall is None
            else check_real(loss_fall, "loss_fall", minimum=0.0, maximum=1.0, max_inclusive=False)
        )
        self.warmup = check_int(warmup, "warmup", 0)
        self.forgive_after = check_int(forgive_after, "forgive_after", 0)
        self.spike_clip = (
            None
            if spike_clip is None
            else check_real(spike_clip, "spike_clip", minimum=1.0, min_inclusive=False)
        )
        # The latest squared norms but the current one, oldest first (the spike filter's window).
        self._recent = torch.zeros(self.spike_window - 1, dtype=torch.float64)
        self.loss_rise = (
            None
            if loss_rise is None
            else check_real(loss_rise, "loss_rise", minimum=1.0, min_inclusive=False)
        )
        self.floor_step = check_real(floor_step, "floor_step", minimum=0.0, min_inclusive=False)
        self.short_batch = check_real(short_batch, "short_batch", minimum=0.0, maximum=1.0)
        # Whether the gradient about to be applied comes from a short batch (per process, and
        # per step: set by observe_batch_size, spent by the next observe_gradient_norm).
        self._short = False
        self.loss_watch = (
            None if self.loss_rise is None else GrowthDetector(self.loss_rise, LOSS_SMOOTHING)
        )
        # The ladder of `a`: level 0 is `effective_curvature`, each level down divides by
        # `step_ratio`; discrete, so that the bound is computed once per level and cached.
        self._lowest = -math.floor(
            math.log(self.effective_curvature / self.min_curvature) / math.log(self.step_ratio)
            + 1e-9
        )
        self._highest = math.floor(
            math.log(self.max_curvature / self.effective_curvature) / math.log(self.step_ratio)
            + 1e-9
        )
        # (level, quiet observations, the largest averaged squared norm so far, floor released,
        # floor binds, how far loss rises lowered the floor, the loss average when the growth
        # detector's reference was set: kept with `loss_fall` only, 0 for none, the largest
        # batch seen: 0 for none)
        self._ladder = torch.zeros(_SLOTS, dtype=torch.float64)
        self._last_delay: int | None = None  # the histogram's count at the last tau > 0
        # The bound itself (its histogram, cache and computation): one source of truth, asked
        # at the ladder's `a` directly (`bound_at`).
        self._bound = StabilityRule(
            curvature_margin=0.0, window=window, max_staleness=max_staleness
        )

    @property
    def histogram(self) -> Any:
        """The staleness histogram the bound is computed from."""
        return self._bound.histogram

    @property
    def synchronous(self) -> bool:
        """Whether no gradient of the histogram's window was stale (or none was observed)."""
        last = self._last_delay
        return last is None or self.histogram.count - last >= self.histogram.window

    @property
    def level(self) -> int:
        """The rung of the ladder of ``a``: 0 at the start, negative below (more momentum)."""
        return int(self._ladder.numpy()[_LEVEL])

    @property
    def effective_a(self) -> float:
        """The ``a = lr * lambda_eff`` the bound is computed at now."""
        return self._a_at(self.level)

    def _a_at(self, level: int) -> float:
        """The ``a`` of a rung of the ladder."""
        return self.effective_curvature * self.step_ratio**level

    # -- inputs ---------------------------------------------------------------------------------

    def observe(self, tau: int) -> None:
        """Record the staleness of one applied gradient.

        Args:
            tau: updates applied between the gradient's read and its application (>= 0).
        """
        self._bound.observe(tau)
        if tau > 0:
            self._last_delay = self.histogram.count

    def observe_batch_size(self, batch_size: int) -> None:
        """Take the size of the batch whose gradient is about to be applied.

        A batch under ``short_batch`` times the largest seen so far makes the next
        :meth:`observe_gradient_norm` a no-op: its gradient's norm carries the noise of a small
        sample (a batch of 4 among batches of 32: about 8 times the variance), which the growth
        detector would take for an instability.

        Args:
            batch_size: the number of samples (>= 1).
        """
        ladder = self._ladder.numpy()  # a view, written in place (see GrowthDetector._values)
        largest = float(ladder[_LARGEST_BATCH])
        if batch_size > largest:  # written only when it grows: this runs every update
            largest = float(batch_size)
            ladder[_LARGEST_BATCH] = largest
        self._short = batch_size < self.short_batch * largest

    def observe_gradient_norm(self, squared_norm: float) -> None:
        """Take the squared norm of the gradients about to be applied.

        Args:
            squared_norm: ``sum ||g||^2`` over the parameters (>= 0; non-finite is ignored).
        """
        if self._short:  # a short batch's noise, not a growth, and no quiet update either
            self._short = False
            return
        # The slots before the largest batch, which only observe_batch_size writes (under
        # Hogwild another process may be raising it meanwhile).
        ladder = self._ladder.numpy()[:_LARGEST_BATCH]
        level, quiet, peak, released, binding, lowered, loss_reference = ladder.tolist()
        detector = self.detector
        # Read once before and once after: each read of the detector's state makes a view.
        average, reference, count, _ = detector.read()
        # Before `forgive_after` norms every growth counts (the spike window still fills).
        forgiving = count >= self.forgive_after
        filtered = self._without_spikes(squared_norm)
        signal = filtered if forgiving else squared_norm
        if forgiving and self.spike_clip is not None and count and math.isfinite(signal):
            # One batch's outlier moves the average by a bounded factor; an unstable mode grows
            # the norm far slower than that per update, so its growth is read as it is.
            signal = min(signal, self.spike_clip * average)
        if self.loss_fall is None:
            grew = detector.observe(signal)
        else:
            grew, loss_reference = self._observe_against_loss(
                signal, reference, count, loss_reference, self.loss_fall if forgiving else None
            )
        average, _, count, detections = detector.read()
        if grew:
            level, quiet = min(level + self.backoff, self._highest), 0.0
            # A growth while the additive floor holds the momentum above the bound. With a
            # `release_level`, one that takes the average past that fraction of the run's peak
            # releases the floor (off by default: a network's gradient norm also climbs past
            # its start when it leaves a plateau; see docs/auto-rule.md).
            if binding and self.release_level is not None and average > self.release_level * peak:
                released = 1.0
        else:
            quiet += 1
            # Each instability doubles the wait before the next probe (up to max_doublings
            # times): a run that sits at its stable edge re-probes it less and less often.
            wait = self.patience * 2 ** min(detections, self.max_doublings)
            warm = not self.warmup or count > self.warmup
            lowest = self._lowest if warm else max(self._lowest, 0)
            if quiet >= wait and level > lowest:
                level, quiet = level - 1, 0.0
        ladder[:] = (level, quiet, max(peak, average), released, binding, lowered, loss_reference)

    def _observe_against_loss(
        self,
        signal: float,
        reference: float,
        observed: int,
        loss_reference: float,
        loss_fall: float | None,
    ) -> tuple[bool, float]:
        """Feed the detector; a growth during which the loss fell ``loss_fall`` is dismissed.

        Args:
            signal: the (spike-filtered) squared norm.
            reference: the detector's reference before this norm.
            observed: the detector's count before this norm.
            loss_reference: the loss average when the detector's reference was last set.
            loss_fall: the rule's ``loss_fall``; ``None`` before ``forgive_after`` (the loss
                reference is kept, and every growth counts).

        Returns:
            Whether an instability grew, and the loss reference now.
        """
        detector = self.detector
        grew = detector.observe(signal)
        loss = self._loss_average()
        if observed == 0 or detector.reference < reference:
            loss_reference = loss  # the level a growth is measured from was just set
        if grew:
            if loss_fall is not None and 0.0 < loss < (1.0 - loss_fall) * loss_reference:
                detector.dismiss()  # the loss fell meanwhile: a network learning, not unstable
                grew = False
            loss_reference = loss
        return grew, loss_reference

    def _without_spikes(self, squared_norm: float) -> float:
        """The smallest of the latest ``spike_window`` squared norms, this one included."""
        if self.spike_window == 1 or not math.isfinite(squared_norm) or squared_norm < 0.0:
            return squared_norm
        seen = min(self.detector.count, self.spike_window - 1)
        view = self._recent.numpy()
        recent = view.tolist()
        view[:] = [*recent[1:], squared_norm]
        return min([squared_norm, *recent[len(recent) - seen :]])

    def _loss_average(self) -> float:
        """The loss watch's average now (0 without a watch or before the first loss)."""
        if self.loss_watch is None:
            return 0.0
        average, _, count, _ = self.loss_watch.read()
        return average if count else 0.0

    def observe_loss(self, loss: float) -> None:
        """Take the training loss of the batch whose gradient is about to be applied.

        A rise of its average by ``loss_rise`` over the lowest it has been (since the last rise)
        is an instability, not noise: a converging run's loss does not triple, even where its
        gradient norm climbs (a network leaving a plateau). While the additive floor holds the
        momentum above the bound, such a rise lowers the floor by ``floor_step`` for the rest of
        the run (the default rule's own momentum is unstable here; a run that keeps diverging
        keeps rising, and the floor keeps falling, down to the bound); otherwise it backs the
        ladder off, as a growth of the gradient norm does.

        Args:
            loss: the batch's loss (non-finite or negative is ignored).
        """
        if self.loss_watch is None or not self.loss_watch.observe(loss):
            return
        ladder = self._ladder.numpy()
        if ladder[_BINDING]:
            ladder[_LOWERED] += self.floor_step
        else:
            ladder[_LEVEL] = min(float(ladder[_LEVEL]) + self.backoff, self._highest)
            ladder[_QUIET] = 0.0

    # -- output ---------------------------------------------------------------------------------

    def algorithmic_momentum(
        self,
        target: float,
        implicit: float,
        *,
        lr: float | None = None,
        bounds: tuple[float, float] = formulas.DEFAULT_MOMENTUM_BOUNDS,
    ) -> float:
        """The additive rule's momentum, or more up to the bound, or less where it grows.

        Args:
            target: the total momentum the user wants: the cap of the result.
            implicit: the implicit momentum of the asynchrony (the additive rule's input).
            lr: unused (the effective ``a`` is already ``lr * lambda``).
            bounds: ``(low, high)``: the floor of the result, and a ceiling under the target.
        """
        if self.synchronous:
            # No delay in the window: the momentum the user tuned, as torch would run it (the
            # additive rule with no implicit momentum), and no bound to compute.
            return formulas.clip_momentum(formulas.additive_momentum(target, implicit), bounds)
        target = check_momentum(target)
        ladder = self._ladder.numpy()  # one view for this call's reads and its write
        bound = self._bound.bound_at(self._a_at(int(ladder[_LEVEL])), target, bounds)
        if ladder[_RELEASED]:
            return bound
        # The additive rule's momentum, at the larger of two estimates of the implicit momentum:
        # the optimizer's (a long average, which holds M = 1 through its warm-up) and the
        # histogram's (1 - 1/(1 + mean tau), which sees the first delays at once): at start-up
        # the optimizer's alone would apply the target under full asynchrony.
        seen = formulas.implicit_momentum_from_staleness(self.histogram.mean)
        floor = formulas.clip_momentum(
            formulas.additive_momentum(target, max(implicit, seen)) - float(ladder[_LOWERED]),
            bounds,
        )
        ladder[_BINDING] = float(floor > bound)
        return max(bound, floor)

    @property
    def floor_offset(self) -> float:
        """How far rises of the training loss have lowered the additive floor (0 at first)."""
        return float(self._ladder.numpy()[_LOWERED])

    @property
    def floor_active(self) -> bool:
        """Whether the additive rule's momentum is the floor of the result now.

        Always, unless ``release_level`` is set and a growth of the gradient norm past that
        fraction of its peak, while the floor held the momentum above the bound, dropped it for
        the rest of the run. Rises of the loss lower the floor instead (:attr:`floor_offset`).
        """
        return not self._ladder.numpy()[_RELEASED]

    # -- lifecycle ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The staleness histogram, the detectors and the ladder (the constants are not state)."""
        return {
            "format": STATE_FORMAT,
            "histogram": self.histogram.state_dict(),
            "detector": self.detector.state_dict(),
            "loss_watch": None if self.loss_watch is None else self.loss_watch.state_dict(),
            "ladder": self._ladder.tolist(),
            "recent": self._recent.tolist(),
        }

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can take ``state_dict``.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        state_dict = self._upgrade(state_dict)
        check_state(
            state_dict,
            "AutoRule",
            expected_format=STATE_FORMAT,
            keys=("histogram", "detector", "loss_watch", "ladder", "recent"),
        )
        ladder = state_dict["ladder"]
        if not (
            isinstance(ladder, list | tuple)
            and len(ladder) == _SLOTS
            and all(isinstance(v, int | float) and math.isfinite(v) for v in ladder)
            and self._lowest <= ladder[_LEVEL] <= self._highest
            and ladder[_QUIET] >= 0
            and ladder[_PEAK] >= 0
            and ladder[_RELEASED] in (0, 1)
            and ladder[_BINDING] in (0, 1)
            and ladder[_LOWERED] >= 0
            and ladder[_LOSS_REFERENCE] >= 0
            and ladder[_LARGEST_BATCH] >= 0
        ):
            raise ValueError(f"AutoRule state is corrupt: ladder {ladder!r}")
        recent = state_dict["recent"]
        if not (
            isinstance(recent, list | tuple)
            and all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in recent)
        ):
            raise ValueError(f"AutoRule state is corrupt: recent norms {recent!r}")
        if len(recent) != self.spike_window - 1:
            raise ValueError(
                f"AutoRule state: {len(recent)} recent norms for a spike window of "
                f"{len(recent) + 1}, and this rule's spike_window is {self.spike_window}"
            )
        self._bound.check_state_dict(_bound_state(state_dict))
        self.detector.check_state_dict(state_dict["detector"])
        watch = state_dict["loss_watch"]
        if (watch is None) != (self.loss_watch is None):
            raise ValueError(
                "AutoRule state: the loss watch is "
                f"{'off' if watch is None else 'on'} in the state and "
                f"{'off' if self.loss_watch is None else 'on'} in this rule (loss_rise)"
            )
        if self.loss_watch is not None:
            self.loss_watch.check_state_dict(watch)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a bad state raises and changes nothing.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        self.check_state_dict(state_dict)
        state_dict = self._upgrade(state_dict)
        self._bound.load_state_dict(_bound_state(state_dict))
        # Where in the window the last delay was is not kept: any delay in it counts as now.
        delayed = self.histogram.mean > 0
        self._last_delay = self.histogram.count if delayed else None
        self.detector.load_state_dict(state_dict["detector"])
        if self.loss_watch is not None:
            self.loss_watch.load_state_dict(state_dict["loss_watch"])
        self._ladder.copy_(torch.tensor(state_dict["ladder"], dtype=torch.float64))
        self._recent.copy_(torch.tensor(state_dict["recent"], dtype=torch.float64))

    def _upgrade(self, state_dict: Any) -> Any:
        """An older state as the current format; anything else unchanged.

        Older ladders get the new slots (no floor released or lowered, no loss reference, no
        batch seen), formats 1 and 2 a loss watch that has seen no loss yet, and formats 1 to 3
        the detector's average as each recent norm (what those norms averaged to).

        Args:
            state_dict: the state to read.
        """
        if not isinstance(state_dict, dict) or state_dict.get("format") not in _OLD_SLOTS:
            return state_dict
        version = state_dict["format"]
        ladder, detector = state_dict.get("ladder"), state_dict.get("detector")
        if not (
            isinstance(ladder, list | tuple)
            and len(ladder) == _OLD_SLOTS[version]
            and isinstance(detector, dict)
            and isinstance(detector.get("state"), list | tuple)
            and detector["state"]
        ):
            return state_dict
        average = detector["state"][0]
        return {
            **state_dict,
            "format": STATE_FORMAT,
            "ladder": [*ladder, *[0.0] * (_SLOTS - len(ladder))],
            "loss_watch": state_dict.get("loss_watch") if version >= 3 else self._fresh_watch(),
            "recent": (
                state_dict.get("recent") if version >= 4 else [average] * (self.spike_window - 1)
            ),
        }

    def _fresh_watch(self) -> dict[str, Any] | None:
        """The state of the loss watch before any loss (``None`` without a watch)."""
        if self.loss_watch is None:
            return None
        return GrowthDetector(self.loss_watch.threshold, LOSS_SMOOTHING).state_dict()

    def reset(self) -> None:
        """Forget the observed staleness, gradient norms and losses (the configuration stays)."""
        self._bound.reset()
        self._last_delay = None
        self.detector.reset()
        if self.loss_watch is not None:
            self.loss_watch.reset()
        self._ladder.zero_()
        self._recent.zero_()
        self._short = False

    def share_memory(self) -> AutoRule:
        """Put the detector in shared memory, so Hogwild processes raise one ``a``; returns self.

        The staleness histogram stays per process: every process observes the same clock.
        """
        self.detector.share_memory()
        if self.loss_watch is not None:
            self.loss_watch.share_memory()
        self._ladder.share_memory_()
        self._recent.share_memory_()
        return self

    def __repr__(self) -> str:
        return (
            f"AutoRule(effective_curvature={self.effective_curvature}, level={self.level}, "
            f"effective_a={self.effective_a:.4g}, detector={self.detector!r})"
        )


def _bound_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The inner stability rule's state for the histogram of an AutoRule state."""
    return {"format": 1, "histogram": state_dict["histogram"], "curvature": None}
