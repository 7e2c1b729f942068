"""A recurrent problem for the sweep: a GRU that reads a digit row by row.

- ``gru``: a one-layer GRU (hidden width 32) reads the eight rows of an 8x8 digit of
  scikit-learn's digits as a sequence of eight 8-pixel vectors, and a linear head classifies the
  last hidden state (cross-entropy, 10 classes).

It is the sweep's *new family*: no rule's constants were chosen on it (the rules were designed
on ``quadratic`` and ``softmax``, see ``docs/auto-rule.md``), and it is unlike the other problems
(a recurrence through time, saturating gates, a slow learning curve: its target takes a few
hundred updates at ``M = 1`` and thousands under heavy asynchrony). A step costs about 1 ms on
one core. Its calibration is in :mod:`asyncmomentum.applications.problems`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GRU_HIDDEN", "DigitRowGRU"]

#: Hidden width of the GRU.
GRU_HIDDEN = 32


class DigitRowGRU(nn.Module):
    """A GRU over the rows of ``(N, 1, 8, 8)`` images, then a linear head on the last state.

    Args:
        hidden: the GRU's hidden width.
        classes: number of classes.
    """

    def __init__(self, hidden: int = GRU_HIDDEN, classes: int = 10) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size=8, hidden_size=hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch of images shaped ``(N, 1, 8, 8)`` (rows are time steps)."""
        _, last = self.gru(x.reshape(x.shape[0], 8, 8))
        return self.head(last[0])
