"""AsyncMomentumSGD(measure_momentum=True): the meter wired into the optimizer."""

from __future__ import annotations

import pickle

import pytest

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.applications.problems import get_problem
from asyncmomentum.runtimes import simulate as sim

STEPS = 700


def _run(staleness, momentum, seed=0):
    problem = get_problem("quadratic")
    model = problem.make_model(seed)
    opt = AsyncMomentumSGD(
        model.parameters(), lr=0.125, momentum=momentum, tune=False, measure_momentum=True
    )
    sim.simulate(model, problem.loss_fn, problem.batches(seed), opt, staleness, STEPS, seed=seed)
    return opt


@pytest.mark.parametrize("workers", [1, 4, 8])
def test_measures_implicit_momentum_of_the_asynchrony(workers):
    opt = _run(sim.workers(workers), momentum=0.0)
    assert opt.measured_total_momentum == pytest.approx(1 - 1 / workers, abs=0.1)


@pytest.mark.parametrize("momentum", [0.5, 0.9])
def test_reads_the_set_momentum_without_asynchrony(momentum):
    opt = _run(sim.round_robin(1), momentum=momentum)
    assert opt.measured_total_momentum == pytest.approx(momentum, abs=0.03)


def test_off_by_default_and_carried_by_state_dict_and_pickle():
    problem = get_problem("quadratic")
    assert AsyncMomentumSGD(problem.make_model(0).parameters()).measured_total_momentum is None
    opt = _run(sim.workers(4), momentum=0.0)
    model = get_problem("quadratic").make_model(0)
    resumed = AsyncMomentumSGD(
        model.parameters(), lr=0.125, momentum=0.0, tune=False, measure_momentum=True
    )
    resumed.load_state_dict(opt.state_dict())
    # The meter's state is its windows; the reading is refitted from them on load.
    assert resumed.measured_total_momentum == pytest.approx(0.75, abs=0.1)
    assert pickle.loads(pickle.dumps(opt)).measured_total_momentum == opt.measured_total_momentum


def test_staleness_older_than_the_clock_is_dated_to_its_start():
    problem = get_problem("quadratic")
    model = problem.make_model(0)
    opt = AsyncMomentumSGD(model.parameters(), lr=0.1, measure_momentum=True)
    problem.loss_fn(model, next(problem.batches(0))).backward()
    opt.step(staleness=5)  # at version 0: the meter must not refuse it after the update
    assert opt.tracker.clock.value == 1
