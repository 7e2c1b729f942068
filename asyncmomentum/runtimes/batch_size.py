"""How many samples a batch holds, for a rule that reads it (``rule="auto"``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["batch_size_of"]


def batch_size_of(batch: Any) -> int | None:
    """The leading dimension of the first tensor in ``batch``, or ``None`` if it has none.

    A batch is a tensor, or a tuple, list or mapping of them (nested), as data loaders yield:
    ``(inputs, targets)`` or ``{"input_ids": ..., ...}``. Samples are along the first dimension,
    the convention of torch's ``DataLoader`` (and of Lightning's ``extract_batch_size``).

    Args:
        batch: one batch, as the training loop passes it to the loss.
    """
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            found = batch_size_of(item)
            if found is not None:
                return found
    return None
