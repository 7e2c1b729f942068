"""The non-finite gradient guarantee when the check runs during backward (GradientWatch)."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.core import finite_gradients
from asyncmomentum.core.finite_gradients import WATCH_MIN_ELEMENTS, GradientWatch
from asyncmomentum.core.optimizer import NonFiniteGradientError


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # 256 x 512 = 131072 weights: hooked; the bias (512) is checked at the step.
    return nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 3))


def _backward(model: nn.Module, scale: float = 1.0, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(8, 256, generator=gen) * scale
    model(inputs).square().mean().backward()


def _snapshot(model: nn.Module, optimizer: AsyncMomentumSGD) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for state in optimizer.state.values():
        tensors.append(state["momentum_buffer"].clone())
    return tensors


def _unchanged(before: list[torch.Tensor], model: nn.Module, opt: AsyncMomentumSGD) -> bool:
    after = _snapshot(model, opt)
    return len(before) == len(after) and all(
        torch.equal(a, b) for a, b in zip(before, after, strict=True)
    )


def _trained_pair() -> tuple[nn.Module, AsyncMomentumSGD]:
    model = _model()
    opt = AsyncMomentumSGD(model.parameters(), lr=0.1, momentum=0.9)
    _backward(model)
    opt.step()  # momentum buffers exist from here on
    opt.zero_grad()
    return model, opt


def test_only_large_parameters_are_hooked() -> None:
    model = _model()
    opt = AsyncMomentumSGD(model.parameters(), lr=0.1, momentum=0.9)
    hooked = [bool(p._post_accumulate_grad_hooks) for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    assert hooked == [n >= WATCH_MIN_ELEMENTS for n in sizes]
    assert hooked[0]
    assert not hooked[1]
    assert opt.param_groups[0]["params"][0] is next(model.parameters())


def test_backward_gradients_are_not_read_again_at_the_step(monkeypatch) -> None:
    model, opt = _trained_pair()
    seen: list[int] = []
    real = finite_gradients._all_finite

    def spy(grads, *rest):
        seen.extend(g.numel() for g in grads)
        return real(grads, *rest)

    monkeypatch.setattr(finite_gradients, "_all_finite", spy)
    _backward(model)
    opt.step()
    # The hooked weight (131072 elements) was summed during backward; only small ones remain.
    assert seen
    assert max(seen) < WATCH_MIN_ELEMENTS
    assert sum(seen) == sum(p.numel() for p in model.parameters() if p.numel() < WATCH_MIN_ELEMENTS)


def test_nan_from_backward_changes_nothing() -> None:
    model, opt = _trained_pair()
    version = opt.tracker.clock.value
    _backward(model, scale=math.nan)
    before = _snapshot(model, opt)
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert _unchanged(before, model, opt)
    assert opt.tracker.clock.value == version


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda g: g.mul_(math.inf), id="in-place-after-backward"),
        pytest.param(lambda g: g.view(-1)[7].fill_(math.nan), id="one-value-through-a-view"),
        pytest.param(
            lambda g: (
                torch.nn.utils.clip_grad_norm_([g.new_zeros(1, requires_grad=True)], 1.0)
                or g.copy_(torch.full_like(g, math.nan))
            ),
            id="copied-over",
        ),
    ],
)
def test_gradient_changed_after_backward_is_checked_again(spoil) -> None:
    model, opt = _trained_pair()
    _backward(model)
    weight = next(model.parameters())
    spoil(weight.grad)
    before = _snapshot(model, opt)
    with pytest.raises(NonFiniteGradientError, match="parameter 0"):
        opt.step()
    assert _unchanged(before, model, opt)


def test_gradient_replaced_by_hand_after_backward_is_checked() -> None:
    model, opt = _trained_pair()
    _backward(model)
    weight = next(model.parameters())
    weight.grad = torch.full_like(weight, math.nan)
    before = _snapshot(model, opt)
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert _unchanged(before, model, opt)


def test_accumulated_nan_is_caught() -> None:
    model, opt = _trained_pair()
    _backward(model, scale=math.nan)
    _backward(model)  # accumulates onto the NaN gradient
    before = _snapshot(model, opt)
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert _unchanged(before, model, opt)


def test_discarded_nan_gradient_does_not_refuse_a_good_step() -> None:
    model = _model()
    opt = AsyncMomentumSGD(model.parameters(), lr=0.1, momentum=0.9, tune=False, foreach=False)
    _backward(model)
    opt.step()
    opt.zero_grad()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, foreach=False)
    ref_opt.load_state_dict(
        {
            "state": {
                i: {"momentum_buffer": opt.state[p]["momentum_buffer"].clone()}
                for i, p in enumerate(model.parameters())
            },
            "param_groups": [{**ref_opt.param_groups[0], "params": list(range(4))}],
        }
    )
    _backward(model, scale=math.nan)
    model.zero_grad()  # the NaN gradients are dropped, their sums are still pending
    _backward(model)
    _backward(reference)
    opt.step()
    ref_opt.step()
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_skipped_step_stays_skipped_when_repeated() -> None:
    model = _model()
    opt = AsyncMomentumSGD(model.parameters(), lr=0.1, momentum=0.9, nonfinite="skip")
    _backward(model, scale=math.nan)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    opt.step()  # the same NaN gradients again, with no backward in between
    assert opt.skipped_steps == 2
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_does_not_trust_the_original_watch(how: str) -> None:
    model, opt = _trained_pair()
    _backward(model, scale=math.nan)  # marked and summed by the original's watch, not checked
    pair = {"model": model, "opt": opt}
    copied = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    for ours, theirs in zip(model.parameters(), copied["model"].parameters(), strict=True):
        theirs.grad = ours.grad  # the very tensors, marks included
    with pytest.raises(NonFiniteGradientError):
        copied["opt"].step()
    # The copy watches its own parameters from then on.
    copied["opt"].zero_grad()
    _backward(copied["model"], scale=math.nan)
    with pytest.raises(NonFiniteGradientError):
        copied["opt"].step()


def test_many_backward_passes_without_a_step_keep_a_nan() -> None:
    watch = GradientWatch(min_elements=1)
    param = nn.Parameter(torch.zeros(4))
    watch.watch([param])
    param.sum().mul(math.nan).backward()
    for _ in range(finite_gradients._MAX_PENDING + 10):
        param.sum().backward()
    assert not watch.pending_finite()


def test_float16_gradients_whose_sum_overflows_are_applied() -> None:
    param = nn.Parameter(torch.zeros(WATCH_MIN_ELEMENTS, dtype=torch.float16))
    opt = AsyncMomentumSGD([param], lr=1e-6, momentum=0.0, tune=False, foreach=True)
    (param.float() * 1000.0).sum().backward()  # every gradient 1000: the sum is 6.5e7 > 65504
    opt.step()
    assert bool(torch.isfinite(param).all())
    assert float(param.detach()[0]) != 0.0


def test_an_optimizer_that_is_gone_leaves_no_hook() -> None:
    import gc

    model = _model()
    weight = next(model.parameters())
    for _ in range(3):  # a new optimizer per trial, as a learning-rate finder makes them
        AsyncMomentumSGD(model.parameters(), lr=0.1, momentum=0.9)
    gc.collect()
    assert not weight._post_accumulate_grad_hooks
    opt = AsyncMomentumSGD(model.parameters(), lr=0.1, momentum=0.9)
    assert len(weight._post_accumulate_grad_hooks) == 1
    _backward(model, scale=math.nan)
    with pytest.raises(NonFiniteGradientError):
        opt.step()


@pytest.mark.parametrize("path", [{}, {"fused": True}, {"foreach": True}, {"foreach": False}])
def test_the_stated_limit_a_write_through_data_after_backward_is_not_seen(path):
    # README ("Bad input") and AsyncMomentumSGD's docstring state this limit: if a change makes
    # the write below caught, update both (the promise then holds without it).

    layer = torch.nn.Linear(256, 256)  # 65,536 elements: checked by a sum taken in backward
    opt = AsyncMomentumSGD(layer.parameters(), lr=0.1, momentum=0.9, nonfinite="skip", **path)
    opt.zero_grad()
    layer(torch.randn(4, 256)).sum().backward()
    layer.weight.grad.data[0, 0] = float("nan")  # not versioned by torch
    opt.step(staleness=0)
    assert opt.skipped_steps == 0
    assert not torch.isfinite(layer.weight).all()
    # The same write in place is versioned, so the step sees it and changes nothing.
    opt.zero_grad()
    layer = torch.nn.Linear(256, 256)
    opt = AsyncMomentumSGD(layer.parameters(), lr=0.1, momentum=0.9, nonfinite="skip", **path)
    layer(torch.randn(4, 256)).sum().backward()
    layer.weight.grad[0, 0] = float("nan")
    before = layer.weight.detach().clone()
    opt.step(staleness=0)
    assert opt.skipped_steps == 1
    assert torch.equal(layer.weight, before)


# -- the squared norms the check reads on the way (the auto rule's gradient-norm feed) -----------


def _fed_norms(opt: AsyncMomentumSGD) -> list[float]:
    """Record every squared gradient norm the optimizer hands its auto rule."""
    fed: list[float] = []
    rule = opt.tracker.rule
    observe = rule.observe_gradient_norm

    def spy(squared_norm: float) -> None:
        fed.append(squared_norm)
        observe(squared_norm)

    rule.observe_gradient_norm = spy  # type: ignore[method-assign]
    return fed


def _squared_norm(model: nn.Module) -> float:
    return sum(float(p.grad.double().square().sum()) for p in model.parameters())


def test_check_reads_the_squared_norm_of_every_dense_gradient_when_asked() -> None:
    model = _model()
    params = list(model.parameters())
    watch = GradientWatch()
    watch.watch(params)
    _backward(model)
    grads = [p.grad for p in params]
    checked = finite_gradients.check_gradients([(params, grads, [])], watch, norms=True)
    assert checked.nonfinite is None
    assert checked.grads == grads
    # The hooked weight (131072 values) was summed in backward, the three small gradients
    # flattened together at the step: every one read, in two parts.
    assert checked.read == [True] * len(grads)
    hooked = float(grads[0].square().sum())
    small = float(sum(g.square().sum() for g in grads[1:]))
    parts = sorted(float(part) for part in checked.squared_norm_parts)
    assert parts == pytest.approx(sorted([hooked, small]), rel=1e-5)
    # Not asked: nothing is collected, and torch's fused check reads the small ones.
    _backward(model)
    checked = finite_gradients.check_gradients([(params, grads, [])], watch)
    assert checked.read == [False] * len(grads)
    assert checked.squared_norm_parts == []
    # Unwatched and past the fused check's size: read whole at the step, one by one.
    big = [torch.randn(600, 1000), torch.randn(700, 1000)]
    checked = finite_gradients.check_gradients([(big, big, [])], norms=True)
    assert checked.read == [True, True]
    for grad, total in zip(big, checked.squared_norm_parts, strict=True):
        # Two float32 sums of 600,000 squares, accumulated in different orders (by the CPU's
        # kernels): each within about 1e-6 of the exact one, so compared with the exact one.
        exact = grad.double().square().sum()
        torch.testing.assert_close(total.double(), exact, rtol=1e-5, atol=0.0)


def test_a_nonfinite_small_gradient_fails_the_flattened_sum() -> None:
    small = [torch.ones(10), torch.ones(3, 4)]
    small[1][2, 3] = float("inf")
    checked = finite_gradients.check_gradients([(small, small, [])], norms=True)
    assert checked.nonfinite == (0, 1, torch.Size([3, 4]))
    assert checked.squared_norm_parts == []


@pytest.mark.parametrize("accumulate", [False, True])
def test_auto_rule_is_fed_the_full_squared_norm_of_a_large_model(accumulate: bool) -> None:
    model = _model()
    opt = AsyncMomentumSGD(model.parameters(), lr=1e-3, momentum=0.9, rule="auto")
    fed = _fed_norms(opt)
    _backward(model)
    if accumulate:  # the hook fires twice: the norm is the accumulated gradient's, once
        _backward(model, seed=2)
    expected = _squared_norm(model)
    opt.step(staleness=0)
    assert len(fed) == 1
    assert fed[0] == pytest.approx(expected, rel=1e-5)


def test_a_gradient_changed_after_its_sum_is_not_fed_the_stale_sum() -> None:
    model = _model()
    opt = AsyncMomentumSGD(model.parameters(), lr=1e-3, momentum=0.9, rule="auto")
    fed = _fed_norms(opt)
    _backward(model)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)  # in place, after the hook
    # Now under the fused check's size: read again at the step, whole.
    expected = _squared_norm(model)
    opt.step(staleness=0)
    assert fed == [pytest.approx(expected, rel=1e-5)]
    assert expected == pytest.approx(0.01**2, rel=1e-3)  # clipped: the stale sum is far above


def test_auto_rule_is_fed_the_norm_of_a_sparse_gradient_with_repeated_indices() -> None:
    embedding = nn.Embedding(100, 8, sparse=True)
    opt = AsyncMomentumSGD(embedding.parameters(), lr=1e-3, momentum=0.0, rule="auto")
    fed = _fed_norms(opt)
    embedding(torch.tensor([1, 2, 2, 2])).square().sum().backward()
    grad = embedding.weight.grad
    assert grad.is_sparse
    assert not grad.is_coalesced()  # row 2 appears three times
    dense = grad.to_dense()
    opt.step(staleness=0)
    # The norm of the gradient, not the sum of its repeated entries' squares.
    assert fed == [pytest.approx(float(dense.double().square().sum()), rel=1e-5)]
    assert fed[0] != pytest.approx(float(grad._values().double().square().sum()), rel=1e-3)
