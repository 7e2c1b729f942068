"""The sweep's recurrent problem (``gru``): shapes, seeding, calibration, its place in sweeps."""

from __future__ import annotations

import torch
from conftest import calibration_run

from asyncmomentum.applications.problems import PROBLEMS, PROBLEMS_VERSION, get_problem
from asyncmomentum.applications.recurrent_problems import DigitRowGRU
from asyncmomentum.applications.sweep.analysis import DESIGN_PROBLEMS
from asyncmomentum.applications.sweep.config import FULL, QUICK


def test_the_gru_reads_rows_and_returns_class_logits():
    model = DigitRowGRU()
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    problem = get_problem("gru")
    first, second = problem.make_model(3), problem.make_model(3)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)  # seeded


def test_it_is_registered_held_back_and_in_every_cell_of_the_full_sweep():
    assert "gru" in PROBLEMS
    assert PROBLEMS_VERSION >= 3
    assert "gru" not in DESIGN_PROBLEMS  # no rule's constants were chosen on it
    assert len(FULL.cells("gru")) == len(FULL.staleness_models) * len(FULL.workers)
    assert QUICK.cells("gru") == [("geometric", 1), ("geometric", 4), ("geometric", 16)]


def test_it_learns_slowly_at_one_worker_as_calibrated():
    torch.set_num_threads(1)
    problem = get_problem("gru")
    result = calibration_run("gru")
    assert result.status == "converged"
    # Hundreds of updates at M = 1 (the other problems need tens): a long learning curve.
    assert 200 <= result.steps <= 1000
    assert result.steps * 4 <= problem.max_steps
