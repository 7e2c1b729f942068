"""The auto rule: the stability bound at an effective curvature raised by detected instabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_cnn

from asyncmomentum.applications.sweep.runs import RunResult, RunSpec, run_one
from asyncmomentum.core import formulas
from asyncmomentum.core.measuring.instability import GrowthDetector, squared_norm, sum_on_host
from asyncmomentum.core.optimizer import AsyncMomentumSGD
from asyncmomentum.core.tuning.delayed_heavy_ball import largest_stable_momentum
from asyncmomentum.core.tuning.rules import AutoRule, make_rule
from asyncmomentum.runtimes.hogwild import classification_loss, train_hogwild

# -- the detector ---------------------------------------------------------------------------------


def test_a_flat_or_falling_signal_is_never_an_instability():
    detector = GrowthDetector(threshold=4.0)
    rng = np.random.default_rng(0)
    for step in range(2000):
        # Falling, then noisy around a floor (a chi-square-like spread of a squared norm).
        level = max(100.0 * 0.99**step, 1.0)
        assert not detector.observe(level * float(rng.uniform(0.7, 1.3)))
    assert detector.detections == 0
    assert detector.count == 2000


def test_a_geometric_growth_is_reported_once_per_factor_of_threshold():
    detector = GrowthDetector(threshold=4.0, smoothing=0.0, forgetting=0.0)
    reports = [detector.observe(1.1**step) for step in range(80)]
    # 1.1^k passes 4x the last reference every ~14.5 steps: 80 steps give 5 reports.
    assert sum(reports) == 5 == detector.detections
    assert reports.index(True) == math.ceil(math.log(4.0) / math.log(1.1)) + 0


def test_the_reference_forgets_so_a_drift_slower_than_forgetting_is_no_instability():
    # A signal that creeps up by 0.5 % per observation: 100x over 1000 observations.
    drifting = GrowthDetector(threshold=4.0, smoothing=0.0, forgetting=0.01)
    assert not any(drifting.observe(1.005**step) for step in range(1000))
    # Without forgetting, the same drift is reported every factor of 4.
    strict = GrowthDetector(threshold=4.0, smoothing=0.0, forgetting=0.0)
    assert sum(strict.observe(1.005**step) for step in range(1000)) == 3


def test_non_finite_or_negative_observations_are_ignored():
    detector = GrowthDetector()
    detector.observe(1.0)
    for bad in (math.nan, math.inf, -1.0):
        assert not detector.observe(bad)
    assert detector.count == 1


def test_squared_norm_is_the_sum_of_squares_of_all_tensors():
    tensors = [torch.tensor([3.0, 4.0]), torch.ones(2, 2)]
    assert squared_norm(tensors) == pytest.approx(25.0 + 4.0)
    assert squared_norm([]) == 0.0
    # A fixed sample: the first entries of each tensor.
    assert squared_norm([torch.full((10,), 2.0), torch.ones(3, 3)], per_tensor=4) == 16.0 + 4.0


def test_sum_on_host_adds_scalars_of_every_dtype_at_least_as_precisely_as_each_alone():
    assert sum_on_host([]) == 0.0
    # 2049 is not a float16: summed alone in float16 it would round to 2048.
    values = [torch.tensor(2048.0, dtype=torch.float16), torch.tensor(1.0, dtype=torch.float16)]
    values += [torch.tensor(0.25), torch.tensor(1e-3, dtype=torch.float64)]
    assert sum_on_host(values) == pytest.approx(2049.251, rel=1e-12)
    assert sum_on_host(iter([torch.tensor(1.5), torch.tensor(2.0)])) == 3.5


def test_read_is_the_properties_in_one():
    detector = GrowthDetector(threshold=2.0)
    assert detector.read() == (0.0, 0.0, 0, 0)
    for value in (1.0, 1.0, 30.0, 30.0):
        detector.observe(value)
    read = detector.read()
    assert read == (detector.average, detector.reference, detector.count, detector.detections)
    assert read[2:] == (4, 1)


def test_detector_state_round_trips_and_a_corrupt_one_changes_nothing():
    detector = GrowthDetector()
    for value in (5.0, 1.0, 30.0):
        detector.observe(value)
    state = detector.state_dict()
    copy = GrowthDetector()
    copy.load_state_dict(state)
    assert copy.state_dict() == state
    for broken in ({**state, "format": 9}, {**state, "state": [1.0, 2.0]}, {"format": 1}):
        with pytest.raises(ValueError, match="GrowthDetector"):
            copy.load_state_dict(broken)
    assert copy.state_dict() == state


def test_a_dismissed_growth_is_not_counted_but_moves_the_reference():
    detector = GrowthDetector(threshold=4.0, smoothing=0.0)
    detector.observe(1.0)
    assert detector.reference == 1.0
    assert detector.observe(5.0)
    detector.dismiss()
    assert detector.detections == 0
    assert detector.reference == 5.0  # the same climb is not reported again ...
    assert not detector.observe(6.0)
    assert detector.observe(21.0)  # ... until it grows by the threshold again
    assert detector.detections == 1
    fresh = GrowthDetector()
    fresh.dismiss()  # nothing to take back
    assert fresh.detections == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threshold": 1.0}, "threshold"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"forgetting": -0.1}, "forgetting"),
    ],
)
def test_bad_detector_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        GrowthDetector(**options)


# -- the rule -------------------------------------------------------------------------------------


def test_before_any_staleness_the_rule_is_the_additive_rule():
    rule = AutoRule()
    assert rule.algorithmic_momentum(0.9, 0.5) == formulas.clip_momentum(
        formulas.additive_momentum(0.9, 0.5), formulas.DEFAULT_MOMENTUM_BOUNDS
    )


def test_without_delays_it_is_the_target_whatever_the_ladder_says():
    rule = AutoRule(max_curvature=8.0)
    value = 1.0
    for _ in range(100):
        rule.observe(0)
        value *= 1.5
        rule.observe_gradient_norm(value)
    assert rule.effective_a > 2 * (1 + 0.9)  # the bound would refuse 0.9 here
    assert rule.synchronous
    assert rule.algorithmic_momentum(0.9, 0.0) == 0.9
    fresh = AutoRule()
    fresh.observe(0)
    assert fresh.algorithmic_momentum(0.9, 0.0) == 0.9
    fresh.observe(7)  # one delay in the window: the bound speaks
    assert not fresh.synchronous
    assert fresh.algorithmic_momentum(0.9, 0.0) < 0.9


def test_the_momentum_is_the_stability_bound_at_the_effective_curvature_above_the_additive():
    rule = AutoRule(effective_curvature=0.3)
    for _ in range(50):
        rule.observe(3)  # a constant delay of 3: round robin over 4 workers
    expected = largest_stable_momentum(0.3, [0, 0, 0, 1.0], cap=0.9)
    # Where the bound allows more than the additive rule, the bound.
    assert expected > 0.9 - 0.75
    assert rule.algorithmic_momentum(0.9, 0.75) == pytest.approx(expected, abs=2e-3)
    # Where it allows less (a sharper effective curvature), the additive rule is the floor.
    sharp = AutoRule(effective_curvature=1.0)
    for _ in range(50):
        sharp.observe(3)
    assert largest_stable_momentum(1.0, [0, 0, 0, 1.0], cap=0.9) < 0.9 - 0.75
    assert sharp.algorithmic_momentum(0.9, 0.75) == pytest.approx(0.9 - 0.75)
    assert sharp.floor_active


def _feed(rule: AutoRule, values, tau: int = 7, implicit: float = 0.875) -> list[float]:
    """One update per value: a staleness, the momentum asked for, then the gradient norm."""
    momenta = []
    for value in values:
        rule.observe(tau)
        momenta.append(rule.algorithmic_momentum(0.9, implicit))
        rule.observe_gradient_norm(float(value))
    return momenta


def test_on_a_noisy_but_stable_gradient_norm_it_never_falls_below_the_additive_rule():
    # Log-normal noise around a falling level (a minibatch gradient): spikes 4x and more over
    # quiet troughs, which the growth detector takes for instabilities. (With a log-normal
    # spread of 1 instead of 0.5 the floor can be released: see docs/auto-rule.md, limits.)
    rng = np.random.default_rng(19)
    values = [max(5.0 * 0.99**step, 0.2) * rng.lognormal(0.0, 0.5) for step in range(2000)]
    rule = AutoRule(effective_curvature=1.0)  # the bound alone would sit under the additive
    momenta = _feed(rule, values)
    assert rule.detector.detections >= 2  # the noise fools the detector ...
    additive = 0.9 - 0.875
    assert min(momenta[1:]) >= additive - 1e-12  # ... but never below the additive rule
    assert rule.floor_active


def test_with_a_release_level_a_growing_gradient_norm_releases_the_floor():
    rule = AutoRule(effective_curvature=1.0, release_level=0.5)
    calm = _feed(rule, [1.0] * 30)
    assert calm[-1] == pytest.approx(0.9 - 0.875)  # the floor binds
    growing = _feed(rule, [1.2**k for k in range(1, 40)])
    assert not rule.floor_active
    assert growing[-1] < 0.9 - 0.875 - 0.1  # the bound, far under the additive rule
    # Released for the run (until reset).
    assert _feed(rule, [1.0] * 50)[-1] < 0.9 - 0.875
    rule.reset()
    assert rule.floor_active
    # By default the floor holds whatever the gradient norm does.
    default = AutoRule(effective_curvature=1.0)
    _feed(default, [1.0] * 30)
    held = _feed(default, [1.2**k for k in range(1, 40)])
    assert default.floor_active
    assert min(held) == pytest.approx(0.9 - 0.875)


def test_during_the_optimizers_warm_up_the_floor_reads_the_delays_itself():
    # The optimizer's estimate says M = 1 (implicit 0) for its first updates; 31 workers'
    # delays are already in the histogram: the floor is the additive rule at M = 32, not 0.9.
    rule = AutoRule(effective_curvature=1.0)
    for _ in range(10):
        rule.observe(31)
    assert rule.algorithmic_momentum(0.9, 0.0) == pytest.approx(0.9 - (1 - 1 / 32), abs=1e-9)


def test_quiet_observations_walk_down_the_ladder_and_growth_backs_off():
    rule = AutoRule(effective_curvature=0.3, min_curvature=0.1, patience=5, backoff=2)
    for _ in range(20):
        rule.observe(1)
    start = rule.algorithmic_momentum(0.9, 0.5)
    for _ in range(5):
        rule.observe_gradient_norm(1.0)
    assert rule.level == -1
    assert rule.effective_a == pytest.approx(0.3 / math.sqrt(2))
    assert rule.algorithmic_momentum(0.9, 0.5) > start  # less curvature: more momentum
    for _ in range(100):
        rule.observe_gradient_norm(1.0)
    lowest = rule.level
    assert rule.effective_a >= 0.1 > rule.effective_a / math.sqrt(2)  # stops at min_curvature
    value = 1.0
    while rule.detector.detections == 0:  # an instability: the norm grows
        value *= 1.5
        rule.observe_gradient_norm(value)
    assert rule.level == lowest + 2
    # After an instability the rule waits twice as long before it probes again.
    for _ in range(5):
        rule.observe_gradient_norm(value)
    assert rule.level == lowest + 2
    for _ in range(5):
        rule.observe_gradient_norm(value)
    assert rule.level == lowest + 1


def test_for_its_warm_up_the_ladder_stays_on_its_first_rung():
    rule = AutoRule(patience=5, warmup=30)
    for _ in range(30):
        rule.observe_gradient_norm(1.0)
    assert rule.level == 0
    for _ in range(5):
        rule.observe_gradient_norm(1.0)
    assert rule.level == -1


def _spiky(spike_every: int, updates: int) -> list[float]:
    """A steady squared norm with one batch in ``spike_every`` 30x the others (a short batch)."""
    return [30.0 if step % spike_every == spike_every - 1 else 1.0 for step in range(updates)]


def test_one_batchs_spike_is_not_a_growth_but_a_growing_mode_is():
    filtered, unfiltered = AutoRule(spike_window=2, forgive_after=0), AutoRule(spike_clip=None)
    for value in _spiky(43, 430):
        filtered.observe_gradient_norm(value)
        unfiltered.observe_gradient_norm(value)
    assert unfiltered.detector.detections >= 9  # each epoch's short batch, read as a growth
    assert filtered.detector.detections == 0
    assert filtered.level < unfiltered.level
    # A mode that grows raises every norm: seen one update later than without the filter.
    seen = {}
    for name, window in (("filtered", 2), ("unfiltered", 1)):
        rule = AutoRule(spike_window=window, forgive_after=0)
        for _ in range(20):
            rule.observe_gradient_norm(1.0)
        before = rule.detector.detections
        for step in range(1, 40):
            rule.observe_gradient_norm(1.3**step)
            if rule.detector.detections > before:
                seen[name] = step
                break
    assert seen["filtered"] - seen["unfiltered"] in (0, 1)


def test_the_norm_of_a_short_batch_is_not_read_but_a_full_batchs_spike_is():
    # Without the clip of outliers, which would hide most of the spikes from the 100th norm on.
    told, untold = AutoRule(spike_clip=None), AutoRule(spike_clip=None)
    every = AutoRule(short_batch=0.0, spike_clip=None)
    for value in _spiky(43, 430):
        size = 4 if value > 1.0 else 32  # the spikes are the epochs' short last batches
        for rule in (told, every):
            rule.observe_batch_size(size)
        for rule in (told, untold, every):
            rule.observe_gradient_norm(value)
    assert told.detector.detections == 0
    assert told.detector.count == 430 - 10  # the ten short batches' norms were not read
    assert untold.detector.detections >= 9  # without batch sizes: as revision 4
    assert every.detector.detections == untold.detector.detections  # short_batch=0: every norm
    assert told.level < untold.level
    assert told.state_dict()["ladder"][-1] == 32.0  # the largest batch, kept with the ladder
    # A spike in a full batch is read: the same 30x norm after a batch of 32 is a growth.
    rule = AutoRule()
    for _ in range(20):
        rule.observe_batch_size(32)
        rule.observe_gradient_norm(1.0)
    rule.observe_batch_size(32)
    rule.observe_gradient_norm(30.0)
    assert rule.detector.detections == 1
    # The skip lasts one norm: the batch after a short one is read again.
    rule.observe_batch_size(4)
    rule.observe_gradient_norm(1.0)
    count = rule.detector.count
    rule.observe_gradient_norm(1.0)
    assert rule.detector.count == count + 1


def _growth_with_loss(rule: AutoRule, loss_factor: float, updates: int = 60) -> None:
    """The gradient norm grows 10 % per update; the loss changes by ``loss_factor`` per update."""
    loss = 2.0
    for step in range(updates):
        rule.observe_loss(loss)
        rule.observe_gradient_norm(1.1**step)
        loss *= loss_factor


def test_a_growth_while_the_loss_falls_is_learning_not_an_instability():
    learning = AutoRule(forgive_after=0)
    _growth_with_loss(learning, 0.97)  # the loss falls 3 % per update: a plateau left behind
    assert learning.detector.detections == 0
    assert learning.level < 0  # the ladder walked on
    flat = AutoRule(forgive_after=0)
    _growth_with_loss(flat, 1.0)  # the same climb with a flat loss is an instability
    assert flat.detector.detections >= 2
    assert flat.level > learning.level
    # Without that check (or without a loss) every growth counts.
    unchecked = AutoRule(loss_fall=None, forgive_after=0)
    _growth_with_loss(unchecked, 0.97)
    assert unchecked.detector.detections == flat.detector.detections


def _quiet(rule: AutoRule, updates: int) -> None:
    for _ in range(updates):
        rule.observe_loss(2.0)
        rule.observe_gradient_norm(1.0)


def test_growths_are_forgiven_only_after_forgive_after_norms():
    # The default (loss_fall 0.1 from the 100th norm): at the start of a run a climb counts
    # even while the loss falls, as a run at its stable edge blows up within tens of updates.
    early = AutoRule()
    _growth_with_loss(early, 0.97)
    assert early.detector.detections >= 2
    # The same climb after 100 quiet norms is a network learning.
    late = AutoRule()
    _quiet(late, 100)
    _growth_with_loss(late, 0.97)
    assert late.detector.detections == 0
    # ... and a flat loss still makes it an instability.
    flat = AutoRule()
    _quiet(flat, 100)
    _growth_with_loss(flat, 1.0)
    assert flat.detector.detections >= 2
    # The spike filter waits as long: one batch's spike counts early, not later.
    spiky = AutoRule(spike_window=2, forgive_after=50)
    for value in [1.0] * 20 + [30.0] + [1.0] * 29:
        spiky.observe_gradient_norm(value)
    assert spiky.detector.detections == 1
    for value in [1.0] * 20 + [30.0] + [1.0] * 29:
        spiky.observe_gradient_norm(value)
    assert spiky.detector.detections == 1


def test_from_forgive_after_one_batchs_outlier_is_clipped_but_a_growing_mode_is_read_whole():
    # Early, a 30x batch counts as a growth: a run at its edge blows up within tens of updates.
    early = AutoRule()
    _quiet(early, 20)
    early.observe_gradient_norm(30.0)
    assert early.detector.detections == 1
    # After 100 norms it is read as 3x the average, and the flat loss does not forgive it: with
    # the clip it is no growth, without it one.
    clipped, unclipped = AutoRule(), AutoRule(spike_clip=None)
    for rule in (clipped, unclipped):
        _quiet(rule, 100)
        rule.observe_loss(2.0)
        rule.observe_gradient_norm(30.0)
        _quiet(rule, 20)
    assert clipped.detector.detections == 0
    assert unclipped.detector.detections == 1
    assert clipped.level < unclipped.level
    # A mode that grows 1.3x per update is seen on the same update with or without the clip.
    seen = {}
    for name, clip in (("clipped", 3.0), ("unclipped", None)):
        rule = AutoRule(spike_clip=clip)
        _quiet(rule, 100)
        for step in range(1, 40):
            rule.observe_loss(2.0)
            rule.observe_gradient_norm(1.3**step)
            if rule.detector.detections:
                seen[name] = step
                break
    assert seen["clipped"] == seen["unclipped"]


def test_the_ladder_stops_at_max_curvature():
    rule = AutoRule(effective_curvature=0.3, max_curvature=0.5, backoff=2)
    value = 1.0
    for _ in range(200):
        value *= 1.5
        rule.observe_gradient_norm(value)
    assert rule.detector.detections > 2
    assert rule.effective_a <= 0.5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"effective_curvature": 0.0}, "effective_curvature"),
        ({"min_curvature": 0.7}, "min_curvature"),
        ({"max_curvature": 0.1}, "max_curvature"),
        ({"step_ratio": 1.0}, "step_ratio"),
        ({"patience": 0}, "patience"),
        ({"backoff": 0}, "backoff"),
        ({"threshold": 0.5}, "threshold"),
        ({"loss_rise": 1.0}, "loss_rise"),
        ({"floor_step": 0.0}, "floor_step"),
        ({"spike_window": 0}, "spike_window"),
        ({"loss_fall": 1.0}, "loss_fall"),
        ({"forgive_after": -1}, "forgive_after"),
        ({"spike_clip": 1.0}, "spike_clip"),
        ({"spike_clip": float("nan")}, "spike_clip"),
        ({"warmup": -1}, "warmup"),
        ({"short_batch": 1.5}, "short_batch"),
        ({"short_batch": -0.1}, "short_batch"),
    ],
)
def test_bad_rule_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        make_rule("auto", **options)


def test_rule_state_round_trips_and_a_bad_ladder_changes_nothing():
    rule = AutoRule(patience=3, spike_window=2)
    for tau in (0, 1, 2, 3, 3, 3):
        rule.observe(tau)
    for value in (1.0, 1.0, 1.0, 1.0, 50.0, 400.0):
        rule.observe_gradient_norm(value)
        rule.observe_loss(2.0 / value)
    state = rule.state_dict()
    assert state["recent"] == [400.0]
    copy = AutoRule(patience=3, spike_window=2)
    copy.load_state_dict(state)
    assert repr(copy.state_dict()) == repr(state)
    assert copy.effective_a == rule.effective_a
    for ladder in ([99.0, 0.0], [0.0], [math.nan, 0.0]):
        with pytest.raises(ValueError, match="ladder"):
            copy.load_state_dict({**state, "ladder": ladder})
    assert repr(copy.state_dict()) == repr(state)
    # A state of the first format (a two-slot ladder, no floor) still loads, floor on.
    old = {key: value for key, value in state.items() if key != "loss_watch"}
    copy.load_state_dict({**old, "format": 1, "ladder": state["ladder"][:2]})
    assert copy.level == rule.level
    assert copy.floor_active
    # ... and so does one of the second (no loss watch): the watch starts afresh.
    copy.load_state_dict({**old, "format": 2, "ladder": state["ladder"][:5]})
    assert copy.loss_watch.count == 0
    assert copy.level == rule.level
    # ... and one of the third (no loss reference, no recent norms): its watch is kept, the
    # recent norms are the detector's average.
    third = {key: value for key, value in state.items() if key != "recent"}
    copy.load_state_dict({**third, "format": 3, "ladder": state["ladder"][:6]})
    assert copy.loss_watch.state_dict() == state["loss_watch"]
    assert copy._recent.tolist() == [rule.detector.average]
    # ... and one of the fourth (no largest batch): its recent norms are kept, no batch seen.
    copy.load_state_dict({**state, "format": 4, "ladder": state["ladder"][:7]})
    assert copy._recent.tolist() == [400.0]
    assert copy.state_dict()["ladder"] == [*state["ladder"][:7], 0.0]
    # The recent norms: as many as this rule's spike window keeps, finite, not negative.
    with pytest.raises(ValueError, match="spike_window"):
        AutoRule(patience=3).load_state_dict(state)
    for recent in ([math.inf], [-1.0], "1.0"):
        with pytest.raises(ValueError, match="recent"):
            copy.load_state_dict({**state, "recent": recent})
    # A state whose watch is on does not load into a rule whose watch is off, nor back.
    with pytest.raises(ValueError, match="loss watch"):
        AutoRule(patience=3, spike_window=2, loss_rise=None).load_state_dict(state)
    before = repr(copy.state_dict())
    with pytest.raises(ValueError, match="loss watch"):
        copy.load_state_dict({**state, "loss_watch": None})
    assert repr(copy.state_dict()) == before  # the refused load changed nothing
    copy.load_state_dict(state)
    assert repr(copy.state_dict()) == repr(state)
    for ladder in (
        [0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, -0.25, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -4.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ):
        with pytest.raises(ValueError, match="ladder"):
            copy.load_state_dict({**state, "ladder": ladder})
    copy.reset()
    assert copy.level == 0
    assert copy.histogram.count == 0


def test_share_memory_shares_the_detector_and_the_ladder():
    rule = AutoRule().share_memory()
    assert rule.detector._state.is_shared()
    assert rule.loss_watch._state.is_shared()
    assert rule._ladder.is_shared()
    assert rule._recent.is_shared()


# -- in the optimizer -----------------------------------------------------------------------------


def test_the_optimizer_feeds_the_rule_one_gradient_norm_per_update():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = AsyncMomentumSGD(model.parameters(), lr=0.1, momentum=0.9, rule="auto")
    assert optimizer.tracker.uses_gradient_norm
    for _ in range(7):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step(staleness=2)
    assert optimizer.rule.detector.count == 7
    assert optimizer.rule.histogram.count == 7
    assert not AsyncMomentumSGD(model.parameters(), lr=0.1).tracker.uses_gradient_norm


def _spec(method: str) -> RunSpec:
    return RunSpec(
        problem="quadratic",
        staleness="round_robin",
        workers=8,
        method=method,
        momentum=0.9,
        lr=0.25,
        seed=0,
        target_loss=0.1,
        max_steps=1000,
        eval_every=10,
    )


def test_a_rising_loss_releases_the_floor_where_the_additive_rule_diverges(monkeypatch):
    # Eight workers in turn on the sweep's quadratic: the additive rule's momentum (~0.03) is
    # unstable for a constant delay of 7; the oracle is -0.3..-0.5 (docs/sweep-full-table.md).
    assert run_one(_spec("rule:additive")).status == "diverged"
    # The simulator hands the optimizer each batch's loss: its rise drops the additive floor.
    result = run_one(_spec("rule:auto"))
    assert result.status == "converged"
    assert result.mean_algorithmic_momentum < 0.0
    # Without the loss watch the additive rule is the floor, and the rule diverges with it...
    defaults = AutoRule.__init__.__kwdefaults__
    monkeypatch.setitem(defaults, "loss_rise", None)
    assert run_one(_spec("rule:auto")).status == "diverged"
    # ... unless the gradient norm's release is asked for.
    monkeypatch.setitem(defaults, "release_level", 0.5)
    result = run_one(_spec("rule:auto"))
    assert result.status == "converged"
    assert result.mean_algorithmic_momentum < 0.0


def test_the_loss_watch_lowers_the_floor_only_while_it_binds():
    rule = AutoRule()
    for _ in range(40):
        rule.observe(7)
    rule.algorithmic_momentum(0.9, 0.875)  # the floor binds: a = 0.6 allows less than additive
    assert rule.floor_active
    for loss in [1.0] * 10:
        rule.observe_loss(loss)
    assert rule.floor_offset == 0.0  # a flat loss is no rise
    for loss in [1.0, 10.0, 12.0, 15.0, 20.0, 30.0]:
        rule.observe_loss(loss)
    assert rule.floor_offset == rule.floor_step  # one rise: the floor is one step lower
    additive = formulas.additive_momentum(0.9, 0.875)
    assert rule.algorithmic_momentum(0.9, 0.875) == pytest.approx(additive - rule.floor_step)
    for loss in [100.0, 300.0, 1000.0, 3000.0]:  # a run that keeps diverging keeps rising
        rule.observe_loss(loss)
    assert rule.floor_offset > rule.floor_step
    assert rule.algorithmic_momentum(0.9, 0.875) < additive - rule.floor_step

    # Where the bound is above the floor, a rise backs the ladder off instead.
    rule = AutoRule(effective_curvature=0.06)
    for _ in range(40):
        rule.observe(1)
    rule.algorithmic_momentum(0.9, 0.5)
    level = rule.level
    for loss in [1.0] * 10 + [10.0, 20.0, 30.0, 40.0, 50.0]:
        rule.observe_loss(loss)
    assert rule.floor_offset == 0.0
    assert rule.level > level
    # Non-finite losses are ignored; without a watch nothing is observed.
    rule.observe_loss(float("nan"))
    quiet = AutoRule(loss_rise=None)
    quiet.observe_loss(1.0)
    assert quiet.loss_watch is None


def test_the_optimizer_hands_the_rule_its_loss_from_step_or_closure():
    model = torch.nn.Linear(4, 1)
    optimizer = AsyncMomentumSGD(model.parameters(), lr=0.1, momentum=0.9, rule="auto")
    assert optimizer.tracker.uses_loss
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        optimizer.step(staleness=2, loss=loss)
    assert optimizer.rule.loss_watch.count == 3

    def closure():
        optimizer.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        return loss

    returned = optimizer.step(closure, staleness=1)
    assert isinstance(returned, torch.Tensor)
    assert optimizer.rule.loss_watch.count == 4
    optimizer.step(staleness=1)  # no loss: nothing observed
    assert optimizer.rule.loss_watch.count == 4
    # A bad loss is refused before anything changes.
    before = [p.detach().clone() for p in model.parameters()]
    version = optimizer.tracker.clock.value
    for bad in ("1.0", torch.ones(2), torch.tensor(1), True):
        with pytest.raises(ValueError, match="loss must be"):
            optimizer.step(staleness=1, loss=bad)
    assert optimizer.tracker.clock.value == version
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not AsyncMomentumSGD(model.parameters(), lr=0.1).tracker.uses_loss


def test_the_optimizer_hands_the_rule_the_batch_size_and_refuses_a_bad_one():
    model = torch.nn.Linear(4, 1)
    optimizer = AsyncMomentumSGD(model.parameters(), lr=0.1, momentum=0.9, rule="auto")
    assert optimizer.tracker.uses_batch_size

    def backward(rows: int) -> None:
        optimizer.zero_grad()
        model(torch.randn(rows, 4)).pow(2).mean().backward()

    for rows in (8, 8, 2):
        backward(rows)
        optimizer.step(staleness=2, batch_size=rows)
    assert optimizer.rule.state_dict()["ladder"][-1] == 8.0
    assert optimizer.rule.detector.count == 2  # the batch of 2 was not read
    backward(8)
    optimizer.step(staleness=2)  # no batch size: the norm is read
    assert optimizer.rule.detector.count == 3
    before = [p.detach().clone() for p in model.parameters()]
    version = optimizer.tracker.clock.value
    for bad in (0, -3, 2.5, "8", True):
        with pytest.raises(ValueError, match="batch_size"):
            optimizer.step(staleness=1, batch_size=bad)
    assert optimizer.tracker.clock.value == version
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # Other rules do not read it; the step takes it all the same.
    plain = AsyncMomentumSGD(model.parameters(), lr=0.1, momentum=0.9)
    assert not plain.tracker.uses_batch_size
    backward(8)
    plain.step(staleness=1, batch_size=8)
    assert plain.last_step.applied


@pytest.mark.timeout(120)
def test_it_runs_in_hogwild_workers_with_one_shared_detector_and_loss_watch():
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(128, 1, 8, 8, generator=gen), torch.randint(0, 10, (128,), generator=gen))
    model = make_cnn(seed=0)
    optimizer = AsyncMomentumSGD(model.parameters(), lr=0.05, momentum=0.9, rule="auto")
    result = train_hogwild(
        model,
        optimizer,
        classification_loss,
        data,
        workers=2,
        steps_per_worker=20,
        batch_size=16,
        timeout=45.0,
    )
    assert result.ok, result.failures
    rule = optimizer.rule
    # The workers fed the parent's detector through shared memory (a racing update of the
    # average may be lost, never more than the updates applied).
    assert 0 < rule.detector.count <= 40
    assert rule.detector._state.is_shared()
    assert 0 < rule.loss_watch.count <= 40  # and their losses to its loss watch
    assert rule.loss_watch._state.is_shared()
    # ... and their batch sizes (128 rows in batches of 16).
    assert rule.state_dict()["ladder"][-1] == 16.0


class _BolderAutoRule(AutoRule):
    """The auto rule with the options for noisy, climbing gradient norms the README names."""

    name = "auto_bolder_for_test"

    def __init__(self, **options):
        super().__init__(**{"spike_window": 2, "forgive_after": 0, **options})


@pytest.mark.slow  # two GRU runs of 400 to 1400 updates: about 10 s
def test_on_a_recurrent_net_the_bolder_options_find_the_momentum_the_default_misses(monkeypatch):
    from asyncmomentum.core.tuning import rules

    monkeypatch.setitem(rules.RULES, _BolderAutoRule.name, _BolderAutoRule)

    def steps(rule: str) -> RunResult:
        spec = RunSpec("gru", "exponential", 2, f"rule:{rule}", 0.9, 0.1, 0, 0.05, 4000, 20)
        return run_one(spec)

    default, bolder = steps("auto"), steps(_BolderAutoRule.name)
    assert default.status == bolder.status == "converged"
    # The grid's best momentum here is 0.9 (420 updates); the default applies about 0.5. (All
    # three seeds of this cell gain 2.5x or more on the full sweep: docs/auto-rule.md.)
    assert bolder.mean_algorithmic_momentum > default.mean_algorithmic_momentum + 0.2
    assert bolder.steps < 0.6 * default.steps
