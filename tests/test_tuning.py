"""The pure formulas of asyncmomentum.core.formulas."""

from __future__ import annotations

import math

import pytest

from asyncmomentum.core import formulas
from asyncmomentum.core.tuning import rules
from asyncmomentum.core.validation import check_momentum, check_momentum_bounds


@pytest.mark.parametrize("workers", [1, 2, 4, 10, 32])
def test_implicit_momentum_is_one_minus_one_over_m(workers):
    assert formulas.implicit_momentum(workers) == pytest.approx(1 - 1 / workers)
    assert formulas.implicit_momentum_from_staleness(workers - 1) == pytest.approx(1 - 1 / workers)
    assert formulas.workers_from_staleness(workers - 1) == workers


def test_additive_rule_goes_negative_beyond_ten_workers():
    assert formulas.additive_momentum(0.9, formulas.implicit_momentum(1)) == 0.9
    assert formulas.additive_momentum(0.9, formulas.implicit_momentum(10)) == pytest.approx(0.0)
    assert formulas.additive_momentum(0.9, formulas.implicit_momentum(20)) < 0
    assert formulas.additive_total(0.15, 0.75) == pytest.approx(0.9)


def test_compositional_rule_matches_low_frequency_gain():
    implicit = formulas.implicit_momentum(4)
    alg = formulas.compositional_momentum(0.9, implicit)
    assert (1 - alg) * (1 - implicit) == pytest.approx(1 - 0.9)
    assert formulas.compositional_total(alg, implicit) == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("solve", "compose"),
    [
        (formulas.additive_momentum, formulas.additive_total),
        (formulas.compositional_momentum, formulas.compositional_total),
    ],
)
def test_total_inverts_each_formula(solve, compose):
    for workers in (1, 1.5, 3):
        implicit = formulas.implicit_momentum(workers)
        assert compose(solve(0.9, implicit), implicit) == pytest.approx(0.9)


def test_clipping_to_bounds():
    assert formulas.clip_momentum(-0.799, (-0.5, 0.99)) == -0.5
    assert formulas.clip_momentum(0.95, (-0.5, 0.9)) == 0.9
    assert formulas.clip_momentum(0.3, (-0.5, 0.9)) == 0.3


@pytest.mark.parametrize("rule", ["additive", "compositional"])
def test_the_convenience_functions_run_the_stateless_rules(rule):
    # rules.algorithmic_momentum / total_momentum (the package's asyncmomentum.algorithmic_momentum)
    for workers in (1, 1.5, 3):
        implicit = formulas.implicit_momentum(workers)
        alg = rules.algorithmic_momentum(0.9, implicit, rule, (-0.99, 0.99))
        assert rules.total_momentum(alg, implicit, rule) == pytest.approx(0.9)
    assert rules.algorithmic_momentum(0.2, 0.999, rule, (-0.5, 0.99)) == -0.5
    with pytest.raises(ValueError, match="keeps state"):
        rules.algorithmic_momentum(0.9, 0.5, "stability")


@pytest.mark.parametrize("bad", [1.0, -1.0, 1.5, math.nan, "x", None])
def test_target_outside_open_interval_is_refused(bad):
    with pytest.raises(ValueError, match=r"target_momentum.*\(-1, 1\)"):
        check_momentum(bad)


@pytest.mark.parametrize("bad", [(-1.0, 0.9), (0.0, 1.0), (0.5, 0.2), (0.1,), "ab"])
def test_bad_bounds_are_refused(bad):
    with pytest.raises(ValueError, match="momentum_bounds"):
        check_momentum_bounds(bad)


def test_unknown_rule_and_bad_workers_are_refused():
    with pytest.raises(ValueError, match="rule must be one of"):
        rules.make_rule("magic")
    with pytest.raises(ValueError, match="workers"):
        formulas.implicit_momentum(0.5)
    with pytest.raises(ValueError, match="mean_staleness"):
        formulas.workers_from_staleness(-1)
