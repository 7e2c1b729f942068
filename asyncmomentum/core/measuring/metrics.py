"""torchmetrics metrics of asynchrony: the staleness of applied gradients, exact across ranks.

The staleness ``tau`` of a gradient is the number of updates applied between the moment its
parameters were read and the moment it is applied. :class:`StalenessMetric` accumulates ``tau``
as an integer sum, an integer count and a maximum, reduced with ``sum``/``sum``/``max`` across
processes, so the mean it reports over several ranks is the mean of *all* their observations
(not a mean of per-rank means, which is wrong when ranks observe different numbers of steps).

This module is part of the framework-agnostic core: it depends on torch and torchmetrics only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from asyncmomentum.core.validation import MAX_COUNT, check_staleness

__all__ = ["StalenessMetric"]


class StalenessMetric(Metric):
    """Mean and maximum staleness of applied gradients, synchronized exactly across processes.

    ``update`` accepts one staleness (a Python ``int`` or a 0-d integer tensor) or many (a
    sequence of ints or an integer tensor of any shape; every element is one observation).
    ``compute`` returns a dict of tensors:

    - ``"mean"``: mean staleness, ``float64``; ``nan`` when nothing was observed.
    - ``"max"``: largest staleness, ``int64``; ``0`` when nothing was observed.
    - ``"count"``: number of observations, ``int64`` (tells an empty window from a zero one).

    In a distributed run, ``compute`` reduces the integer sum and count by summation and the
    maximum by ``max`` over all ranks, so every rank gets the same, exact result.

    Args:
        kwargs: forwarded to :class:`torchmetrics.Metric` (``sync_on_compute``,
            ``process_group``, ``dist_sync_fn``, ...).

    Example:
        >>> metric = StalenessMetric()
        >>> metric.update(3)
        >>> metric.update(torch.tensor([0, 5]))
        >>> {name: value.item() for name, value in metric.compute().items()}
        {'mean': 2.6666666666666665, 'max': 5, 'count': 3}
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    total: Tensor
    count: Tensor
    maximum: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Integers, so the sum over ranks and steps is exact however long the run.
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("maximum", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="max")

    def update(self, staleness: int | Tensor | Sequence[int]) -> None:
        """Record the staleness of one or more applied gradients.

        Args:
            staleness: a non-negative integer, a sequence of them, or an integer tensor of any
                shape whose elements are observations.

        Raises:
            ValueError: if a value is negative, not an integer, or the tensor is floating point.
        """
        observations = _as_observations(staleness)
        if observations.numel() == 0:
            return
        observations = observations.to(self.total.device)
        self.total += observations.sum()
        self.count += observations.numel()
        self.maximum = torch.maximum(self.maximum, observations.max())

    def compute(self) -> dict[str, Tensor]:
        """``{"mean", "max", "count"}`` over every observation since the last reset (all ranks)."""
        count = self.count.clone()
        if int(count) == 0:
            mean = torch.tensor(float("nan"), dtype=torch.float64, device=count.device)
        else:
            mean = self.total.to(torch.float64) / count.to(torch.float64)
        return {"mean": mean, "max": self.maximum.clone(), "count": count}


def _as_observations(staleness: int | Tensor | Sequence[int]) -> Tensor:
    """Validate ``staleness`` and return it as a flat ``int64`` tensor of observations."""
    if isinstance(staleness, Tensor):
        if staleness.is_floating_point() or staleness.is_complex() or staleness.dtype == torch.bool:
            raise ValueError(
                f"staleness must be an integer tensor (updates between read and apply), got "
                f"dtype {staleness.dtype}; convert counts with .long() if they are whole numbers"
            )
        values = staleness.detach().flatten().to(torch.int64)
    elif isinstance(staleness, Sequence) and not isinstance(staleness, str | bytes):
        values = torch.tensor([check_staleness(tau) for tau in staleness], dtype=torch.int64)
    else:
        values = torch.tensor([check_staleness(staleness)], dtype=torch.int64)
    if values.numel() and int(values.min()) < 0:
        raise ValueError(
            f"staleness must be non-negative, got a minimum of {int(values.min())}; a gradient "
            "cannot be computed from parameters newer than the ones it is applied to"
        )
    if values.numel() and int(values.max()) > MAX_COUNT:
        raise ValueError(f"staleness must be <= {MAX_COUNT} (2**62 - 1), got {int(values.max())}")
    return values
