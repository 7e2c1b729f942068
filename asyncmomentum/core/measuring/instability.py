"""Detecting the onset of an instability from the applied gradients' norms.

An unstable mode of the (delayed) heavy ball grows geometrically, and the gradient grows with
it: its squared norm climbs away from the lowest level the run has reached. A converging run's
gradient norm falls during the transient and then fluctuates around its noise floor.
:class:`GrowthDetector` keeps a short exponential average of the squared norm and a reference
level: the running minimum of that average (optionally creeping up by ``forgetting`` per
observation, so that it tracks the lower envelope of the recent past instead of the single
lowest point of a noisy run; off by default: on the sweep's quadratic it let slow instabilities
through), and reports a growth when the average exceeds ``threshold`` times the reference; the
reference then restarts from the current level, so a persisting growth is reported again after
another factor ``threshold``. :func:`squared_norm` is the one fused reduction it needs per step.

The state is a small tensor, so that :meth:`GrowthDetector.share_memory` lets Hogwild processes
feed one detector (a lost update of the average under a race is harmless: it is an average).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from asyncmomentum.core.validation import check_real, check_state

__all__ = ["GrowthDetector", "squared_norm", "sum_on_host"]

#: Layout version of the state dicts of this module.
STATE_FORMAT = 1

# Slots of the state tensor.
_AVERAGE, _MINIMUM, _COUNT, _DETECTIONS = range(4)


def squared_norm(tensors: Sequence[Tensor], per_tensor: int | None = None) -> float:
    """The squared Euclidean norm of ``tensors`` together (one fused reduction).

    Args:
        tensors: gradients (any shapes, one floating dtype per device is fastest).
        per_tensor: count only the first this many entries of each tensor (``None``: all). An
            unstable mode is spread over the parameters, so a fixed sample of coordinates sees it
            grow, at a fraction of the memory traffic of a full norm on a large model.
    """
    if not tensors:
        return 0.0
    if per_tensor is not None:  # a tensor within the sample needs no view (a cost per tensor)
        tensors = [t if t.numel() <= per_tensor else t.reshape(-1)[:per_tensor] for t in tensors]
    norms = torch._foreach_norm(list(tensors))
    return float(torch.linalg.vector_norm(torch.stack(norms)).square())


def sum_on_host(values: Iterable[Tensor]) -> float:
    """The sum of 0-dim tensors, possibly on several devices and of several dtypes, as a float.

    Args:
        values: scalars (the squared norms of gradients).
    """
    values = list(values)
    if not values:
        return 0.0
    try:
        # One stack, the usual case: cheaper than asking each value its device first. Several
        # dtypes are promoted to the widest, which sums them at least as precisely as each alone.
        return float(torch.stack(values).sum())
    except RuntimeError:  # several devices: one stack (and the same promotion) per device
        pass
    by_device: dict[torch.device, list[Tensor]] = {}
    for value in values:
        by_device.setdefault(value.device, []).append(value)
    return sum(float(torch.stack(same).sum()) for same in by_device.values())


class GrowthDetector:
    """Reports when a short average of a positive signal grows ``threshold`` x past its minimum.

    Args:
        threshold: the factor of growth of the averaged signal (the squared gradient norm) over
            its running minimum that counts as an instability (> 1).
        smoothing: weight of the past in the exponential average, in [0, 1) (0.7: about
            three observations).
        forgetting: relative rise of the reference per observation (>= 0; 0 keeps the plain
            running minimum).
    """

    def __init__(
        self, threshold: float = 4.0, smoothing: float = 0.7, forgetting: float = 0.0
    ) -> None:
        self.threshold = check_real(threshold, "threshold", minimum=1.0, min_inclusive=False)
        self.smoothing = check_real(
            smoothing, "smoothing", minimum=0.0, maximum=1.0, max_inclusive=False
        )
        self.forgetting = check_real(forgetting, "forgetting", minimum=0.0)
        self._state = torch.zeros(4, dtype=torch.float64)

    def observe(self, value: float) -> bool:
        """Take one observation; ``True`` if it completes a growth by ``threshold``.

        Non-finite observations are ignored (the optimizer refuses such steps anyway).

        Args:
            value: the signal (a squared gradient norm, >= 0).
        """
        if not math.isfinite(value) or value < 0.0:
            return False
        state = self._values()
        average, minimum, count, detections = state.tolist()
        average = value if count == 0 else self.smoothing * average + (1 - self.smoothing) * value
        minimum = average if count == 0 else min(minimum * (1 + self.forgetting), average)
        grew = average > self.threshold * minimum and minimum > 0.0
        if grew:
            detections += 1
            minimum = average  # a persisting growth must grow by `threshold` again
        state[:] = (average, minimum, count + 1, detections)
        return grew

    def read(self) -> tuple[float, float, int, int]:
        """``(average, reference, count, detections)`` in one read of the state.

        What :attr:`average`, :attr:`reference`, :attr:`count` and :attr:`detections` return,
        for a caller that needs several of them at every step (each property reads the state).
        """
        average, minimum, count, detections = self._values().tolist()
        return average, minimum, int(count), int(detections)

    def _values(self) -> Any:
        """The state as a NumPy view: what the tensor holds, written in place (shared or not).

        Element reads and writes through it cost a fraction of the tensor's own (this runs at
        every step); made anew each time, it always sees the tensor's current storage, which
        :meth:`share_memory` moves.
        """
        return self._state.numpy()

    @property
    def average(self) -> float:
        """The exponential average of the signal now (0 before any observation)."""
        return float(self._values()[_AVERAGE])

    @property
    def reference(self) -> float:
        """The level a growth is measured from: the running minimum, reset at each growth."""
        return float(self._values()[_MINIMUM])

    @property
    def detections(self) -> int:
        """Growths reported so far (less those :meth:`dismiss` took back)."""
        return int(self._values()[_DETECTIONS])

    def dismiss(self) -> None:
        """Take back the growth :meth:`observe` just reported: the caller found it benign.

        It no longer counts in :attr:`detections`; the reference stays where the growth put it,
        so the same climb is not reported again until it grows ``threshold`` times more.
        """
        state = self._values()
        if state[_DETECTIONS] > 0:
            state[_DETECTIONS] -= 1

    @property
    def count(self) -> int:
        """Observations so far."""
        return int(self._values()[_COUNT])

    def share_memory(self) -> GrowthDetector:
        """Put the state in shared memory (for Hogwild processes); returns self."""
        self._state.share_memory_()
        return self

    def reset(self) -> None:
        """Forget every observation."""
        self._state.zero_()

    def state_dict(self) -> dict[str, Any]:
        """The average, the minimum and the counters."""
        return {"format": STATE_FORMAT, "state": self._state.tolist()}

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can take ``state_dict``.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        check_state(state_dict, "GrowthDetector", expected_format=STATE_FORMAT, keys=("state",))
        values = state_dict["state"]
        if (
            not isinstance(values, list | tuple)
            or len(values) != 4
            or not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in values)
        ):
            raise ValueError(f"GrowthDetector state is corrupt: {values!r}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a bad state raises and changes nothing.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        self.check_state_dict(state_dict)
        self._state.copy_(torch.tensor(state_dict["state"], dtype=torch.float64))

    def __repr__(self) -> str:
        return (
            f"GrowthDetector(threshold={self.threshold}, smoothing={self.smoothing}, "
            f"forgetting={self.forgetting}, "
            f"count={self.count}, detections={self.detections})"
        )
