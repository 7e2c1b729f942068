"""The package's one set of argument checks (asyncmomentum.core.validation).

And the refusals of issue 13 at the public entry points: bools are not integers, strings are not
numbers, a staleness that no run reaches is refused before the clock moves.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import pytest
import torch

from asyncmomentum import AsyncMomentumSGD, StalenessEstimator, implicit_momentum
from asyncmomentum.core.measuring.staleness import DEFAULT_HORIZON, DEFAULT_WARMUP
from asyncmomentum.core.tracker import AsynchronyTracker
from asyncmomentum.core.validation import (
    MAX_COUNT,
    check_bool,
    check_choice,
    check_int,
    check_momentum,
    check_momentum_bounds,
    check_positive,
    check_real,
    check_staleness,
    check_state,
)
from asyncmomentum.runtimes.server import ServerConfig

# -- each check -----------------------------------------------------------------------------------


def test_check_int_returns_an_int() -> None:
    assert check_int(3, "n", 0) == 3
    assert type(check_int(np.int64(3), "n", 0)) is int
    assert check_int(5, "n", 1, maximum=5) == 5


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (True, r"n must be an integer >= 1, got True"),
        (False, r"n must be an integer >= 1, got False"),
        (0, r"n must be an integer >= 1, got 0"),
        (2.0, r"n must be an integer >= 1, got 2\.0"),
        ("4", r"n must be an integer >= 1, got '4'"),
        (None, r"n must be an integer >= 1, got None"),
        (torch.tensor(3), r"n must be an integer >= 1"),
    ],
)
def test_check_int_refuses(value: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_int(value, "n", 1)


def test_check_int_names_its_maximum() -> None:
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 3\], got 4"):
        check_int(4, "rank", 0, maximum=3)


def test_check_real_returns_a_float() -> None:
    assert check_real(1, "x") == 1.0
    assert type(check_real(1, "x")) is float
    assert check_real(np.float32(0.5), "x") == 0.5
    assert check_real(0.0, "x", minimum=0.0) == 0.0
    assert check_real(math.inf, "x", finite=False) == math.inf
    assert check_real(torch.tensor(0.25), "x", allow_tensor=True) == 0.25


@pytest.mark.parametrize(
    ("value", "options", "match"),
    [
        ("0.1", {}, r"lr must be a real number, got '0\.1'"),
        (True, {}, r"lr must be a real number, got True"),
        (None, {}, r"lr must be a real number, got None"),
        (torch.tensor(0.1), {}, r"lr must be a real number"),
        (torch.tensor([0.1, 0.2]), {"allow_tensor": True}, r"lr must be a real number or a 1-elem"),
        (torch.tensor(True), {"allow_tensor": True}, r"lr must be a real number or a 1-element"),
        (math.nan, {}, r"lr must be a finite number, got nan"),
        (math.nan, {"finite": False}, r"lr must be a number, got nan"),
        (math.inf, {}, r"lr must be a finite number, got inf"),
        (math.inf, {"minimum": 0.0}, r"lr must be a finite number >= 0, got inf"),
        (-0.1, {"minimum": 0.0}, r"lr must be a finite number >= 0, got -0\.1"),
        (0.0, {"minimum": 0.0, "min_inclusive": False}, r"lr must be a finite number > 0, got 0"),
        (2.0, {"maximum": 1.0}, r"lr must be a finite number <= 1, got 2"),
        (1.0, {"maximum": 1.0, "max_inclusive": False}, r"lr must be a finite number < 1"),
        (
            1.0,
            {"minimum": 0.0, "maximum": 1.0, "max_inclusive": False},
            r"lr must be a number in \[0, 1\), got 1\.0",
        ),
        (
            0.0,
            {"minimum": 0.0, "maximum": 1.0, "min_inclusive": False},
            r"lr must be a number in \(0, 1\], got 0\.0",
        ),
    ],
)
def test_check_real_refuses(value: Any, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_real(value, "lr", **options)


def test_check_positive_returns_the_value_or_none() -> None:
    assert check_positive(2, "every", integer=True) == 2
    assert check_positive(0.5, "timeout") == 0.5
    assert check_positive(None, "timeout", optional=True) is None


@pytest.mark.parametrize(
    ("value", "options", "match"),
    [
        (0, {"integer": True}, r"every must be an integer > 0, got 0"),
        (True, {"integer": True}, r"every must be an integer > 0, got True"),
        (2.5, {"integer": True}, r"every must be an integer > 0, got 2\.5"),
        (None, {"integer": True}, r"every must be an integer > 0, got None"),
        (0.0, {}, r"every must be a finite number > 0, got 0\.0"),
        (math.inf, {}, r"every must be a finite number > 0, got inf"),
        ("1", {"optional": True}, r"every must be a finite number > 0 or None, got '1'"),
        (-1, {"integer": True, "optional": True}, r"every must be an integer > 0 or None"),
    ],
)
def test_check_positive_refuses(value: Any, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_positive(value, "every", **options)


def test_check_bool() -> None:
    assert check_bool(True, "log") is True
    for bad in (1, 0, "yes", None):
        with pytest.raises(ValueError, match=r"log must be True or False"):
            check_bool(bad, "log")


def test_check_choice_returns_the_choice() -> None:
    assert check_choice("skip", "nonfinite", ("raise", "skip")) == "skip"
    assert check_choice("a", "rule", {"a": 1, "b": 2}) == "a"


@pytest.mark.parametrize("value", ["ignore", "", None, 1, ["raise"], {"raise": 1}])
def test_check_choice_refuses(value: Any) -> None:
    with pytest.raises(ValueError, match=r"nonfinite must be one of \['raise', 'skip'\], got "):
        check_choice(value, "nonfinite", ("raise", "skip"))


def test_check_staleness_takes_integers_and_integer_tensors() -> None:
    assert check_staleness(0) == 0
    assert check_staleness(np.int64(4)) == 4
    assert check_staleness(torch.tensor(7)) == 7
    assert check_staleness(MAX_COUNT) == MAX_COUNT == 2**62 - 1


@pytest.mark.parametrize(
    ("tau", "match"),
    [
        (-1, "non-negative integer, got -1; a gradient cannot"),
        (2.5, "non-negative integer .* got 2.5 of type float"),
        ("3", "non-negative integer .* of type str"),
        (True, "non-negative integer, got True"),
        (torch.tensor(1.0), "non-negative integer .* of type Tensor"),
        (MAX_COUNT + 1, r"non-negative integer <= 4611686018427387903 \(2\*\*62 - 1\)"),
        (10**30, r"non-negative integer <= 4611686018427387903 \(2\*\*62 - 1\)"),
    ],
)
def test_check_staleness_refuses(tau: Any, match: str) -> None:
    with pytest.raises(ValueError, match=f"staleness must be a {match}"):
        check_staleness(tau)


def test_check_momentum_returns_a_float() -> None:
    assert check_momentum(0.9) == 0.9
    assert check_momentum(-0.5, "momentum") == -0.5
    assert type(check_momentum(np.float64(0.5))) is float


@pytest.mark.parametrize("bad", [True, False, "0.5", None, torch.tensor(0.5)])
def test_check_momentum_refuses_what_is_not_a_number(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"^mu must be a number in \(-1, 1\), got "):
        check_momentum(bad, "mu")


@pytest.mark.parametrize("bad", [1.0, -1.0, 1.5, -3, math.nan, math.inf])
def test_check_momentum_refuses_the_closed_ends(bad: float) -> None:
    with pytest.raises(ValueError, match=r"^mu must lie in the open interval \(-1, 1\), got "):
        check_momentum(bad, "mu")


def test_check_momentum_bounds_returns_floats() -> None:
    assert check_momentum_bounds((-0.9, 0.99)) == (-0.9, 0.99)
    assert check_momentum_bounds([0, 0]) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ((0.1,), "a pair"),
        ("ab", "a pair"),
        ((True, 0.5), "a pair"),
        (("0.1", "0.5"), "a pair"),
        (None, "a pair"),
        ((-1.0, 0.9), "inside the open interval"),
        ((0.0, 1.0), "inside the open interval"),
        ((0.5, 0.2), "low <= high"),
    ],
)
def test_check_momentum_bounds_refuses(bad: Any, match: str) -> None:
    with pytest.raises(ValueError, match=f"momentum_bounds must .*{match}"):
        check_momentum_bounds(bad)


def test_check_state_passes_a_good_state() -> None:
    check_state({"format": 2, "a": 1}, "Thing", expected_format=2, keys=("a",))


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ([1, 2], r"Thing\.load_state_dict expects a dict from Thing\.state_dict\(\), got list"),
        ({"a": 1}, r"Thing\.load_state_dict expects a dict"),
        ({"format": 99, "a": 1}, r"Thing state has format 99 but .* reads format 1"),
        ({"format": 1}, r"Thing state is missing \['a'\]"),
    ],
)
def test_check_state_refuses(state: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_state(state, "Thing", keys=("a",))


# -- issue 13, at the public entry points ---------------------------------------------------------


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(3))]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": "0.1"}, r"lr must be a real number, got '0\.1'"),
        ({"lr": True}, r"lr must be a real number, got True"),
        ({"lr": math.inf}, r"Invalid learning rate: inf"),
        ({"lr": math.nan}, r"lr must be a number, got nan"),
        ({"momentum": True}, r"momentum must be a real number, got True"),
        ({"momentum": False}, r"momentum must be a real number, got False"),
        ({"momentum": "0.9"}, r"momentum must be a real number, got '0\.9'"),
        ({"horizon": True}, r"horizon must be an integer >= 1, got True"),
        ({"horizon": 10.0}, r"horizon must be an integer >= 1, got 10\.0"),
        ({"warmup": False}, r"warmup must be an integer >= 0, got False"),
        ({"workers": True}, r"workers must be a real number, got True"),
        ({"workers": "4"}, r"workers must be a real number, got '4'"),
        ({"workers": 0.5}, r"workers must be a finite number >= 1, got 0\.5"),
        ({"workers": math.inf}, r"workers must be a finite number >= 1, got inf"),
        ({"curvature_every": True}, r"curvature_every must be an integer >= 1, got True"),
        ({"nonfinite": "ignore"}, r"nonfinite must be one of \['raise', 'skip'\]"),
        ({"momentum_bounds": (False, 0.9)}, r"momentum_bounds must be a pair"),
    ],
)
def test_async_momentum_sgd_refuses_bools_strings_and_infinities(
    kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        AsyncMomentumSGD(_params(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_momentum": True}, r"target_momentum must be a number in \(-1, 1\)"),
        ({"target_momentum": "0.9"}, r"target_momentum must be a number in \(-1, 1\)"),
        ({"horizon": True}, r"horizon must be an integer >= 1"),
        ({"warmup": True}, r"warmup must be an integer >= 0"),
        ({"workers": "4"}, r"workers must be a real number"),
        ({"workers": True}, r"workers must be a real number"),
    ],
)
def test_tuner_and_estimator_refuse_bools_and_strings(kwargs: dict[str, Any], match: str) -> None:
    # The tracker takes the target where it is used.
    target = kwargs.get("target_momentum", 0.9)
    options = {k: v for k, v in kwargs.items() if k != "target_momentum"}
    with pytest.raises(ValueError, match=match):
        AsynchronyTracker(**options).algorithmic_momentum(target)
    estimator_kwargs = {k: v for k, v in kwargs.items() if k != "target_momentum"}
    if estimator_kwargs:
        with pytest.raises(ValueError, match=match):
            StalenessEstimator(**estimator_kwargs)


@pytest.mark.parametrize("bad", ["4", True, 0.5, math.inf, None])
def test_implicit_momentum_refuses_what_is_not_a_worker_count(bad: Any) -> None:
    with pytest.raises(ValueError, match="workers must be"):
        implicit_momentum(bad)


@pytest.mark.parametrize("staleness", [10**30, MAX_COUNT + 1, -1, 2.0, True, "3"])
def test_a_bad_staleness_is_refused_before_anything_moves(staleness: Any) -> None:
    params = _params()
    opt = AsyncMomentumSGD(params, lr=0.1, momentum=0.9)
    closure_calls = []

    def closure() -> torch.Tensor:
        closure_calls.append(1)
        opt.zero_grad()
        loss = params[0].square().sum()
        loss.backward()
        return loss

    closure()
    before = params[0].detach().clone()
    clock, count = opt.tracker.clock.value, opt.tracker.estimator.count
    with pytest.raises(ValueError, match="staleness must be a non-negative integer"):
        opt.step(closure, staleness=staleness)
    assert len(closure_calls) == 1  # the closure did not run
    assert opt.tracker.clock.value == clock
    assert opt.tracker.estimator.count == count
    assert torch.equal(params[0], before)
    assert opt.state[params[0]] == {}  # no momentum buffer either
    opt.step(staleness=MAX_COUNT)  # the largest staleness is taken
    assert opt.tracker.clock.value == clock + 1
    assert opt.last_staleness == MAX_COUNT


def test_horizon_and_warmup_have_one_name_and_one_default_everywhere() -> None:
    lightning = pytest.importorskip("lightning_callbacks")
    owners = [
        AsyncMomentumSGD,
        AsynchronyTracker,
        StalenessEstimator,
        ServerConfig,
        lightning.AsyncMomentumCallback,
    ]
    for owner in owners:
        parameters = inspect.signature(owner).parameters
        assert parameters["horizon"].default == DEFAULT_HORIZON == 1000, owner
        assert parameters["warmup"].default == DEFAULT_WARMUP == 20, owner
    config = ServerConfig()
    assert (config.horizon, config.warmup) == (DEFAULT_HORIZON, DEFAULT_WARMUP)
    with pytest.raises(ValueError, match="horizon must be an integer >= 1, got True"):
        ServerConfig(horizon=True)
    with pytest.raises(ValueError, match="warmup must be an integer >= 0, got True"):
        lightning.AsyncMomentumCallback(warmup=True)
