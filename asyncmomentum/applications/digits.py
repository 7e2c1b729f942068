"""The small problem every example and demo trains: a CNN on scikit-learn's bundled digits.

``load_digits`` ships inside scikit-learn (no download), 1,797 images of 8x8 pixels: big enough to
show what asynchrony does to momentum, small enough to train in seconds on a laptop core.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from asyncmomentum.core.validation import check_real

__all__ = ["DigitsSplit", "SmallCNN", "accuracy", "iterate_batches", "load_digits_split"]


class SmallCNN(nn.Module):
    """Two conv layers and a linear head for 8x8 single-channel images (about 2,000 weights).

    Args:
        classes: number of output classes.
        width: channels of the first conv layer (the second has twice as many).
    """

    def __init__(self, classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch of images shaped ``(N, 1, 8, 8)``."""
        return self.head(self.features(x).flatten(1))


@dataclass(frozen=True)
class DigitsSplit:
    """Train and held-out tensors: images ``(N, 1, 8, 8)`` in [0, 1], labels ``(N,)`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """Load scikit-learn's digits as tensors, split at random into train and held-out parts.

    Args:
        test_fraction: share of the images held out, in (0, 1).
        seed: seed of the split.
    """
    check_real(
        test_fraction,
        "test_fraction",
        minimum=0.0,
        maximum=1.0,
        min_inclusive=False,
        max_inclusive=False,
    )
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data ships with scikit-learn: pip install 'asyncmomentum[examples]'"
        ) from None
    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(labels))
    test, train = order[:n_test], order[n_test:]
    return DigitsSplit(images[train], labels[train], images[test], labels[test])


def iterate_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled mini-batches, a new permutation each epoch, reproducible from ``seed``.

    Args:
        x: inputs, first dimension the examples.
        y: targets, first dimension the examples.
        batch_size: examples per batch (the last batch of an epoch may be smaller).
        seed: seed of the shuffling.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            yield x[index], y[index]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of examples whose arg-max logit is the label.

    Args:
        model: a classifier returning logits.
        x: inputs.
        y: integer labels.
    """
    return (model(x).argmax(dim=1) == y).float().mean().item()
