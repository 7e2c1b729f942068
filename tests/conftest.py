"""Shared fixtures: small models and seeded data for the tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyncmomentum.applications.digits import SmallCNN
from asyncmomentum.applications.problems import get_problem
from asyncmomentum.applications.sweep.runs import RunResult, RunSpec, run_one
from asyncmomentum.core.measuring.meter import MomentumReading


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


def make_reading(total: float, algorithmic: float, serial: int) -> MomentumReading:
    """A momentum meter reading whose additive total is ``total``.

    Args:
        total: algorithmic + implicit momentum the reading reports.
        algorithmic: the algorithmic momentum it was taken at.
        serial: the reading's id (the closed loop integrates each once).
    """
    implicit = total - algorithmic
    share = (1.0 - implicit) * (1.0 - algorithmic)
    return MomentumReading(
        total=1.0 - share,
        immediate_share=share,
        algorithmic=algorithmic,
        implicit=implicit,
        standard_error=0.01,
        rows=400,
        coordinates=512,
        kernel=np.array([share, 1.0 - share]),
        serial=serial,
    )


def calibration_run(name: str) -> RunResult:
    """A sweep problem's own calibration: fixed momentum 0.9 at ``M = 1``, its lr, target, cap."""
    problem = get_problem(name)
    spec = RunSpec(
        problem=name,
        staleness="geometric",
        workers=1,
        method="fixed",
        momentum=0.9,
        lr=problem.lr,
        seed=0,
        target_loss=problem.target_loss,
        max_steps=problem.max_steps,
        eval_every=problem.eval_every,
    )
    return run_one(spec)
