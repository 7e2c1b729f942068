"""AsynchronyTracker: the one owner of clock, estimate, rule and lock."""

from __future__ import annotations

import copy
import pickle

import pytest

from asyncmomentum import AsynchronyTracker, MomentumSummary
from asyncmomentum.core.tracker import StepReport


def test_record_update_measures_staleness_since_the_read_and_reports_it() -> None:
    tracker = AsynchronyTracker(warmup=0)
    tracker.mark_read()
    tracker.clock.tick()  # two other updates land after this read
    tracker.clock.tick()
    assert tracker.record_update() == StepReport(applied=True, staleness=2, version=2)
    assert tracker.record_update(staleness=5) == StepReport(applied=True, staleness=5, version=3)
    assert tracker.last_staleness == 5
    assert tracker.clock.value == 4
    assert tracker.estimator.count == 2
    with pytest.raises(ValueError, match="staleness"):
        tracker.record_update(staleness=-1)
    assert tracker.clock.value == 4  # a bad staleness changes nothing


def test_the_summary_is_one_immutable_value_under_the_rule() -> None:
    tracker = AsynchronyTracker(warmup=0, rule="compositional")
    for _ in range(50):
        tracker.observe(3)  # M = 4
    algorithmic = tracker.algorithmic_momentum(0.9)
    summary = tracker.summary(algorithmic)
    assert isinstance(summary, MomentumSummary)
    assert summary.estimated_workers == pytest.approx(4.0)
    assert summary.implicit_momentum == pytest.approx(0.75)
    assert summary.total_momentum == pytest.approx(0.9)  # compositional, not additive
    assert summary.algorithmic_momentum == pytest.approx(1 - 0.1 / 0.25)
    assert summary.measured_total_momentum is None
    with pytest.raises(AttributeError):
        summary.total_momentum = 0.5  # type: ignore[misc]


def test_one_lock_for_clock_and_estimator_through_share_and_copies() -> None:
    tracker = AsynchronyTracker()
    assert tracker.estimator._lock is tracker.clock._lock
    tracker.share_memory()
    assert tracker.is_shared
    assert tracker.estimator._lock is tracker.clock._lock  # no re-linking needed
    for clone in (copy.deepcopy(tracker), pickle.loads(pickle.dumps(tracker))):
        assert not clone.is_shared  # a plain copy is independent
        assert clone.estimator._lock is clone.clock._lock
        assert clone.clock._lock is not tracker.clock._lock


def test_state_round_trips_and_a_bad_state_changes_nothing() -> None:
    tracker = AsynchronyTracker(warmup=0, rule="stability")
    tracker.observe_curvature(2.0)
    for tau in (1, 2, 3) * 10:
        tracker.record_update(staleness=tau)
    state = tracker.state_dict()
    resumed = AsynchronyTracker(warmup=0, rule="stability")
    resumed.load_state_dict(state)
    assert resumed.clock.value == 30
    assert resumed.curvature == 2.0
    assert resumed.algorithmic_momentum(0.9, lr=0.1) == tracker.algorithmic_momentum(0.9, lr=0.1)
    for broken in ({**state, "format": 9}, {**state, "version_read": -1}, "state"):
        with pytest.raises(ValueError, match="tracker state"):
            resumed.load_state_dict(broken)  # type: ignore[arg-type]
    assert resumed.clock.value == 30


def test_a_momentum_tuner_state_of_older_versions_loads() -> None:
    tracker = AsynchronyTracker(warmup=0)
    for _ in range(40):
        tracker.observe(1)
    legacy = {"estimator": tracker.state_dict()["estimator"]}  # what MomentumTuner saved
    resumed = AsynchronyTracker(warmup=0)
    resumed.load_state_dict(legacy)
    assert resumed.estimated_workers == pytest.approx(tracker.estimated_workers)
