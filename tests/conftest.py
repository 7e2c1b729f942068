"""Shared fixtures: small models and seeded data for the tests."""

from __future__ import annotations

import pytest
import torch

from asyncmomentum.applications.digits import SmallCNN


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Tests that start worker processes share 2 cores with this one: a second intra-op thread
    # here only adds contention (a backward pass went from 3 ms to 300 ms under load).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
