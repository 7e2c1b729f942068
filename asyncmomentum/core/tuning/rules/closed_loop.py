"""The closed-loop rule: the additive rule corrected by feedback from the momentum meter.

:class:`ClosedLoopController` turns the meter's readings into an algorithmic momentum by
bounded, rate-limited negative feedback; :class:`ClosedLoopRule` runs one per target momentum on
top of the additive rule.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from asyncmomentum.core import formulas
from asyncmomentum.core.tuning.rules.base import TuningRule
from asyncmomentum.core.validation import (
    check_int,
    check_momentum,
    check_momentum_bounds,
    check_real,
    check_state,
)

if TYPE_CHECKING:
    from asyncmomentum.core.measuring.meter import MomentumReading

__all__ = ["ClosedLoopController", "ClosedLoopRule"]

#: Layout version of the state dicts of this module.
STATE_FORMAT = 1


class ClosedLoopController:
    """Algorithmic momentum by bounded, rate-limited negative feedback on the measured total.

    Each :meth:`update` moves the momentum by ``gain * (target - measured_total)``, at most
    ``max_change_per_step`` either way, and clips it to ``bounds``: an integrator, so it settles
    where the measured total equals the target, whatever the meter's composition rule. Call it
    once per *new* reading (pass ``reading_id``, e.g. ``MomentumReading.serial``, and repeated
    calls with the same reading are ignored: integrating one measurement twice overshoots).

    A reading averages the momentum of the whole window it was fitted on, so it lags a change
    of momentum; pass ``measured_algorithmic`` (the reading's ``algorithmic``) and the
    controller rebases the total to the current momentum (``total + current - measured``,
    exact for the additive composition), which removes that lag from the loop.

    Args:
        gain: fraction of the error corrected per reading, in (0, 1].
        max_change_per_step: largest change of the momentum per reading (> 0).
        bounds: ``(low, high)`` clip range of the momentum, inside (-1, 1).
    """

    def __init__(
        self,
        gain: float = 0.5,
        max_change_per_step: float = 0.05,
        bounds: tuple[float, float] = formulas.DEFAULT_MOMENTUM_BOUNDS,
    ) -> None:
        self.gain = check_real(gain, "gain", minimum=0.0, maximum=1.0, min_inclusive=False)
        self.max_change_per_step = check_real(
            max_change_per_step, "max_change_per_step", minimum=0.0, min_inclusive=False
        )
        self.bounds = check_momentum_bounds(bounds)
        self.updates = 0
        self.last_error: float | None = None
        self._last_reading: Any = None

    def update(
        self,
        target: float,
        measured_total: float | None,
        current_alg: float,
        *,
        measured_algorithmic: float | None = None,
        reading_id: Any = None,
        bounds: tuple[float, float] | None = None,
    ) -> float:
        """The next algorithmic momentum.

        Args:
            target: the total momentum to reach, in (-1, 1).
            measured_total: the meter's total momentum; ``None`` or ``nan`` (no reading yet)
                keeps the current momentum.
            current_alg: the algorithmic momentum applied now.
            measured_algorithmic: the algorithmic momentum the reading measured under.
            reading_id: identifies the reading; the same id twice in a row changes nothing.
            bounds: clip range of this call, as
                :func:`~asyncmomentum.core.validation.check_momentum_bounds` returns it
                (default: the controller's ``bounds``).
        """
        target = check_momentum(target)
        current = check_momentum(current_alg, "current_alg")
        low, high = self.bounds if bounds is None else bounds
        clipped = min(max(current, low), high)
        if measured_total is None or not math.isfinite(measured_total):
            return clipped
        if reading_id is not None and reading_id == self._last_reading:
            return clipped
        self._last_reading = reading_id
        total = float(measured_total)
        if measured_algorithmic is not None and math.isfinite(measured_algorithmic):
            total += current - float(measured_algorithmic)
        error = target - total
        change = min(max(self.gain * error, -self.max_change_per_step), self.max_change_per_step)
        self.updates += 1
        self.last_error = error
        return min(max(current + change, low), high)

    def state_dict(self) -> dict[str, Any]:
        """Counters and the last reading's id."""
        return {
            "format": STATE_FORMAT,
            "updates": self.updates,
            "last_error": self.last_error,
            "last_reading": self._last_reading,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a bad state raises and changes nothing.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        check_state(
            state_dict,
            "ClosedLoopController",
            expected_format=STATE_FORMAT,
            keys=("updates", "last_error", "last_reading"),
        )
        try:
            updates = check_int(state_dict["updates"], "updates", 0)
        except ValueError as error:
            raise ValueError(f"ClosedLoopController state is corrupt: {error}") from None
        self.updates = updates
        self.last_error = state_dict["last_error"]
        self._last_reading = state_dict["last_reading"]

    def __repr__(self) -> str:
        return (
            f"ClosedLoopController(gain={self.gain}, max_change_per_step="
            f"{self.max_change_per_step}, bounds={self.bounds}, updates={self.updates})"
        )


class _Loop:
    """One closed loop: a controller and its integrated correction to the additive rule."""

    def __init__(self, controller: ClosedLoopController) -> None:
        self.controller = controller
        self.offset = 0.0


class ClosedLoopRule(TuningRule):
    """The additive rule plus a correction integrated from the momentum meter's readings.

    For each target momentum (each parameter group may have its own) a
    :class:`ClosedLoopController` integrates ``gain * (target - measured_total)``, bounded and
    rate-limited, from the readings handed to :meth:`observe_reading` (each integrated once, by
    its ``serial``, however often the momentum is asked for). The correction is kept apart from
    the additive part, so that a change of ``M`` moves the momentum at once instead of through
    the (slow, noisy) loop. Before the first reading it is the additive rule; totals compose
    additively.

    Args:
        gain: fraction of the error corrected per reading, in (0, 1].
        max_change_per_step: largest change of the momentum per reading (> 0).
    """

    name: ClassVar[str] = "closed_loop"
    uses_meter: ClassVar[bool] = True
    stateful: ClassVar[bool] = True

    def __init__(self, *, gain: float = 0.5, max_change_per_step: float = 0.05) -> None:
        checked = ClosedLoopController(gain, max_change_per_step)  # fails now on a bad option
        self.gain = checked.gain
        self.max_change_per_step = checked.max_change_per_step
        self._loops: dict[float, _Loop] = {}
        self._reading: MomentumReading | None = None

    def observe_reading(self, reading: MomentumReading | None) -> None:
        """Keep the meter's latest reading.

        The next :meth:`algorithmic_momentum` of each target integrates it once.

        Args:
            reading: :attr:`MomentumMeter.reading
                <asyncmomentum.core.measuring.meter.MomentumMeter.reading>` (``None``: none yet).
        """
        self._reading = reading

    def algorithmic_momentum(
        self,
        target: float,
        implicit: float,
        *,
        lr: float | None = None,
        bounds: tuple[float, float] = formulas.DEFAULT_MOMENTUM_BOUNDS,
    ) -> float:
        """The additive rule's momentum plus this target's integrated correction, clipped.

        Args:
            target: the total momentum to reach.
            implicit: the implicit momentum of the asynchrony.
            lr: unused.
            bounds: ``(low, high)`` clip range of the result.
        """
        base = formulas.clip_momentum(formulas.additive_momentum(target, implicit), bounds)
        loop = self._loops.get(target)
        if loop is None:
            loop = self._loops[target] = _Loop(self._new_controller())
        current = formulas.clip_momentum(base + loop.offset, bounds)
        reading = self._reading
        if reading is not None:
            # Rebased to this group's momentum: total = current + measured implicit, in this
            # rule's (additive) composition.
            corrected = loop.controller.update(
                target,
                reading.total_momentum(self),
                current,
                measured_algorithmic=reading.algorithmic,
                reading_id=reading.serial,
                bounds=bounds,
            )
            loop.offset = corrected - base
            current = corrected
        return current

    def total_momentum(self, algorithmic: float, implicit: float) -> float:
        """``algorithmic + implicit``: the loop corrects on top of the additive rule.

        Args:
            algorithmic: the momentum an optimizer applies.
            implicit: the implicit momentum of the asynchrony.
        """
        return formulas.additive_total(algorithmic, implicit)

    # -- lifecycle ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Each target's integrated correction and controller.

        The latest reading is an input, not state: the meter's own state keeps it.
        """
        return {
            "format": STATE_FORMAT,
            "loops": [
                {
                    "target": target,
                    "offset": loop.offset,
                    "controller": loop.controller.state_dict(),
                }
                for target, loop in self._loops.items()
            ],
        }

    def check_state_dict(self, state_dict: dict[str, Any] | list[Any]) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can take ``state_dict``.

        Args:
            state_dict: a dict returned by :meth:`state_dict`, or the list of loops that
                tuner checkpoints of format 1 hold.
        """
        self._loops_from(state_dict)

    def load_state_dict(self, state_dict: dict[str, Any] | list[Any]) -> None:
        """Restore from :meth:`state_dict`; a bad state raises and changes nothing.

        Args:
            state_dict: a dict returned by :meth:`state_dict`, or the list of loops that
                tuner checkpoints of format 1 hold.
        """
        self._loops = self._loops_from(state_dict)

    def reset(self) -> None:
        """Forget every integrated correction (the latest reading stays: it is an input)."""
        self._loops = {}

    def _new_controller(self) -> ClosedLoopController:
        return ClosedLoopController(self.gain, self.max_change_per_step)

    def _loops_from(self, state: Any) -> dict[float, _Loop]:
        """Fresh loops from a state, every entry checked."""
        if isinstance(state, dict):
            check_state(state, "ClosedLoopRule", expected_format=STATE_FORMAT, keys=("loops",))
            entries = state["loops"]
        else:
            entries = state  # the bare list of a format-1 tuner checkpoint
        if not isinstance(entries, list):
            raise ValueError(f"ClosedLoopRule state is corrupt: loops is {type(entries)}")
        loops: dict[float, _Loop] = {}
        for entry in entries:
            try:
                target = check_momentum(entry["target"])
                offset = float(entry["offset"])
                controller_state = entry["controller"]
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"ClosedLoopRule state is corrupt: loop {entry!r}") from error
            if not math.isfinite(offset):
                raise ValueError(f"ClosedLoopRule state is corrupt: loop offset {offset!r}")
            loop = _Loop(self._new_controller())
            loop.controller.load_state_dict(controller_state)
            loop.offset = offset
            loops[target] = loop
        return loops

    def __repr__(self) -> str:
        return (
            f"ClosedLoopRule(gain={self.gain}, max_change_per_step={self.max_change_per_step}, "
            f"targets={sorted(self._loops)})"
        )
