"""Momentum meter and closed-loop controller: accuracy on the simulator, attribution, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from asyncmomentum.applications.problems import get_problem
from asyncmomentum.core.measuring.meter import MomentumMeter
from asyncmomentum.core.optimizer import AsyncMomentumSGD
from asyncmomentum.core.tuning.rules import AdditiveRule, CompositionalRule
from asyncmomentum.core.tuning.rules.closed_loop import ClosedLoopController
from asyncmomentum.runtimes.simulate import round_robin, simulate, workers

STEPS = 700  # a full window (512 versions) and a little more
#: Learning rates pinned here (the problems' own may be recalibrated): the sweep's rates.
LR = {"quadratic": 0.125, "softmax": 0.25}


def _measure(problem_name, staleness, momentum, *, steps=STEPS, seed=0, attribute=True, **meter):
    """Run the simulator with a fixed momentum, feeding every applied update to a meter.

    ``attribute=False`` feeds the version an update was *applied* at instead of the version
    its gradient was computed at (the naive estimator the meter must not be).
    """
    torch.manual_seed(seed)
    problem = get_problem(problem_name)
    model = problem.make_model(seed)
    optimizer = AsyncMomentumSGD(
        model.parameters(), lr=LR[problem_name], momentum=momentum, tune=False
    )
    meter_ = MomentumMeter(optimizer.param_groups, seed=seed, **meter)

    def on_step(step, history):
        tau = history.staleness[-1] if attribute else 0
        meter_.record(step, step - tau)

    batches = problem.batches(seed)
    simulate(
        model, problem.loss_fn, batches, optimizer, staleness, steps, seed=seed, on_step=on_step
    )
    return meter_.estimate(), meter_


@pytest.mark.parametrize("problem", ["quadratic", "softmax"])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
def test_measures_the_implicit_momentum_of_m_workers(problem, m):
    reading, _ = _measure(problem, workers(m), momentum=0.0)
    assert reading is not None
    assert abs(reading.total - (1.0 - 1.0 / m)) < 0.1, reading
    if m > 1:  # the jackknife error is honest: the miss is a few standard errors at most
        assert 0 < reading.standard_error < 0.1
        assert abs(reading.total - (1.0 - 1.0 / m)) < 5 * reading.standard_error + 0.01
    assert reading.algorithmic == 0.0
    assert reading.total_momentum(AdditiveRule()) == pytest.approx(reading.total)


@pytest.mark.parametrize("problem", ["quadratic", "softmax"])
@pytest.mark.parametrize("momentum", [0.5, 0.9])
def test_reads_the_set_momentum_without_asynchrony(problem, momentum):
    reading, _ = _measure(problem, workers(1), momentum=momentum)
    assert abs(reading.total - momentum) < 0.03, reading
    assert abs(reading.total_momentum() - momentum) < 0.03  # default: additive
    assert abs(reading.implicit) < 0.1  # 1 - kappa_0 / (1 - mu) amplifies noise by 1 / (1 - mu)


def test_splits_algorithmic_and_implicit_momentum_and_composes_them_by_rule():
    reading, _ = _measure("softmax", workers(4), momentum=0.5)
    assert reading.algorithmic == 0.5
    assert abs(reading.implicit - 0.75) < 0.1
    assert abs(reading.total_momentum(AdditiveRule()) - 1.25) < 0.1
    assert reading.total_momentum(CompositionalRule()) == pytest.approx(reading.total)
    assert reading.total_momentum() == reading.total_momentum(AdditiveRule())
    with pytest.raises(ValueError, match="rule object"):
        reading.total_momentum("compositional")
    assert abs(reading.total - (1 - 0.5 * 0.25)) < 0.1


def test_gradients_must_be_attributed_to_the_version_they_were_computed_at():
    # Attributed to the version it was applied at, an update's gradient explains its increment
    # exactly (D = mu D - lr g): the fit sees only the algorithmic momentum, here 0.
    naive, _ = _measure("softmax", workers(8), momentum=0.0, attribute=False)
    assert abs(naive.total) < 0.05
    right, _ = _measure("softmax", workers(8), momentum=0.0)
    assert right.total > 0.75


def test_constant_delay_has_no_immediate_share():
    reading, _ = _measure("quadratic", round_robin(4), momentum=0.0)
    assert reading.total > 0.9  # every gradient lands 3 updates late
    assert int(np.argmax(reading.kernel)) == 3


def test_a_learning_rate_schedule_does_not_distort_the_reading():
    torch.manual_seed(0)
    problem = get_problem("softmax")
    model = problem.make_model(0)
    optimizer = AsyncMomentumSGD(model.parameters(), lr=LR["softmax"], momentum=0.5, tune=False)
    meter = MomentumMeter(optimizer.param_groups)

    def on_step(step, history):
        meter.record(step, step - history.staleness[-1])
        optimizer.param_groups[0]["lr"] = LR["softmax"] * (0.3 if (step // 50) % 2 else 1.0)

    simulate(
        model, problem.loss_fn, problem.batches(0), optimizer, workers(1), STEPS, on_step=on_step
    )
    assert abs(meter.estimate().total - 0.5) < 0.03


def test_publishes_readings_every_refresh_and_not_before_enough_rows():
    reading, meter = _measure("quadratic", workers(2), momentum=0.0, steps=300, refresh=50)
    assert reading is not None
    assert meter.reading is reading
    assert reading.serial >= 2  # refreshed on its own before the final estimate()
    assert meter.measured_total_momentum == pytest.approx(reading.total)
    _, young = _measure("quadratic", workers(2), momentum=0.0, steps=100)
    assert young.reading is None
    assert young.measured_total_momentum is None


def test_samples_a_fixed_bounded_set_of_coordinates():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(n)) for n in (1000, 10, 5000, 3, 200, 7, 80, 4000, 9, 300)]
    meter = MomentumMeter(params, coordinates=256, max_tensors=3, seed=5)
    again = MomentumMeter(params, coordinates=256, max_tensors=3, seed=5)
    assert meter.coordinates == 256
    assert len(meter._tensors) <= 3
    assert all(torch.equal(i, j) for i, j in zip(meter._indices, again._indices, strict=True))
    small = MomentumMeter([nn.Parameter(torch.randn(5))], coordinates=512, window=200)
    assert small.coordinates == 5


def test_state_round_trip_gives_the_same_reading():
    reading, meter = _measure("quadratic", workers(4), momentum=0.0, steps=400)
    # The state holds the sampled values themselves: restoring needs only matching shapes.
    restored = MomentumMeter(
        [nn.Parameter(torch.zeros(20))], coordinates=meter.coordinates, window=meter.window
    )
    restored.load_state_dict(meter.state_dict())
    assert restored.estimate().total == pytest.approx(reading.total)
    with pytest.raises(ValueError, match="same window and coordinates"):
        MomentumMeter([nn.Parameter(torch.zeros(20))], coordinates=7).load_state_dict(
            meter.state_dict()
        )


def test_a_gap_in_versions_restarts_the_meter():
    w = nn.Parameter(torch.zeros(4))
    meter = MomentumMeter([w], window=200, min_rows=20, max_lag=4)
    for version in range(10):
        w.grad = torch.ones(4)
        w.data -= 0.1 * w.grad
        meter.record(version, version)
    meter.record(50, 48)  # another process applied 40 updates: what came before is unusable
    assert meter.gaps == 1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.record(3, 4), "version_read"),
        (lambda m: m.record(-1, 0), "version must be an integer >= 0"),
        (lambda m: m.record(2, 1, lr=float("nan")), "lr"),
    ],
)
def test_record_rejects_bad_input(call, match):
    w = nn.Parameter(torch.zeros(4))
    w.grad = torch.zeros(4)
    with pytest.raises(ValueError, match=match):
        call(MomentumMeter([w]))


def test_construction_rejects_bad_arguments():
    w = nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="window must be an integer >= 178"):
        MomentumMeter([w], window=100)
    with pytest.raises(ValueError, match="coordinates"):
        MomentumMeter([w], coordinates=0)
    with pytest.raises(ValueError, match="at least one parameter"):
        MomentumMeter([])
    with pytest.raises(ValueError, match="rule"):
        MomentumMeter([w], rule="additive")  # a rule object, not a name
    with pytest.raises(ValueError, match="tensors or of param-group dicts"):
        MomentumMeter([w, {"params": [w]}])


def test_sparse_gradients_are_refused_with_a_clear_error():
    embedding = nn.Embedding(10, 3, sparse=True)
    meter = MomentumMeter(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        meter.record(0, 0)


# -- closed loop ----------------------------------------------------------------------------------


def test_controller_is_bounded_rate_limited_and_ignores_repeated_readings():
    controller = ClosedLoopController(gain=0.5, max_change_per_step=0.05, bounds=(-0.5, 0.95))
    assert controller.update(0.9, 0.5, 0.3, reading_id=1) == pytest.approx(0.35)  # rate limit
    assert controller.update(0.9, 0.5, 0.35, reading_id=1) == 0.35  # same reading: no change
    assert controller.update(0.9, 0.88, 0.35, reading_id=2) == pytest.approx(0.36)  # half error
    assert controller.update(0.9, None, 0.36) == 0.36
    assert controller.updates == 2
    assert controller.update(0.9, math.nan, 0.36) == 0.36
    assert controller.update(-0.9, 0.9, -0.48) == -0.5  # the floor
    # Rebased to the current momentum: the reading was taken at 0.1, the momentum is now 0.3.
    assert controller.update(0.9, 0.85, 0.3, measured_algorithmic=0.1) == pytest.approx(0.25)
    state = controller.state_dict()
    restored = ClosedLoopController()
    restored.load_state_dict(state)
    assert restored.updates == controller.updates
    assert restored.last_error == controller.last_error
    with pytest.raises(ValueError, match="gain"):
        ClosedLoopController(gain=0.0)
    with pytest.raises(ValueError, match="current_alg"):
        controller.update(0.9, 0.5, 1.2)


def test_closed_loop_drives_the_measured_total_to_the_target():
    torch.manual_seed(0)
    problem = get_problem("softmax")
    model = problem.make_model(0)
    optimizer = AsyncMomentumSGD(model.parameters(), lr=LR["softmax"], momentum=0.9, tune=False)
    meter = MomentumMeter(optimizer.param_groups, refresh=64)
    controller = ClosedLoopController(gain=0.5, max_change_per_step=0.1)
    group = optimizer.param_groups[0]

    def on_step(step, history):
        meter.record(step, step - history.staleness[-1])
        reading = meter.reading
        if reading is not None:
            group["momentum"] = controller.update(
                0.9,
                reading.total_momentum(AdditiveRule()),
                group["momentum"],
                measured_algorithmic=reading.algorithmic,
                reading_id=reading.serial,
            )

    simulate(
        model, problem.loss_fn, problem.batches(0), optimizer, workers(4), 1600, on_step=on_step
    )
    # Additive composition: the loop settles where momentum + measured implicit = 0.9, i.e.
    # near the additive rule's 0.9 - 0.75, from a start at 0.9 (total 1.65).
    assert controller.updates >= 10
    assert abs(group["momentum"] - 0.15) < 0.1
    assert abs(meter.estimate().total_momentum(AdditiveRule()) - 0.9) < 0.1


def test_bad_states_are_refused_and_change_nothing():
    _, meter = _measure("quadratic", workers(2), momentum=0.0, steps=300)
    before = meter.estimate().total
    with pytest.raises(ValueError, match="missing"):
        meter.load_state_dict({"format": 1, "params_ring": meter.state_dict()["params_ring"]})
    with pytest.raises(ValueError, match="expects a dict"):
        meter.load_state_dict([1, 2])
    assert meter.estimate().total == before
    with pytest.raises(ValueError, match="missing"):
        ClosedLoopController().load_state_dict({"format": 1})


def test_measuring_in_spans_reads_the_same_momentum_at_a_fraction_of_the_records():
    _, meter = _measure("softmax", workers(4), 0.0, steps=1300, window=300, period=600)
    assert meter.gaps == 0  # a new span is not a gap
    assert meter._records == 300 + 300 + 100  # spans [0, 300), [600, 900), [1200, 1300)
    reading = meter.reading  # fitted when the span [600, 900) ended
    assert reading is not None
    assert reading.serial >= 2
    assert abs(reading.total - 0.75) < 0.1
    with pytest.raises(ValueError, match="period"):
        MomentumMeter(meter._tensors, window=300, period=300)
