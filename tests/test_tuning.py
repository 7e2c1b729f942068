"""The pure formulas of asyncmomentum.core.tuning.formulas."""

from __future__ import annotations

import math

import pytest

from asyncmomentum.core.tuning import formulas


@pytest.mark.parametrize("workers", [1, 2, 4, 10, 32])
def test_implicit_momentum_is_one_minus_one_over_m(workers):
    assert formulas.implicit_momentum(workers) == pytest.approx(1 - 1 / workers)
    assert formulas.implicit_momentum_from_staleness(workers - 1) == pytest.approx(1 - 1 / workers)
    assert formulas.workers_from_staleness(workers - 1) == workers


def test_additive_rule_goes_negative_beyond_ten_workers():
    bounds = (-0.9, 0.99)
    assert (
        formulas.algorithmic_momentum(0.9, formulas.implicit_momentum(1), "additive", bounds) == 0.9
    )
    assert formulas.algorithmic_momentum(
        0.9, formulas.implicit_momentum(10), "additive", bounds
    ) == pytest.approx(0.0)
    assert (
        formulas.algorithmic_momentum(0.9, formulas.implicit_momentum(20), "additive", bounds) < 0
    )


def test_compositional_rule_matches_low_frequency_gain():
    implicit = formulas.implicit_momentum(4)
    alg = formulas.algorithmic_momentum(0.9, implicit, "compositional", (-0.99, 0.99))
    assert (1 - alg) * (1 - implicit) == pytest.approx(1 - 0.9)
    assert formulas.total_momentum(alg, implicit, "compositional") == pytest.approx(0.9)


@pytest.mark.parametrize("rule", sorted(formulas.RULES))
def test_total_inverts_each_rule_when_unclipped(rule):
    for workers in (1, 1.5, 3):
        implicit = formulas.implicit_momentum(workers)
        alg = formulas.algorithmic_momentum(0.9, implicit, rule, (-0.99, 0.99))
        assert formulas.total_momentum(alg, implicit, rule) == pytest.approx(0.9)


def test_clipping_to_bounds():
    assert formulas.algorithmic_momentum(0.2, 0.999, "additive", (-0.5, 0.99)) == -0.5
    assert formulas.algorithmic_momentum(0.95, 0.0, "additive", (-0.5, 0.9)) == 0.9


@pytest.mark.parametrize("bad", [1.0, -1.0, 1.5, math.nan, "x", None])
def test_target_outside_open_interval_is_refused(bad):
    with pytest.raises(ValueError, match=r"target_momentum.*\(-1, 1\)"):
        formulas.check_momentum(bad)


@pytest.mark.parametrize("bad", [(-1.0, 0.9), (0.0, 1.0), (0.5, 0.2), (0.1,), "ab"])
def test_bad_bounds_are_refused(bad):
    with pytest.raises(ValueError, match="momentum_bounds"):
        formulas.check_momentum_bounds(bad)


def test_unknown_rule_and_bad_workers_are_refused():
    with pytest.raises(ValueError, match="rule must be one of"):
        formulas.check_rule("magic")
    with pytest.raises(ValueError, match="workers"):
        formulas.implicit_momentum(0.5)
    with pytest.raises(ValueError, match="mean_staleness"):
        formulas.workers_from_staleness(-1)
