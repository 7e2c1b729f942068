"""The tuning rules as objects: the registry, a new rule end to end, flags, state, errors."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from conftest import make_reading

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.core import formulas
from asyncmomentum.core.measuring.meter import MomentumMeter
from asyncmomentum.core.tracker import AsynchronyTracker
from asyncmomentum.core.tuning import rules
from asyncmomentum.core.tuning.rules import (
    AdditiveRule,
    AutoRule,
    ClosedLoopRule,
    CompositionalRule,
    StabilityRule,
    TuningRule,
)

ALL = ("additive", "compositional", "closed_loop", "stability", "auto")


@pytest.fixture
def registry():
    """The registry, restored after the test."""
    saved = dict(rules.RULES)
    yield rules.RULES
    rules.RULES.clear()
    rules.RULES.update(saved)


class LongestDelayRule(TuningRule):
    """A rule defined outside the package: the additive rule for ``M = 1 + max(tau)``."""

    name: ClassVar[str] = "longest_delay"
    stateful: ClassVar[bool] = True

    def __init__(self, *, cap: int = 100) -> None:
        if cap < 0:
            raise ValueError(f"cap must be >= 0, got {cap!r}")
        self.cap = cap
        self.longest = 0

    def observe(self, tau: int) -> None:
        self.longest = min(max(self.longest, tau), self.cap)

    def algorithmic_momentum(self, target, implicit, *, lr=None, bounds=(-0.9, 0.99)) -> float:
        worst = formulas.implicit_momentum(1 + self.longest)
        return formulas.clip_momentum(formulas.additive_momentum(target, worst), bounds)

    def state_dict(self) -> dict[str, Any]:
        return {"longest": self.longest}

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().check_state_dict(state_dict)
        if not isinstance(state_dict.get("longest"), int) or state_dict["longest"] < 0:
            raise ValueError(f"LongestDelayRule state is corrupt: {state_dict!r}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_state_dict(state_dict)
        self.longest = state_dict["longest"]

    def reset(self) -> None:
        self.longest = 0


# -- the registry ---------------------------------------------------------------------------------


def test_the_registry_lists_the_rules_in_order():
    assert rules.rule_names() == ALL
    assert [rules.rule_class(name) for name in ALL] == [
        AdditiveRule,
        CompositionalRule,
        ClosedLoopRule,
        StabilityRule,
        AutoRule,
    ]
    for name, cls in rules.RULES.items():
        assert cls.name == name
        assert rules.make_rule(name).name == name
    assert rules.DEFAULT_RULE == "additive"
    assert AsynchronyTracker().rule_name == rules.DEFAULT_RULE


def test_capability_flags():
    flags = {
        name: (cls.uses_meter, cls.uses_curvature, cls.needs_lr, cls.stateful)
        for name, cls in rules.RULES.items()
    }
    assert flags == {
        "additive": (False, False, False, False),
        "compositional": (False, False, False, False),
        "closed_loop": (True, False, False, True),
        "stability": (False, True, True, True),
        "auto": (False, False, False, True),
    }
    for name in ALL:
        tuner = AsynchronyTracker(rule=name)
        cls = rules.rule_class(name)
        assert (tuner.uses_meter, tuner.uses_curvature, tuner.needs_lr) == (
            cls.uses_meter,
            cls.uses_curvature,
            cls.needs_lr,
        )


def test_unknown_names_and_bad_options_raise_with_what_is_known():
    for bad in ("magic", "Additive", "", None, 3):
        with pytest.raises(
            ValueError, match=r"rule must be one of \['additive', 'compositional', "
        ):
            rules.make_rule(bad)
    with pytest.raises(ValueError, match="rule must be one of"):
        AsynchronyTracker(rule="stabilty")
    with pytest.raises(ValueError, match=r"rule_options for 'closed_loop'.*\['gain', 'max_change"):
        rules.make_rule("closed_loop", curvature_margin=0.5)
    with pytest.raises(ValueError, match=r"rule_options for 'additive'.*takes none"):
        rules.make_rule("additive", gain=0.5)
    with pytest.raises(ValueError, match=r"gain must be a number in \(0, 1\]"):
        rules.make_rule("closed_loop", gain=2.0)
    with pytest.raises(ValueError, match="object already"):
        rules.make_rule(ClosedLoopRule(), gain=0.2)
    with pytest.raises(ValueError, match="object already"):
        AsynchronyTracker(rule=StabilityRule(), rule_options={"margin": 0.1})


def test_register_rule_checks_what_it_registers(registry):
    class Nameless(AdditiveRule):
        name = ""

    class Incomplete(TuningRule):
        name = "incomplete"

    class Another(AdditiveRule):
        pass  # named "additive" too

    with pytest.raises(ValueError, match="`name`"):
        rules.register_rule(Nameless)
    with pytest.raises(ValueError, match="abstract"):
        rules.register_rule(Incomplete)
    with pytest.raises(ValueError, match="subclass of TuningRule"):
        rules.register_rule(dict)
    with pytest.raises(ValueError, match="registered already"):
        rules.register_rule(Another)
    assert rules.register_rule(AdditiveRule) is AdditiveRule  # itself again: fine
    assert rules.register_rule(Another, replace=True) is Another
    assert rules.rule_class("additive") is Another


# -- a new rule: one class, one registry entry -----------------------------------------------------


def test_a_rule_defined_here_works_through_the_tuner_and_the_optimizer(registry):
    rules.register_rule(LongestDelayRule)
    assert rules.rule_names() == (*ALL, "longest_delay")
    tuner = AsynchronyTracker(rule="longest_delay", rule_options={"cap": 7}, warmup=0)
    assert isinstance(tuner.rule, LongestDelayRule)
    assert tuner.rule.cap == 7
    assert tuner.rule_name == "longest_delay"
    for tau in (1, 3, 2, 30):
        tuner.observe(tau)
    assert tuner.algorithmic_momentum(0.9) == pytest.approx(0.9 - (1 - 1 / 8))  # capped at 7
    assert tuner.total_momentum(0.1) == pytest.approx(0.1 + tuner.implicit_momentum)

    state = tuner.state_dict()
    assert state["longest_delay"] == {"longest": 7}
    resumed = AsynchronyTracker(rule="longest_delay", rule_options={"cap": 7}, warmup=0)
    resumed.load_state_dict(state)
    assert resumed.algorithmic_momentum(0.9) == tuner.algorithmic_momentum(0.9)
    with pytest.raises(ValueError, match="corrupt"):
        resumed.load_state_dict({**state, "longest_delay": {"longest": -1}})
    assert resumed.rule.longest == 7

    params = [torch.nn.Parameter(torch.ones(3))]
    opt = AsyncMomentumSGD(params, lr=0.1, momentum=0.9, rule="longest_delay")
    for _ in range(3):
        params[0].grad = torch.ones(3)
        opt.step(staleness=4)
    assert opt.algorithmic_momentum == pytest.approx(0.9 - (1 - 1 / 5))


def test_a_rule_object_can_be_given_instead_of_a_name():
    rule = CompositionalRule()
    tuner = AsynchronyTracker(rule=rule, workers=4)
    assert tuner.rule is rule
    assert tuner.algorithmic_momentum(0.9) == pytest.approx(1 - 0.1 / 0.25)
    assert tuner.total_momentum(tuner.algorithmic_momentum(0.9)) == pytest.approx(0.9)


# -- each rule's state -----------------------------------------------------------------------------


def _drive(tuner: AsynchronyTracker, steps: range, seed: int) -> list[float]:
    """Feed a tuner staleness; return the momentum it gives after each step.

    A reading or a curvature is fed too if its rule uses one.
    """
    rng = np.random.default_rng(seed)
    momenta = []
    for step in steps:
        tuner.observe(int(rng.geometric(0.3)) - 1)
        if tuner.uses_meter and step % 20 == 0:
            tuner.observe_reading(make_reading(rng.uniform(0.5, 0.95), 0.1, serial=step + 1))
        if tuner.uses_curvature and step % 30 == 0:
            tuner.observe_curvature(rng.uniform(0.5, 2.0))
        lr = 0.2 if tuner.needs_lr else None
        momenta.append(tuner.algorithmic_momentum(0.9, lr=lr))
        momenta.append(tuner.algorithmic_momentum(0.5, lr=lr))
    return momenta


@pytest.mark.parametrize("name", ALL)
def test_each_rule_state_round_trips_and_the_run_continues_exactly(name):
    options = {"warmup": 0, "horizon": 40, "momentum_bounds": (-0.5, 0.95)}
    tuner = AsynchronyTracker(rule=name, **options)
    _drive(tuner, range(100), seed=1)
    state = tuner.state_dict()
    common = {"format", "clock", "estimator", "version_read", "last_staleness"}
    assert set(state) == (common | ({name} if tuner.rule.stateful else set()))
    resumed = AsynchronyTracker(rule=name, **options)
    resumed.load_state_dict(state)
    continued, original = _drive(resumed, range(100, 200), 2), _drive(tuner, range(100, 200), 2)
    if name in ("stability", "auto"):
        # Resumed, it re-reads its histogram at once, where the original waits for its next
        # check: the two agree to the change of pmf the rule tolerates (pmf_tolerance).
        assert continued == pytest.approx(original, abs=0.05)
    else:
        assert continued == original
    # The rule alone, too: its state, into a fresh rule of its class.
    fresh = rules.make_rule(name)
    fresh.load_state_dict(tuner.rule.state_dict())
    assert fresh.state_dict().keys() == tuner.rule.state_dict().keys()


@pytest.mark.parametrize("name", ["closed_loop", "stability", "auto"])
def test_a_corrupt_rule_state_changes_nothing(name):
    tuner = AsynchronyTracker(rule=name, warmup=0)
    _drive(tuner, range(60), seed=0)
    state = tuner.state_dict()
    before = tuner.rule.state_dict()
    broken = dict(state[name])
    broken["format"] = 99
    with pytest.raises(ValueError, match="format"):
        tuner.load_state_dict({**state, name: broken})
    with pytest.raises(ValueError, match="StalenessEstimator state is missing"):
        tuner.check_state_dict({**state, "estimator": {"format": 1}})
    assert repr(tuner.rule.state_dict()) == repr(before)
    # A state without the rule's entry (written under another rule) restarts it.
    tuner.load_state_dict(AsynchronyTracker().state_dict())
    if name == "closed_loop":
        assert tuner.rule.state_dict()["loops"] == []
    else:
        assert tuner.rule.histogram.count == 0
        assert tuner.curvature is None


def test_format_1_checkpoints_of_the_closed_loop_load():
    # Before the rules were objects, a tuner stored its closed loops as a bare list.
    tuner = AsynchronyTracker(rule="closed_loop", workers=4)
    tuner.observe_reading(make_reading(0.7, 0.15, serial=1))
    momentum = tuner.algorithmic_momentum(0.9)
    state = tuner.state_dict()
    legacy = {"estimator": state["estimator"], "closed_loop": state["closed_loop"]["loops"]}
    resumed = AsynchronyTracker(rule="closed_loop", workers=4)
    resumed.load_state_dict(legacy)
    resumed.observe_reading(make_reading(0.7, 0.15, serial=1))  # the same reading: no new step
    assert resumed.algorithmic_momentum(0.9) == momentum
    assert resumed.state_dict()["closed_loop"] == state["closed_loop"]


# -- observations a rule cannot use ----------------------------------------------------------------


def test_inputs_a_rule_does_not_use():
    additive = AsynchronyTracker(rule="additive")
    additive.observe_reading(make_reading(0.7, 0.1, serial=1))  # ignored
    assert additive.algorithmic_momentum(0.9) == 0.9
    with pytest.raises(ValueError, match="uses a curvature"):
        additive.observe_curvature(1.0)
    assert additive.curvature is None
    with pytest.raises(ValueError, match="needs the learning rate"):
        AsynchronyTracker(rule="stability").algorithmic_momentum(0.9)
    # lr as a tensor (torch's param groups may hold one) works like the number.
    stability = AsynchronyTracker(rule="stability", warmup=0)
    stability.observe(3)
    stability.observe_curvature(1.0)
    assert stability.algorithmic_momentum(0.9, lr=torch.tensor(0.1)) == (
        stability.algorithmic_momentum(0.9, lr=0.1)
    )


# -- compositions ----------------------------------------------------------------------------------


def test_the_meter_and_its_readings_compose_under_a_rule_object():
    reading = make_reading(0.7, 0.2, serial=1)
    assert reading.total_momentum() == pytest.approx(0.7)  # additive by default
    assert reading.total_momentum(ClosedLoopRule()) == pytest.approx(0.7)
    assert reading.total_momentum(CompositionalRule()) == pytest.approx(reading.total)
    unknown = dataclasses.replace(reading, algorithmic=math.nan, implicit=math.nan)
    assert unknown.total_momentum(AdditiveRule()) == reading.total  # no split: the total
    meter = MomentumMeter([torch.nn.Parameter(torch.zeros(8))], rule=CompositionalRule())
    assert isinstance(meter.rule, CompositionalRule)
    with pytest.raises(ValueError, match="rule object"):
        MomentumMeter([torch.nn.Parameter(torch.zeros(8))], rule="compositional")
