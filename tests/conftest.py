"""Shared fixtures: small models and seeded data for the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class SmallCNN(nn.Module):
    """A tiny CNN for 8x8 single-channel images (the shape of sklearn's digits)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(16 * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@pytest.fixture
def cnn_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Ten fixed batches of synthetic 8x8 images and labels."""
    gen = torch.Generator().manual_seed(1234)
    return [
        (torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen))
        for _ in range(10)
    ]


def make_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN()
