"""The feedback rules wired in: rule="closed_loop" and rule="stability" in tuner and optimizer."""

from __future__ import annotations

import math
import pickle
import warnings

import pytest
import torch
from conftest import make_reading

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.applications.problems import get_problem
from asyncmomentum.core import formulas
from asyncmomentum.core.tracker import AsynchronyTracker
from asyncmomentum.core.tuning import rules
from asyncmomentum.core.tuning.delayed_heavy_ball import largest_stable_momentum
from asyncmomentum.runtimes import simulate as sim

# -- tuning: the names -----------------------------------------------------------------------------


def test_feedback_rules_are_rules_but_not_formulas():
    for rule in ("closed_loop", "stability"):
        assert rule in rules.rule_names()
        assert rules.rule_class(rule).stateful
        with pytest.raises(ValueError, match="keeps state"):
            rules.algorithmic_momentum(0.9, 0.5, rule)
        # They report totals in the additive composition, their fallback.
        assert rules.total_momentum(0.1, 0.5, rule) == formulas.additive_total(0.1, 0.5)
    with pytest.raises(ValueError, match="rule must be one of"):
        rules.make_rule("stabilty")


# -- the tuner -------------------------------------------------------------------------------------


def test_closed_loop_integrates_each_reading_once_bounded_and_rate_limited():
    tuner = AsynchronyTracker(
        rule="closed_loop", workers=4, rule_options={"gain": 0.5, "max_change_per_step": 0.05}
    )
    additive = rules.algorithmic_momentum(0.9, 0.75)
    assert tuner.algorithmic_momentum(0.9) == pytest.approx(additive)  # no reading yet
    # Measured total 0.7 with the momentum applied: error 0.2, gain 0.5 -> 0.1, capped at 0.05.
    tuner.observe_reading(make_reading(0.7, additive, serial=1))
    first = tuner.algorithmic_momentum(0.9)
    assert first == pytest.approx(additive + 0.05)
    assert tuner.algorithmic_momentum(0.9) == pytest.approx(first)  # the same reading: no change
    # A new reading, still measured under the old momentum: rebased to the current one, the
    # error is 0.15 (not 0.2) and the step is capped again.
    tuner.observe_reading(make_reading(0.7, additive, serial=2))
    assert tuner.algorithmic_momentum(0.9) == pytest.approx(additive + 0.10)
    # Small error: gain 0.5 of it.
    tuner.observe_reading(make_reading(0.88, additive + 0.10, serial=3))
    assert tuner.algorithmic_momentum(0.9) == pytest.approx(additive + 0.11)


def test_closed_loop_keeps_its_correction_when_the_estimate_of_m_moves():
    tuner = AsynchronyTracker(rule="closed_loop", warmup=0, horizon=10)
    for _ in range(200):
        tuner.observe(3)  # M = 4
    base = tuner.algorithmic_momentum(0.9)
    tuner.observe_reading(make_reading(0.8, base, serial=1))
    corrected = tuner.algorithmic_momentum(0.9)
    assert corrected > base
    for _ in range(200):
        tuner.observe(1)  # M = 2: the additive part moves at once, the correction stays
    moved = rules.algorithmic_momentum(0.9, tuner.implicit_momentum)
    assert tuner.algorithmic_momentum(0.9) == pytest.approx(moved + (corrected - base), abs=1e-9)


def test_closed_loop_has_one_integrator_per_target():
    tuner = AsynchronyTracker(rule="closed_loop", workers=2)
    tuner.observe_reading(make_reading(0.6, 0.4, serial=1))
    high = tuner.algorithmic_momentum(0.9)
    low = tuner.algorithmic_momentum(0.5)
    # The measured implicit momentum is 0.2, not the 0.5 of M = 2: both groups' totals are 0.3
    # short of their targets, and each group's own integrator corrects its own momentum.
    assert high == pytest.approx(0.4 + 0.05)
    assert low == pytest.approx(0.0 + 0.05)
    assert tuner.algorithmic_momentum(0.9) == pytest.approx(high)  # integrated once each


def test_stability_rule_falls_back_to_additive_until_it_has_a_curvature():
    tuner = AsynchronyTracker(rule="stability", warmup=0)
    for _ in range(100):
        tuner.observe(7)
    assert tuner.curvature is None
    assert tuner.algorithmic_momentum(0.9, lr=0.25) == pytest.approx(
        rules.algorithmic_momentum(0.9, tuner.implicit_momentum)
    )
    with pytest.raises(ValueError, match="needs the learning rate"):
        tuner.algorithmic_momentum(0.9)
    tuner.observe_curvature(1.0)
    expected = largest_stable_momentum(0.25, [0] * 7 + [1], cap=0.9, curvature_margin=0.25)
    assert tuner.algorithmic_momentum(0.9, lr=0.25) == pytest.approx(expected, abs=1e-9)
    assert not math.isclose(expected, tuner.algorithmic_momentum(0.9, lr=0.25) - 1.0)


def test_tuner_options_are_checked():
    with pytest.raises(ValueError, match="takes none"):
        AsynchronyTracker(rule="additive", rule_options={"gain": 0.5})
    with pytest.raises(ValueError, match="rule_options for 'stability'"):
        AsynchronyTracker(rule="stability", rule_options={"gain": 0.5})
    with pytest.raises(ValueError, match="rule_options for 'closed_loop'"):
        AsynchronyTracker(rule="closed_loop", rule_options={"curvature_margin": 0.5})
    with pytest.raises(ValueError, match=r"gain must be a number in \(0, 1\]"):
        AsynchronyTracker(rule="closed_loop", rule_options={"gain": 2.0})
    with pytest.raises(ValueError, match="momentum_bounds apply"):
        AsynchronyTracker(rule="stability", rule_options={"momentum_bounds": (0.0, 0.5)})
    with pytest.raises(ValueError, match="uses a curvature"):
        AsynchronyTracker(rule="additive").observe_curvature(1.0)


def test_tuner_state_round_trips_and_a_corrupt_one_changes_nothing():
    tuner = AsynchronyTracker(rule="closed_loop", workers=4)
    tuner.observe_reading(make_reading(0.7, 0.15, serial=1))
    momentum = tuner.algorithmic_momentum(0.9)
    state = tuner.state_dict()
    resumed = AsynchronyTracker(rule="closed_loop", workers=4)
    resumed.load_state_dict(state)
    assert resumed.algorithmic_momentum(0.9) == pytest.approx(momentum)
    corrupt = {**state, "closed_loop": [{"target": 0.9, "offset": math.nan, "controller": {}}]}
    with pytest.raises(ValueError, match="corrupt"):
        resumed.load_state_dict(corrupt)
    assert resumed.algorithmic_momentum(0.9) == pytest.approx(momentum)

    stable = AsynchronyTracker(rule="stability", warmup=0)
    for _ in range(50):
        stable.observe(3)
    stable.observe_curvature(2.0)
    again = AsynchronyTracker(rule="stability", warmup=0)
    again.load_state_dict(stable.state_dict())
    assert again.curvature == 2.0
    assert again.algorithmic_momentum(0.9, lr=0.1) == stable.algorithmic_momentum(0.9, lr=0.1)
    # A state written under another rule restarts the feedback rule from scratch.
    again.load_state_dict(AsynchronyTracker().state_dict())
    assert again.curvature is None


# -- the optimizer: stability ----------------------------------------------------------------------


class CountingProbe:
    """A picklable probe on the quadratic that counts its calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.calls = 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.model.objective()


def _quadratic(lr: float = 0.25, *, probe: bool = False, **options):
    problem = get_problem("quadratic")
    model = problem.make_model(0)
    counting = CountingProbe(model)
    if probe:
        options["curvature_probe"] = counting
    opt = AsyncMomentumSGD(model.parameters(), lr=lr, momentum=0.9, **options)
    return problem, model, counting, opt


def _step(problem, model, opt, batch, staleness):
    opt.zero_grad()
    problem.loss_fn(model, batch).backward()
    opt.step(staleness=staleness)


def test_stability_probes_every_curvature_every_updates_and_applies_the_stable_momentum():
    problem, model, probe, opt = _quadratic(rule="stability", probe=True, curvature_every=25)
    batches = problem.batches(0)
    for _ in range(100):
        _step(problem, model, opt, next(batches), staleness=7)
    assert probe.calls == 4  # before updates 0, 25, 50 and 75
    # The quadratic's largest curvature is 1 (its Hessian is diagonal with max 1).
    assert opt.curvature == pytest.approx(1.0, rel=5e-3)
    expected = largest_stable_momentum(
        0.25 * opt.curvature, [0] * 7 + [1], cap=0.9, curvature_margin=0.25
    )
    # To the rule's resolution: its cache holds lr * lambda_max to 1 %, the bisection to 1e-3.
    assert opt.algorithmic_momentum == pytest.approx(expected, abs=3e-3)
    additive = rules.algorithmic_momentum(0.9, opt.implicit_momentum)
    assert abs(expected - additive) > 0.05  # a constant delay is harsher than its mean says


def test_the_curvature_probe_leaves_parameters_and_gradients_alone():
    problem, model, probe, opt = _quadratic(rule="stability")
    problem.loss_fn(model, next(problem.batches(0))).backward()
    params, grads = model.w.detach().clone(), model.w.grad.clone()
    value = opt.estimate_curvature(probe)
    assert value == pytest.approx(1.0, rel=5e-3)
    assert torch.equal(model.w, params)
    assert torch.equal(model.w.grad, grads)
    assert opt.tracker.clock.value == 0


def test_a_failing_probe_refuses_the_step_and_changes_nothing():
    problem, model, _, opt = _quadratic(rule="stability", curvature_probe=lambda: torch.tensor(1.0))
    problem.loss_fn(model, next(problem.batches(0))).backward()
    before = model.w.detach().clone()
    with pytest.raises(ValueError, match="depends on the parameters"):
        opt.step()
    assert torch.equal(model.w, before)
    assert opt.tracker.clock.value == 0
    assert opt.state[model.w] == {}


def test_stability_without_a_probe_warns_once_and_follows_the_additive_rule():
    problem, model, _, opt = _quadratic(rule="stability")
    batches = problem.batches(0)
    with pytest.warns(UserWarning, match="no curvature_probe"):
        _step(problem, model, opt, next(batches), staleness=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(problem, model, opt, next(batches), staleness=3)
    assert opt.algorithmic_momentum == rules.algorithmic_momentum(0.9, opt.implicit_momentum)


def test_curvature_arguments_are_checked():
    model = get_problem("quadratic").make_model(0)
    with pytest.raises(ValueError, match="rule='stability' only"):
        AsyncMomentumSGD(model.parameters(), lr=0.1, curvature_probe=model.objective)
    with pytest.raises(ValueError, match="curvature_every"):
        AsyncMomentumSGD(model.parameters(), lr=0.1, rule="stability", curvature_every=0)
    with pytest.raises(ValueError, match="curvature_probe must be a callable"):
        AsyncMomentumSGD(model.parameters(), lr=0.1, rule="stability", curvature_probe=3)
    with pytest.raises(ValueError, match="feeds rule='stability'"):
        AsyncMomentumSGD(model.parameters(), lr=0.1).estimate_curvature(model.objective)
    with pytest.raises(ValueError, match="needs a loss_fn"):
        AsyncMomentumSGD(model.parameters(), lr=0.1, rule="stability").estimate_curvature()
    with pytest.raises(ValueError, match="meter_options need"):
        AsyncMomentumSGD(model.parameters(), lr=0.1, meter_options={"refresh": 8})


def test_stability_state_survives_state_dict_and_pickle():
    problem, model, _, opt = _quadratic(rule="stability", probe=True, curvature_every=10)
    batches = problem.batches(0)
    for _ in range(30):
        _step(problem, model, opt, next(batches), staleness=5)
    state = opt.state_dict()

    _, model2, probe2, resumed = _quadratic(rule="stability", probe=True, curvature_every=10)
    resumed.load_state_dict(state)
    assert resumed.curvature == opt.curvature
    assert resumed.algorithmic_momentum == pytest.approx(opt.algorithmic_momentum, abs=3e-3)
    # The schedule continues: the next probe is at update 30, not at once.
    model2.w.data.copy_(model.w.detach())
    for _ in range(9):
        _step(problem, model2, resumed, next(batches), staleness=5)
    assert probe2.calls == 1  # at update 30

    plain = AsyncMomentumSGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, rule="stability")
    copy = pickle.loads(pickle.dumps(plain))
    assert copy.rule.name == "stability"
    assert copy.curvature is None


# -- the optimizer: closed loop --------------------------------------------------------------------


def test_closed_loop_corrects_a_wrong_model_of_the_asynchrony():
    # The tuner is told M = 8 (implicit 0.875) but the run has 2 workers (an exponential queue,
    # implicit 0.5; the meter's model of asynchrony, see docs/momentum-meter.md): the additive rule
    # applies 0.025 and the total is far below the target; the loop must find the momentum.
    def run(rule: str) -> AsyncMomentumSGD:
        problem = get_problem("quadratic")
        model = problem.make_model(0)
        options = {"meter_options": {"refresh": 64}} if rule == "closed_loop" else {}
        opt = AsyncMomentumSGD(
            model.parameters(), lr=0.125, momentum=0.9, rule=rule, workers=8, **options
        )
        if rule == "additive":
            opt = AsyncMomentumSGD(
                model.parameters(), lr=0.125, momentum=0.9, workers=8, measure_momentum=True
            )
        sim.simulate(model, problem.loss_fn, problem.batches(0), opt, sim.workers(2), 2500, seed=0)
        return opt

    additive, closed = run("additive"), run("closed_loop")
    assert additive.algorithmic_momentum == pytest.approx(0.025)
    assert additive.measured_total_momentum < 0.7  # what the open loop gets
    assert closed.meter is not None
    assert closed.meter.reading.serial > 10
    assert closed.algorithmic_momentum > 0.25
    assert closed.measured_total_momentum == pytest.approx(0.9, abs=0.1)


def test_feedback_rules_are_refused_where_they_cannot_work():
    from asyncmomentum.runtimes.hogwild import train_hogwild
    from lightning_callbacks import AsyncMomentumCallback

    model = torch.nn.Linear(2, 1)
    for options in ({"rule": "closed_loop"}, {"rule": "stability"}, {"measure_momentum": True}):
        opt = AsyncMomentumSGD(model.parameters(), lr=0.1, **options)
        with pytest.raises(ValueError, match="cannot run in Hogwild workers"):
            train_hogwild(model, opt, lambda m, b: m(b[0]).sum(), (torch.zeros(4, 2),), workers=2)
    with pytest.raises(ValueError, match="configure_optimizers"):
        AsyncMomentumCallback(rule="stability")


@pytest.mark.parametrize("options", [{"rule": "stability"}, {"rule": "closed_loop"}])
def test_checkpoints_load_with_torch_load_weights_only(tmp_path, options):
    # torch.load defaults to weights_only=True, which refuses numpy arrays in a checkpoint.
    problem, model, _, opt = _quadratic(probe=options["rule"] == "stability", **options)
    batches = problem.batches(0)
    for _ in range(300):  # past the meter's first reading (about 180 updates)
        _step(problem, model, opt, next(batches), staleness=2)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    _, _, _, resumed = _quadratic(probe=options["rule"] == "stability", **options)
    resumed.load_state_dict(state)
    assert resumed.algorithmic_momentum == pytest.approx(opt.algorithmic_momentum, abs=3e-3)
    if options["rule"] == "closed_loop":
        assert resumed.measured_total_momentum is not None
    else:
        assert resumed.tracker.rule.histogram.count == 300
