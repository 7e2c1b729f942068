"""OptimizerView: one view of any torch optimizer (momentum, step, staleness, finiteness)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import pytest
import torch
from torch import nn

from asyncmomentum.core.optimizer import AsyncMomentumSGD, NonFiniteGradientError
from asyncmomentum.core.tracker import AsynchronyTracker
from asyncmomentum.runtimes.adapter import MomentumSummary, OptimizerView, all_finite

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

#: Every kind of optimizer the runtimes meet, by name.
OPTIMIZERS: dict[str, Factory] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "sgd-tensor": lambda params: torch.optim.SGD(params, lr=0.1, momentum=torch.tensor(0.9)),
    "adam": lambda params: torch.optim.Adam(params, lr=0.1),
    "adam-tensor": lambda params: torch.optim.Adam(
        params, lr=0.1, betas=(torch.tensor(0.9), torch.tensor(0.999))
    ),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.1),
    "async": lambda params: AsyncMomentumSGD(params, lr=0.1, momentum=0.9, warmup=0),
    "async-fixed": lambda params: AsyncMomentumSGD(params, lr=0.1, momentum=0.9, tune=False),
}
OURS = ("async", "async-fixed")
KEYS = {
    "sgd": "momentum",
    "sgd-tensor": "momentum",
    "adam": "betas",
    "adam-tensor": "betas",
    "adagrad": None,
    "async": "momentum",
    "async-fixed": "momentum",
}


def build(name: str) -> tuple[nn.Linear, OptimizerView]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return model, OptimizerView(OPTIMIZERS[name](list(model.parameters())))


def backward(model: nn.Module, scale: float = 1.0) -> None:
    model.zero_grad(set_to_none=True)
    (model(torch.ones(4, 3)).pow(2).sum() * scale).backward()


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# -- what it is ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_what_an_optimizer_is(name: str) -> None:
    _, view = build(name)
    ours = name in OURS
    assert view.is_async_momentum == ours
    assert view.tunes_itself == (name == "async")
    # Every view counts into a tracker: the optimizer's own, or the view's.
    assert (view.tracker is getattr(view.optimizer, "tracker", None)) == ours
    assert view.has_momentum == (name != "adagrad")
    assert view.tunable_from_outside == (not ours and name != "adagrad")
    assert view.momentum_key(view.optimizer.param_groups[0]) == KEYS[name]
    assert view.name == type(view.optimizer).__name__
    assert not view.needs_every_update
    assert not view.uses_curvature
    assert view.meter is None
    assert view.tracker.curvature is None
    assert view.measured_total_momentum is None


def test_not_an_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="must be a torch"):
        OptimizerView("sgd")  # type: ignore[arg-type]


# -- momentum -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "sgd-tensor", "adam", "adam-tensor"])
def test_reading_and_setting_the_momentum_of_an_optimizer_tuned_from_outside(name: str) -> None:
    model, view = build(name)
    group = view.optimizer.param_groups[0]
    assert view.applied_momentum() == pytest.approx(0.9)
    assert view.target_momentum(group) is None
    before = group["betas"] if view.momentum_key(group) == "betas" else group["momentum"]

    view.set_momentum(group, 0.25)

    assert view.applied_momentum(group) == pytest.approx(0.25)
    if name == "sgd":
        assert group["momentum"] == 0.25
    elif name == "sgd-tensor":
        assert group["momentum"] is before  # filled in place: kernels may hold the tensor
    elif name == "adam":
        assert group["betas"] == (0.25, 0.999)
    else:
        assert group["betas"][0] is before[0]
        assert float(group["betas"][1]) == pytest.approx(0.999)
    backward(model)
    assert view.step(staleness=5)  # staleness is not theirs to take: a plain step()
    group["target_momentum"] = 0.8
    assert view.target_momentum(group) == 0.8  # an outside tuner's per-group target


def test_an_optimizer_without_momentum_reads_zero_and_refuses_to_be_set() -> None:
    _, view = build("adagrad")
    group = view.optimizer.param_groups[0]
    assert view.momentum_key(group) is None
    assert view.applied_momentum(group) == 0.0
    with pytest.raises(ValueError, match="neither momentum nor betas"):
        view.set_momentum(group, 0.5)


@pytest.mark.parametrize("name", OURS)
def test_async_momentum_sgd_reports_its_applied_momentum_and_keeps_the_users(name: str) -> None:
    model, view = build(name)
    opt = cast(AsyncMomentumSGD, view.optimizer)
    group = opt.param_groups[0]
    for _ in range(30):
        backward(model, 1e-3)
        assert view.step(staleness=3) == (True, 3, view.tracker.clock.value - 1)
    assert view.tracker.last_staleness == 3
    assert view.tracker.clock.value == 30
    assert view.tracker.estimator.count == 30
    assert group["momentum"] == 0.9  # the momentum the user tuned, never overwritten
    assert view.applied_momentum(group) == opt.applied_momentum(group)
    if name == "async":
        assert view.applied_momentum() == pytest.approx(0.9 - 0.75)  # M = 4
        assert view.target_momentum(group) == 0.9
    else:
        assert view.applied_momentum() == 0.9
        assert view.target_momentum(group) is None
    with pytest.raises(ValueError, match="not written from outside"):
        view.set_momentum(group, 0.1)
    assert group["momentum"] == 0.9


# -- the step -----------------------------------------------------------------------------------


def test_staleness_reaches_async_momentum_sgd_or_is_measured_from_its_clock() -> None:
    model, view = build("async")
    backward(model)
    assert view.step(staleness=7).staleness == 7
    view.zero_grad()  # marks the parameters as read
    view.tracker.clock.tick()  # another process applies an update meanwhile
    backward(model)
    assert view.step().staleness == 1
    view.mark_read()
    for _ in range(3):
        view.tracker.clock.tick()
    backward(model)
    assert view.step().staleness == 3
    assert view.tracker.last_staleness == 3


def test_any_optimizer_counts_its_updates_in_the_views_tracker() -> None:
    model, view = build("sgd")
    view.zero_grad()
    view.tracker.clock.tick()  # another worker's update lands after this read
    backward(model)
    assert view.step() == (True, 1, 1)
    backward(model)
    assert view.step(staleness=5) == (True, 5, 2)
    assert view.tracker.estimator.count == 2
    with pytest.raises(ValueError, match="own tracker"):
        OptimizerView(AsyncMomentumSGD(model.parameters(), lr=0.1), AsynchronyTracker())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_steps_and_zero_grad_drops_the_gradients(name: str) -> None:
    model, view = build(name)
    before = snapshot(model)
    backward(model)
    assert view.step(staleness=2).applied
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    view.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_a_non_finite_gradient_is_refused_by_request_or_as_configured() -> None:
    model, view = build("sgd")
    before = snapshot(model)
    backward(model, math.nan)
    with pytest.raises(NonFiniteGradientError, match="param group 0"):
        view.step(refuse_nonfinite=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    view.step()  # not asked to refuse: torch's SGD writes the NaN in
    assert not all(torch.isfinite(p).all() for p in model.parameters())

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    skip = OptimizerView(AsyncMomentumSGD(model.parameters(), lr=0.1, nonfinite="skip"))
    before = snapshot(model)
    backward(model, math.inf)
    assert skip.step(staleness=1) == (False, None, None)  # skipped, and said so
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert skip.tracker.clock.value == 0

    raising = OptimizerView(AsyncMomentumSGD(model.parameters(), lr=0.1))
    with pytest.raises(NonFiniteGradientError):
        raising.step(staleness=1, refuse_nonfinite=False)  # it checks its gradients itself


def test_all_finite() -> None:
    assert all_finite([])
    assert all_finite([None])
    assert all_finite([torch.ones(3), None, torch.zeros(2, 2, dtype=torch.float64)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, math.nan])])
    assert not all_finite([torch.tensor([-math.inf])])
    # Finite values whose sum overflows are finite.
    assert all_finite([torch.full((4,), 3e38)])
    sparse = torch.sparse_coo_tensor([[0, 2]], [1.0, math.nan], (4,), check_invariants=True)
    assert not all_finite([sparse])
    assert OptimizerView.all_finite([torch.ones(2)])


# -- reports, sharing, curvature ----------------------------------------------------------------


def test_summary_from_the_optimizers_estimate_or_the_callers() -> None:
    model, view = build("async")
    for _ in range(20):
        backward(model, 1e-3)
        view.step(staleness=1)
    opt = cast(AsyncMomentumSGD, view.optimizer)
    assert view.summary() == MomentumSummary(
        algorithmic_momentum=opt.algorithmic_momentum,
        implicit_momentum=opt.implicit_momentum,
        total_momentum=opt.total_momentum,
        estimated_workers=opt.estimated_workers,
        mean_staleness=opt.mean_staleness,
    )
    sgd = OptimizerView(
        torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1, momentum=0.9),
        AsynchronyTracker(warmup=0),
    )
    for _ in range(10):
        sgd.tracker.observe(1)
    summary = sgd.summary()
    assert summary.algorithmic_momentum == pytest.approx(0.9)
    assert summary.estimated_workers == pytest.approx(2.0)
    assert summary.implicit_momentum == pytest.approx(0.5)
    assert summary.mean_staleness == pytest.approx(1)
    assert summary.total_momentum == pytest.approx(1.4)  # additive


@pytest.mark.parametrize("name", ["sgd", "async"])
def test_share_memory(name: str) -> None:
    model, view = build(name)
    assert view.share_memory() is view
    assert all(p.is_shared() for p in model.parameters())
    assert view.tracker.is_shared
    if name == "async":
        opt = view.optimizer
        assert all(opt.state[p]["momentum_buffer"].is_shared() for p in model.parameters())


def test_the_curvature_probe_goes_to_a_rule_that_uses_curvature_only() -> None:
    model, view = build("sgd")
    with pytest.raises(ValueError, match="SGD"):
        view.set_curvature_probe(lambda: model(torch.ones(1, 3)).sum())
    _, additive = build("async")
    with pytest.raises(ValueError, match="rule='additive'"):
        additive.set_curvature_probe(None)
    stability = OptimizerView(AsyncMomentumSGD(model.parameters(), lr=0.1, rule="stability"))
    assert stability.uses_curvature
    assert stability.needs_every_update

    def probe() -> torch.Tensor:
        return model(torch.ones(1, 3)).sum()

    stability.set_curvature_probe(probe)
    assert cast(AsyncMomentumSGD, stability.optimizer).curvature_probe is probe
    metered = OptimizerView(AsyncMomentumSGD(model.parameters(), lr=0.1, measure_momentum=True))
    assert metered.needs_every_update
    assert metered.meter is not None
    assert "rule=" in metered.describe()
