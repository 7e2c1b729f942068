"""Smoke test of the sweep's main job: every problem with every registered rule, a few steps.

A new problem or a new rule that cannot run with the others (for example a transformer whose
attention has no double backward, under the stability rule's Hessian-vector products) fails
here, in seconds, instead of minutes into ``asyncmomentum sweep``.
"""

from __future__ import annotations

import pytest
import torch

from asyncmomentum.applications.problems import PROBLEMS, get_problem
from asyncmomentum.applications.sweep.runs import METER_METHOD, RULE_PREFIX, RunSpec, run_one
from asyncmomentum.core.tuning.rules import rule_names

#: Every method a sweep runs: a fixed momentum, the meter's check, each registered rule.
METHODS = ("fixed", METER_METHOD, *(RULE_PREFIX + rule for rule in rule_names()))


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_every_problem_runs_with_every_rule(problem, method):
    definition = get_problem(problem)
    spec = RunSpec(
        problem=problem,
        staleness="geometric",
        workers=4,
        method=method,
        momentum=0.9 if method.startswith(RULE_PREFIX) else 0.5,
        lr=definition.lr_grid[0],  # the smallest rate of its grid: no divergence in 4 steps
        seed=0,
        target_loss=-1.0,  # never reached: every step runs
        max_steps=4,
        eval_every=2,
    )
    result = run_one(spec)  # raises if the pair cannot run (the sweep would record a failure)
    assert result.status in ("capped", "diverged")
    assert result.steps >= 1
