"""The local-SGD simulator and the pseudo-gradient pieces every local-SGD runtime shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.runtimes.local_sgd import (
    DelayedNesterov,
    LocalSGDProblem,
    apply_pseudo_gradient,
    check_sync_every,
    flat_parameters,
    pseudo_gradient,
    simulate_local_sgd,
)
from asyncmomentum.runtimes.local_sgd.simulate import worker_seed

DIM = 6


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(DIM, 1)


def _batches(seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    target = torch.arange(DIM, dtype=torch.float32)[:, None] / DIM
    while True:
        x = torch.randn(8, DIM, generator=gen)
        yield x, x @ target + 0.1 * torch.randn(8, 1, generator=gen)


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


_HELDOUT = next(_batches(12345))


def _heldout(model: nn.Module) -> float:
    return float(_loss(model, _HELDOUT))


PROBLEM = LocalSGDProblem("linear", _model, _loss, _batches, _heldout)


def _sgd(lr: float = 0.05) -> object:
    return lambda p: torch.optim.SGD(p, lr=lr)


def _outer_tuned(p: list[Tensor]) -> torch.optim.Optimizer:
    return AsyncMomentumSGD(p, lr=0.2, momentum=0.9, nesterov=True)


def test_a_seed_reproduces_bit_for_bit() -> None:
    kwargs = {
        "workers": 3,
        "outer": _outer_tuned,
        "inner": _sgd(),
        "sync_every": 4,
        "speeds": [1.0, 2.0, 4.0],
        "jitter": 0.3,
        "max_time": 40.0,
        "seed": 7,
    }
    a = simulate_local_sgd(PROBLEM, **kwargs)
    b = simulate_local_sgd(PROBLEM, **kwargs)
    assert a.losses == b.losses
    assert a.staleness == b.staleness
    assert a.pusher == b.pusher
    assert a.momentum == b.momentum
    assert torch.equal(a.final_params, b.final_params)
    c = simulate_local_sgd(PROBLEM, **{**kwargs, "seed": 8})
    assert not torch.equal(a.final_params, c.final_params)


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_equal_speeds_take_turns_with_staleness_m_minus_1(workers: int) -> None:
    h = simulate_local_sgd(
        PROBLEM, workers=workers, outer=_sgd(0.5), inner=_sgd(), sync_every=2, max_updates=40
    )
    assert h.staleness[:workers] == list(range(workers))
    assert h.staleness[workers:] == [workers - 1] * (len(h.staleness) - workers)
    assert h.pusher == [i % workers for i in range(len(h.pusher))]
    assert len(h.staleness) == 40


def test_faster_workers_push_more() -> None:
    h = simulate_local_sgd(
        PROBLEM,
        workers=3,
        outer=_sgd(0.5),
        inner=_sgd(),
        sync_every=2,
        speeds=[1.0, 2.0, 4.0],
        max_time=40.0,
    )
    slow, middle, fast = h.pushes_per_worker
    assert slow < middle < fast
    assert fast == pytest.approx(4 * slow, abs=1)
    # The slow worker's pushes are the stalest.
    stale = {i: [t for t, w in zip(h.staleness, h.pusher, strict=True) if w == i] for i in range(3)}
    assert max(stale[0]) > max(stale[2])


def test_synchronous_diloco_with_one_worker_and_one_step_is_sgd() -> None:
    a, seed = 0.05, 3
    h = simulate_local_sgd(
        PROBLEM,
        workers=1,
        outer=lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.0),
        inner=_sgd(a),
        sync_every=1,
        synchronous=True,
        max_updates=25,
        seed=seed,
    )
    model = _model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=a)
    batches = _batches(worker_seed(seed, 0))
    for _ in range(25):
        opt.zero_grad()
        _loss(model, next(batches)).backward()
        opt.step()
    assert h.updates[-1] == 25
    assert torch.allclose(h.final_params, flat_parameters(model), rtol=0, atol=1e-6)
    assert h.staleness == [0] * 25


def test_synchronous_averages_and_waits_for_the_slowest() -> None:
    h = simulate_local_sgd(
        PROBLEM,
        workers=3,
        outer=_sgd(0.5),
        inner=_sgd(),
        sync_every=2,
        speeds=[1.0, 2.0, 4.0],
        synchronous=True,
        max_time=20.0,
    )
    # A round lasts H / slowest speed = 2: ten rounds in 20 time units, everyone pushes each.
    assert h.updates[-1] == 10
    assert h.pushes_per_worker == [10, 10, 10]


def _outer_state(opt: torch.optim.Optimizer) -> dict:
    return {k: v.clone() for k, v in opt.state_dict()["state"].get(0, {}).items()}


@pytest.mark.parametrize(
    "delta",
    [torch.zeros(DIM), torch.zeros(DIM + 2), torch.zeros(1, DIM + 1)],
    ids=["short", "long", "not-flat"],
)
def test_a_pseudo_gradient_of_the_wrong_size_is_refused(delta: Tensor) -> None:
    _check_refused(delta, "flat vector")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_pseudo_gradient_is_refused(bad: float) -> None:
    delta = torch.ones(DIM + 1)
    delta[2] = bad
    _check_refused(delta, "non-finite")


def _check_refused(delta: Tensor, message: str) -> None:
    model = _model(0)
    params = list(model.parameters())
    outer = AsyncMomentumSGD(params, lr=0.1, momentum=0.9, nesterov=True)
    apply_pseudo_gradient(outer, params, torch.ones(DIM + 1), staleness=0)
    outer.zero_grad(set_to_none=True)
    before = flat_parameters(params)
    state = outer.state_dict()
    with pytest.raises(ValueError, match=message):
        apply_pseudo_gradient(outer, params, delta, staleness=1)
    assert torch.equal(flat_parameters(params), before)
    assert all(p.grad is None for p in params)
    after = outer.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for key, value in state["state"].items():
        for name, tensor in value.items():
            other = after["state"][key][name]
            assert torch.equal(other, tensor) if isinstance(tensor, Tensor) else other == tensor


def test_pseudo_gradient_is_read_minus_after() -> None:
    model = _model(0)
    read = flat_parameters(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    delta = pseudo_gradient(read, model)
    assert torch.allclose(delta[:DIM], -torch.ones(DIM))
    assert torch.equal(delta[DIM:], torch.zeros(1))
    with pytest.raises(ValueError, match="same flat size"):
        pseudo_gradient(read[:-1], model)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_sync_every_below_one_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="sync_every"):
        check_sync_every(bad)
    built = []

    def outer(p: list[Tensor]) -> torch.optim.Optimizer:
        built.append(p)
        return torch.optim.SGD(p, lr=0.1)

    with pytest.raises(ValueError, match="sync_every"):
        simulate_local_sgd(PROBLEM, workers=2, outer=outer, sync_every=bad, max_updates=3)
    assert not built  # refused before anything ran
    assert check_sync_every(3) == 3


def test_an_outer_optimizer_over_other_parameters_is_refused() -> None:
    model, other = _model(0), _model(1)
    params = list(model.parameters())
    wrong = torch.optim.SGD(other.parameters(), lr=0.1)
    before = flat_parameters(params)
    with pytest.raises(ValueError, match="global parameters"):
        apply_pseudo_gradient(wrong, params, torch.ones(DIM + 1))
    assert torch.equal(flat_parameters(params), before)
    assert all(p.grad is None for p in params)
    partial = torch.optim.SGD([params[0]], lr=0.1)
    with pytest.raises(ValueError, match="global parameters"):
        apply_pseudo_gradient(partial, params, torch.ones(DIM + 1))
    with pytest.raises(ValueError, match="global parameters"):
        simulate_local_sgd(
            PROBLEM,
            workers=2,
            outer=lambda p: torch.optim.SGD(other.parameters(), lr=0.1),
            max_updates=3,
        )


@pytest.mark.parametrize("workers", [2, 4, 8])
def test_tuned_outer_momentum_under_round_robin(workers: int) -> None:
    h = simulate_local_sgd(
        PROBLEM,
        workers=workers,
        outer=lambda p: AsyncMomentumSGD(
            p, lr=0.05, momentum=0.9, nesterov=True, rule="additive", horizon=50
        ),
        inner=_sgd(0.01),
        sync_every=1,
        max_updates=400,
    )
    assert h.momentum[-1] == pytest.approx(0.9 - (1 - 1 / workers), abs=0.01)
    fixed = simulate_local_sgd(
        PROBLEM,
        workers=workers,
        outer=lambda p: AsyncMomentumSGD(p, lr=0.05, momentum=0.9, nesterov=True, tune=False),
        inner=_sgd(0.01),
        sync_every=1,
        max_updates=50,
    )
    assert fixed.momentum[-1] == pytest.approx(0.9)


def test_delayed_nesterov_with_a_buffer_of_one_is_nesterov() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(DIM + 1) for _ in range(12)]
    a, b = _model(0), _model(0)
    dn = DelayedNesterov(list(a.parameters()), lr=0.1, momentum=0.9, buffer=1)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for g in grads:
        apply_pseudo_gradient(dn, list(a.parameters()), g, staleness=0)
        apply_pseudo_gradient(sgd, list(b.parameters()), g)
    assert torch.allclose(flat_parameters(a), flat_parameters(b), atol=1e-6)


def test_delayed_nesterov_is_one_nesterov_step_per_buffer() -> None:
    # N pushes with c = 1/N move the weights by one Nesterov step on their mean.
    torch.manual_seed(1)
    grads = [torch.randn(DIM + 1) for _ in range(12)]
    a, b = _model(0), _model(0)
    dn = DelayedNesterov(list(a.parameters()), lr=0.1, momentum=0.9, buffer=4)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for start in range(0, 12, 4):
        for g in grads[start : start + 4]:
            apply_pseudo_gradient(dn, list(a.parameters()), g, staleness=3)
        apply_pseudo_gradient(
            sgd, list(b.parameters()), torch.stack(grads[start : start + 4]).mean(0)
        )
        assert torch.allclose(flat_parameters(a), flat_parameters(b), atol=1e-6)
    assert dn.applied_momentum == pytest.approx(0.9)
    with pytest.raises(ValueError, match="buffer"):
        DelayedNesterov(list(a.parameters()), lr=0.1, buffer=0)
