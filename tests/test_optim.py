"""AsyncMomentumSGD: tuning, resume, bad input, non-finite gradients, pickling, schedulers."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from conftest import make_cnn
from torch import nn

from asyncmomentum import AsyncMomentumSGD, NonFiniteGradientError
from asyncmomentum.core import formulas
from asyncmomentum.core.tuning import rules


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _tuner_snapshot(opt):
    extra = opt.state_dict()["async_momentum"]
    est = extra["tracker"]["estimator"]
    return extra["tracker"]["clock"]["value"], est["count"], est["ema"], est["window"].tolist()


def _steps(model, opt, batches, staleness, start=0):
    for i, tau in enumerate(staleness):
        opt.zero_grad()
        _loss(model, batches[(start + i) % len(batches)]).backward()
        opt.step(staleness=int(tau))


def test_momentum_follows_measured_staleness(cnn_batches):
    model = make_cnn()
    opt = AsyncMomentumSGD(model.parameters(), lr=0.01, momentum=0.9, warmup=5, horizon=50)
    assert opt.algorithmic_momentum == pytest.approx(0.9)  # M = 1 before any staleness
    _steps(model, opt, cnn_batches, [19] * 100)  # M = 20
    assert opt.estimated_workers == pytest.approx(20)
    assert opt.implicit_momentum == pytest.approx(0.95)
    assert opt.algorithmic_momentum == pytest.approx(-0.05)
    # The group keeps the momentum the user tuned; the optimizer applies the tuned one.
    assert opt.param_groups[0]["momentum"] == 0.9
    assert opt.applied_momentum(opt.param_groups[0]) == opt.algorithmic_momentum
    assert opt.total_momentum == pytest.approx(0.9)
    assert opt.mean_staleness == pytest.approx(19)
    assert opt.last_staleness == 19


def test_staleness_is_measured_from_the_clock_between_zero_grad_and_step(cnn_batches):
    model = make_cnn()
    opt = AsyncMomentumSGD(model.parameters(), lr=0.01, warmup=0)
    opt.zero_grad()  # this "worker" reads version 0
    _loss(model, cnn_batches[0]).backward()
    for _ in range(3):  # three other updates land meanwhile
        opt.tracker.clock.tick()
    opt.step()
    assert opt.last_staleness == 3
    assert opt.tracker.clock.value == 4
    # Without zero_grad, staleness counts from this optimizer's own previous step.
    _loss(model, cnn_batches[1]).backward()
    opt.step()
    assert opt.last_staleness == 0


def test_per_group_targets_and_fixed_groups(cnn_batches):
    model = make_cnn()
    params = list(model.parameters())
    opt = AsyncMomentumSGD(
        [
            {"params": params[:2], "momentum": 0.95},
            {"params": params[2:4], "momentum": 0.5, "tune": False},
            {"params": params[4:]},
        ],
        lr=0.01,
        momentum=0.9,
        warmup=0,
    )
    _steps(model, opt, cnn_batches, [3] * 20)  # M = 4, implicit 0.75
    momenta = [opt.applied_momentum(g) for g in opt.param_groups]
    assert momenta == pytest.approx([0.2, 0.5, 0.15])


def test_compositional_rule_and_bounds(cnn_batches):
    model = make_cnn()
    opt = AsyncMomentumSGD(
        model.parameters(),
        lr=0.01,
        momentum=0.9,
        rule="compositional",
        momentum_bounds=(-0.3, 0.99),
        warmup=0,
    )
    _steps(model, opt, cnn_batches, [1] * 10)  # M = 2: 1 - 0.1 / 0.5 = 0.8
    assert opt.algorithmic_momentum == pytest.approx(0.8)
    _steps(model, opt, cnn_batches, [99] * 3000)  # M = 100: 1 - 0.1 / 0.01 = -9, clipped
    assert opt.algorithmic_momentum == -0.3


def test_closure_runs_before_the_momentum_is_read(cnn_batches):
    model = make_cnn()
    opt = AsyncMomentumSGD(model.parameters(), lr=0.01, warmup=0)
    seen = []

    def closure():
        opt.zero_grad()
        loss = _loss(model, cnn_batches[0])
        loss.backward()
        seen.append(opt.tracker.clock.value)
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert seen == [0]
    assert opt.tracker.clock.value == 1


@pytest.mark.parametrize("path", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_resume_is_bit_for_bit(path, cnn_batches):
    staleness = np.random.default_rng(0).geometric(1 / 6, size=200) - 1
    kwargs = dict(lr=0.02, momentum=0.9, warmup=10, horizon=40, **path)

    whole_model = make_cnn()
    whole = AsyncMomentumSGD(whole_model.parameters(), **kwargs)
    _steps(whole_model, whole, cnn_batches, staleness)

    first_model = make_cnn()
    first = AsyncMomentumSGD(first_model.parameters(), **kwargs)
    _steps(first_model, first, cnn_batches, staleness[:100])
    saved_model = copy.deepcopy(first_model.state_dict())
    saved_opt = pickle.loads(pickle.dumps(first.state_dict()))

    resumed_model = make_cnn(seed=99)
    resumed_model.load_state_dict(saved_model)
    resumed = AsyncMomentumSGD(resumed_model.parameters(), **kwargs)
    resumed.load_state_dict(saved_opt)
    _steps(resumed_model, resumed, cnn_batches, staleness[100:], start=100)

    for p, q in zip(whole_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert (
        resumed.state_dict()["async_momentum"]["tracker"]["estimator"]["ema"]
        == (whole.state_dict()["async_momentum"]["tracker"]["estimator"]["ema"])
    )
    assert resumed.tracker.clock.value == whole.tracker.clock.value == 200
    assert resumed.estimated_workers == whole.estimated_workers > 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"momentum": 1.0}, r"momentum.*\(-1, 1\)"),
        ({"momentum": -1.5}, r"momentum.*\(-1, 1\)"),
        ({"momentum": 1.0, "tune": False}, r"momentum.*\(-1, 1\)"),
        ({"lr": float("inf")}, "Invalid learning rate: inf"),
        ({"lr": "0.1"}, "lr must be a real number"),
        ({"momentum": True}, "momentum must be a real number"),
        ({"tune": 1}, "tune must be True or False"),
        ({"tune": False, "rule": "compositional"}, "tune=False fixes the momentum"),
        ({"tune": False, "workers": 4}, "tune=False fixes the momentum"),
        ({"differentiable": True}, "differentiable=True is not supported"),
        ({"momentum_bounds": (-1.0, 0.9)}, "momentum_bounds"),
        ({"momentum_bounds": (0.5, 0.1)}, "momentum_bounds"),
        ({"lr": -0.1}, "Invalid learning rate: -0.1"),
        ({"rule": "magic"}, "rule must be one of"),
        ({"nesterov": True, "momentum": 0.0}, "Nesterov momentum requires a momentum"),
        ({"nesterov": True, "momentum": -0.5}, "Nesterov momentum requires a momentum"),
        ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "zero dampening"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"horizon": 0}, "horizon"),
    ],
)
def test_bad_arguments_name_the_argument_and_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AsyncMomentumSGD(make_cnn().parameters(), **kwargs)


def test_fused_and_foreach_together_raise_as_torch_does():
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        AsyncMomentumSGD(make_cnn().parameters(), foreach=True, fused=True)


def test_a_bad_tensor_lr_is_refused_before_the_params():
    # torch checks its arguments before the parameters: a ValueError, not a TypeError.
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        AsyncMomentumSGD(None, lr=torch.tensor([0.001, 0.001]))


def test_the_literal_swap_tunes_keyword_and_positional(cnn_batches):
    for make in (
        lambda p: AsyncMomentumSGD(p, lr=0.01, momentum=0.9, warmup=0),
        lambda p: AsyncMomentumSGD(p, 0.01, 0.9, warmup=0),
    ):
        model = make_cnn()
        opt = make(model.parameters())
        _steps(model, opt, cnn_batches, [7] * 30)  # M = 8, implicit 0.875
        assert opt.algorithmic_momentum == pytest.approx(0.9 - 0.875)
        assert opt.total_momentum == pytest.approx(0.9)
    fixed_model = make_cnn()
    fixed = AsyncMomentumSGD(fixed_model.parameters(), 0.01, 0.9, tune=False, warmup=0)
    _steps(fixed_model, fixed, cnn_batches, [7] * 30)
    assert fixed.algorithmic_momentum == 0.9
    assert fixed.estimated_workers == pytest.approx(8)


def test_fused_on_unsupported_devices_raises_at_step_as_torch_does():
    param = nn.Parameter(torch.zeros(3, device="meta"))
    opt = AsyncMomentumSGD([param], lr=0.1, fused=True)  # torch accepts it here too
    param.grad = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match="`fused=True` requires"):
        opt.step()


@pytest.mark.parametrize("bad", [-1, 1.5, "2", np.float64(2.0)])
def test_bad_staleness_raises_and_changes_nothing(bad, cnn_batches):
    model = make_cnn()
    opt = AsyncMomentumSGD(model.parameters(), lr=0.1, warmup=0)
    _loss(model, cnn_batches[0]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="staleness must be a non-negative integer"):
        opt.step(staleness=bad)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.tracker.clock.value == 0
    assert opt.tracker.estimator.count == 0


@pytest.mark.parametrize("path", [{"foreach": False}, {"foreach": True}, {"fused": True}])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_and_leaves_everything_untouched(poison, path, cnn_batches):
    model = make_cnn()
    opt = AsyncMomentumSGD(model.parameters(), lr=0.1, warmup=0, **path)
    _steps(model, opt, cnn_batches, [2] * 5)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    tuner_before = _tuner_snapshot(opt)
    opt.zero_grad()
    _loss(model, cnn_batches[0]).backward()
    model.head.bias.grad[3] = poison
    with pytest.raises(NonFiniteGradientError, match=r"NaN or inf.*unchanged"):
        opt.step(staleness=7)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    after = opt.state_dict()
    for key, value in state["state"].items():
        assert torch.equal(value["momentum_buffer"], after["state"][key]["momentum_buffer"])
    assert _tuner_snapshot(opt) == tuner_before


def test_nonfinite_skip_mode_counts_and_skips(cnn_batches):
    model = make_cnn()
    opt = AsyncMomentumSGD(model.parameters(), lr=0.1, nonfinite="skip")
    _loss(model, cnn_batches[0]).backward()
    model.head.weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.skipped_steps == 1
    assert opt.tracker.clock.value == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_huge_but_finite_gradients_are_not_mistaken_for_nan():
    param = nn.Parameter(torch.zeros(4))
    opt = AsyncMomentumSGD([param], lr=1e-30, momentum=0.0, tune=False)
    param.grad = torch.full((4,), 3e38)  # the sum overflows, the values do not
    opt.step()
    assert torch.isfinite(param).all()
    assert opt.tracker.clock.value == 1


def test_checkpoints_from_elsewhere_are_refused_without_damage(cnn_batches):
    model = make_cnn()
    opt = AsyncMomentumSGD(model.parameters(), lr=0.1, warmup=0)
    _steps(model, opt, cnn_batches, [3] * 5)
    before = copy.deepcopy(opt.state_dict())
    tuner_before = _tuner_snapshot(opt)
    sgd_state = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()
    with pytest.raises(ValueError, match="not written by AsyncMomentumSGD"):
        opt.load_state_dict(sgd_state)
    future = copy.deepcopy(before)
    future["async_momentum"]["format"] = 99
    with pytest.raises(ValueError, match="format 99"):
        opt.load_state_dict(future)
    broken = copy.deepcopy(before)
    broken["async_momentum"]["tracker"]["estimator"]["format"] = 7
    with pytest.raises(ValueError, match="format"):
        opt.load_state_dict(broken)
    assert _tuner_snapshot(opt) == tuner_before


def test_works_with_lr_schedulers_and_is_picklable(cnn_batches):
    model = make_cnn()
    opt = AsyncMomentumSGD(model.parameters(), lr=0.1, warmup=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    for i in range(10):
        _steps(model, opt, cnn_batches, [1], start=i)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.estimated_workers == opt.estimated_workers == pytest.approx(2)
    assert clone.tracker.clock.value == 10
    assert clone.algorithmic_momentum == opt.algorithmic_momentum


def test_tuned_momentum_passing_through_zero_keeps_paths_consistent(cnn_batches):
    # At M = 10 the additive rule asks for exactly 0; all three paths must agree.
    results = []
    for path in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        model = make_cnn()
        opt = AsyncMomentumSGD(model.parameters(), lr=0.05, warmup=0, **path)
        _steps(model, opt, cnn_batches, [9] * 10 + [0] * 10)
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        for p, q in zip(results[0], other, strict=True):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert rules.algorithmic_momentum(0.9, formulas.implicit_momentum(10)) == pytest.approx(0.0)
