"""Tests of the staleness models and the stale-gradient simulator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_cnn
from torch import nn

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.runtimes.simulate import (
    STALENESS_MODELS,
    History,
    SnapshotRing,
    StalenessModel,
    geometric,
    round_robin,
    simulate,
    staleness_model,
    workers,
)

DRAWS = 20_000


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run each test on one torch thread: tiny models gain nothing from threads.

    On a shared 2-core machine the spinning of idle OpenMP threads makes them many times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def histogram(draws: np.ndarray, size: int) -> np.ndarray:
    """Empirical probabilities of 0 .. size - 1 (draws beyond are counted at the last level)."""
    return np.bincount(np.minimum(draws, size - 1), minlength=size) / draws.size


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    size = max(p.size, q.size)
    return 0.5 * float(np.abs(np.pad(p, (0, size - p.size)) - np.pad(q, (0, size - q.size))).sum())


def geometric_pmf(q: float, size: int) -> np.ndarray:
    """``(1 - q) q^l`` for l < size - 1, the last level holding the rest of the tail."""
    pmf = (1.0 - q) * q ** np.arange(size, dtype=np.float64)
    pmf[-1] = q ** (size - 1)
    return pmf


def mixture_pmf(rates: list[float], size: int) -> np.ndarray:
    """The documented prediction for the worker queue: ``sum_i p_i^2 (1 - p_i)^l``."""
    shares = np.asarray(rates, dtype=np.float64) / sum(rates)
    return sum(share * geometric_pmf(1.0 - share, size) for share in shares)


# -- staleness models ---------------------------------------------------------------------------


@pytest.mark.parametrize("M", [2, 4, 8, 16])
def test_equal_rate_workers_give_geometric_staleness(M: int) -> None:
    draws = workers(M).sample(DRAWS, seed=M)
    assert abs(draws.mean() - (M - 1)) <= 0.05 * (M - 1)
    size = int(draws.max()) + 1
    assert total_variation(histogram(draws, size), geometric_pmf(1 - 1 / M, size)) < 0.05


def test_straggler_gives_the_predicted_mixture_not_a_geometric() -> None:
    rates = [1.0, 1.0, 1.0, 0.1]
    model = workers(4, rates)
    draws = model.sample(DRAWS, seed=3)
    size = model.max_staleness + 1
    observed = histogram(draws, size)
    # Same mean as four equal workers...
    assert abs(draws.mean() - 3.0) <= 0.05 * 3.0
    # ...but the documented mixture, which is far from the geometric of the same mean.
    assert total_variation(observed, mixture_pmf(rates, size)) < 0.05
    assert total_variation(observed, geometric_pmf(0.75, size)) > 0.08
    # The heavier far tail: P(tau >= 40) is ~9e-3 against ~1e-5 for the geometric.
    assert (draws >= 40).mean() > 100 * 0.75**40
    np.testing.assert_allclose(model.pmf(), mixture_pmf(rates, size), rtol=1e-12, atol=1e-15)
    assert model.expected_mean() == pytest.approx(3.0, rel=1e-4)


def test_worker_queue_start_up_never_exceeds_the_updates_so_far() -> None:
    draws = workers(8, [1, 2, 3, 4, 5, 6, 7, 0.5]).sample(2_000, seed=0)
    assert np.all(draws <= np.arange(draws.size))
    assert draws[0] == 0


@pytest.mark.parametrize("q", [0.0, 0.3, 0.875])
def test_geometric_matches_its_pmf(q: float) -> None:
    model = geometric(q)
    draws = model.sample(DRAWS, seed=1)
    size = model.max_staleness + 1
    assert draws.max() <= model.max_staleness
    assert total_variation(histogram(draws, size), geometric_pmf(q, size)) < 0.03
    assert model.expected_mean() == pytest.approx(q / (1 - q), abs=1e-5)
    assert abs(draws.mean() - q / (1 - q)) <= 0.05 * max(q / (1 - q), 0.01)
    assert model.workers == pytest.approx(1 / (1 - q))


def test_geometric_default_cap_is_the_one_in_a_million_quantile() -> None:
    cap = geometric(0.9).max_staleness
    assert 0.9 ** (cap + 1) <= 1e-6 < 0.9**cap
    capped = geometric(0.9, max_staleness=5)
    assert capped.sample(5_000, seed=0).max() == 5
    assert capped.pmf().sum() == pytest.approx(1.0)


@pytest.mark.parametrize("M", [1, 2, 5])
def test_round_robin_is_always_m_minus_one(M: int) -> None:
    model = round_robin(M)
    assert set(model.sample(100, seed=0).tolist()) == {M - 1}
    assert model.max_staleness == M - 1
    assert model.expected_mean() == M - 1


def test_streams_are_deterministic_per_seed() -> None:
    for model in (geometric(0.8), workers(6, [1, 1, 2, 2, 3, 0.2])):
        assert np.array_equal(model.sample(500, seed=7), model.sample(500, seed=7))
        assert not np.array_equal(model.sample(500, seed=7), model.sample(500, seed=8))
        from_generator = model.sample(500, np.random.default_rng(7))
        assert np.array_equal(from_generator, model.sample(500, np.random.default_rng(7)))


def test_staleness_model_by_name() -> None:
    assert STALENESS_MODELS == ("geometric", "exponential", "round_robin")
    for name in STALENESS_MODELS:
        model = staleness_model(name, 4)
        assert isinstance(model, StalenessModel)
        assert model.name == name
        assert model.workers == 4
        assert model.expected_mean() == pytest.approx(3.0, rel=1e-4)
    assert staleness_model("geometric", 4).q == 0.75


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: geometric(-0.1), "must be a number in"),
        (lambda: geometric(1.0), "must be a number in"),
        (lambda: geometric(math.nan), "must be a number in"),
        (lambda: geometric(0.5, max_staleness=-1), "max_staleness"),
        (lambda: workers(0), "number of workers"),
        (lambda: workers(2.5), "number of workers"),
        (lambda: workers(2, [1.0]), "rates must hold"),
        (lambda: workers(2, [1.0, 0.0]), "each rate"),
        (lambda: workers(2, [1.0, -1.0]), "each rate"),
        (lambda: workers(2, [1.0, math.inf]), "each rate"),
        (lambda: round_robin(0), "number of workers"),
        (lambda: staleness_model("poisson", 4), "staleness model must be one of"),
        (lambda: staleness_model("geometric", 0), "workers must be an integer"),
        (lambda: geometric(0.5).sample(-1, seed=0), "^n must be"),
        (lambda: geometric(0.5).sample(3, seed=-1), "seed"),
    ],
)
def test_bad_model_arguments_raise_value_error(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()


# -- the snapshot ring --------------------------------------------------------------------------


def test_snapshot_ring_wraps_and_restores() -> None:
    a = torch.zeros(2, 3)
    b = torch.zeros(4, dtype=torch.float64)
    c = torch.zeros(3, 2).t()  # not contiguous
    ring = SnapshotRing([a, b, c], capacity=3)
    for value in range(5):
        for t in (a, b, c):
            t.fill_(value)
        ring.push()
    assert len(ring) == 3
    assert ring.pushed == 5
    oldest = ring.snapshot(2)
    assert [s.shape for s in oldest] == [a.shape, b.shape, c.shape]
    assert all(bool((s == 2).all()) for s in oldest)
    assert [row[0].item() for row in ring.flat(1)] == [3.0, 3.0]
    with ring.stale(2):
        assert all(bool((t == 2).all()) for t in (a, b, c))
    assert all(bool((t == 4).all()) for t in (a, b, c))
    with pytest.raises(RuntimeError), ring.stale(1):
        raise RuntimeError("the block failed")
    assert all(bool((t == 4).all()) for t in (a, b, c))
    with pytest.raises(ValueError, match="age"):
        ring.load(3)
    assert ring.is_finite(0)
    b[1] = math.nan
    ring.push()
    assert not ring.is_finite(0)
    assert ring.is_finite(1)


def test_snapshot_ring_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one tensor"):
        SnapshotRing([], capacity=2)
    with pytest.raises(ValueError, match="capacity"):
        SnapshotRing([torch.zeros(1)], capacity=0)
    with pytest.raises(ValueError, match="push"):
        SnapshotRing([torch.zeros(1)], capacity=2).load(0)


# -- the simulator ------------------------------------------------------------------------------


def quadratic_problem() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    hessian = basis @ basis.T / 5 + 0.5 * torch.eye(5, dtype=torch.float64)
    return hessian, torch.randn(5, generator=gen, dtype=torch.float64)


class Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(5, dtype=torch.float64))


def run_quadratic(staleness: StalenessModel, steps: int, lr: float) -> tuple[torch.Tensor, History]:
    hessian, target = quadratic_problem()
    model = Quadratic()

    def loss_fn(m: Quadratic, _batch: object) -> torch.Tensor:
        return 0.5 * m.w @ hessian @ m.w - target @ m.w

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    history = simulate(model, loss_fn, [None], opt, staleness, steps, seed=5)
    return model.w.detach().clone(), history


def delayed_gradient_descent(taus: list[int], lr: float) -> torch.Tensor:
    """``w_{t+1} = w_t - lr * grad(w_{t - tau_t})`` written out by hand."""
    hessian, target = quadratic_problem()
    iterates = [torch.zeros(5, dtype=torch.float64)]
    for t, tau in enumerate(taus):
        stale = iterates[t - tau]
        iterates.append(iterates[t] - lr * (hessian @ stale - target))
    return iterates[-1]


def test_simulator_applies_gradients_of_stale_parameters() -> None:
    lr, steps = 0.05, 60
    w_async, history = run_quadratic(round_robin(4), steps, lr)
    assert history.staleness == [0, 1, 2] + [3] * (steps - 3)
    torch.testing.assert_close(
        w_async, delayed_gradient_descent(history.staleness, lr), rtol=1e-12, atol=1e-12
    )
    w_sync, sync_history = run_quadratic(round_robin(1), steps, lr)
    assert set(sync_history.staleness) == {0}
    assert not torch.allclose(w_async, w_sync, rtol=1e-6, atol=1e-6)


def test_simulator_follows_random_staleness_through_the_ring_wrap() -> None:
    lr, steps = 0.05, 80
    w_async, history = run_quadratic(geometric(0.6, max_staleness=4), steps, lr)
    assert max(history.staleness) == 4
    assert len(set(history.staleness)) == 5
    assert all(tau <= t for t, tau in enumerate(history.staleness))
    torch.testing.assert_close(
        w_async, delayed_gradient_descent(history.staleness, lr), rtol=1e-12, atol=1e-12
    )


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("M", [4, 8])
def test_async_momentum_sgd_estimates_the_simulated_workers(M: int) -> None:
    gen = torch.Generator().manual_seed(M)
    data = [(torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen))]
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    opt = AsyncMomentumSGD(model.parameters(), lr=0.02, momentum=0.9, warmup=0, horizon=300)
    history = simulate(model, cross_entropy, data, opt, workers(M), steps=1500, seed=M)
    assert not history.diverged
    assert len(history) == 1500
    assert opt.tracker.estimator.count == 1500
    assert history.estimated_workers[-1] == pytest.approx(M, rel=0.1)
    assert history.implicit_momentum[-1] == pytest.approx(1 - 1 / M, abs=0.02)
    assert history.algorithmic_momentum[-1] == pytest.approx(0.9 - (1 - 1 / M), abs=0.02)
    assert history.estimated_workers[0] < 1.5  # the first gradients are fresh


def dropout_cnn_run(cnn_batches, seed: int) -> History:
    model = nn.Sequential(make_cnn(seed=1), nn.Dropout(0.3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*map(torch.cat, zip(*cnn_batches, strict=True))),
        batch_size=16,
        shuffle=True,
    )
    rng_before = torch.get_rng_state()
    history = simulate(model, cross_entropy, loader, opt, workers(4), steps=25, seed=seed)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    return history


def test_same_seed_same_history_bit_for_bit(cnn_batches) -> None:
    first = dropout_cnn_run(cnn_batches, seed=11)
    second = dropout_cnn_run(cnn_batches, seed=11)
    assert first == second
    other = dropout_cnn_run(cnn_batches, seed=12)
    assert other.staleness != first.staleness
    assert other.loss != first.loss


def test_history_rows_and_on_step(cnn_batches) -> None:
    model = make_cnn()
    opt = AsyncMomentumSGD(model.parameters(), lr=0.05, warmup=0)
    seen: list[tuple[int, int]] = []
    history = simulate(
        model,
        cross_entropy,
        cnn_batches,
        opt,
        geometric(0.5),
        steps=12,
        on_step=lambda step, h: seen.append((step, len(h))),
    )
    assert seen == [(t, t + 1) for t in range(12)]
    rows = history.to_rows()
    assert len(rows) == 12
    assert rows[5] == {
        "step": 5,
        "loss": history.loss[5],
        "staleness": history.staleness[5],
        "algorithmic_momentum": history.algorithmic_momentum[5],
        "implicit_momentum": history.implicit_momentum[5],
        "estimated_workers": history.estimated_workers[5],
    }


def test_plain_optimizer_reports_the_nominal_workers() -> None:
    _, history = run_quadratic(workers(5), steps=10, lr=0.01)
    assert history.estimated_workers == [5.0] * 10
    assert history.implicit_momentum == [pytest.approx(0.8)] * 10
    assert history.algorithmic_momentum == [0.0] * 10  # torch.optim.SGD's default momentum


def test_finite_re_iterable_batches_are_cycled_in_order() -> None:
    seen: list[int] = []

    def loss_fn(m: Quadratic, batch: int) -> torch.Tensor:
        seen.append(batch)
        return m.w.square().sum()

    model = Quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    simulate(model, loss_fn, [0, 1, 2], opt, round_robin(2), steps=7)
    assert seen == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="ran out"):
        simulate(model, loss_fn, iter([0, 1]), opt, round_robin(2), steps=3)
    with pytest.raises(ValueError, match="empty"):
        simulate(model, loss_fn, [], opt, round_robin(2), steps=3)


def nan_after(steps: int):
    """A loss that turns NaN at its ``steps``-th call."""
    calls = [0]

    def loss_fn(m: Quadratic, _batch: object) -> torch.Tensor:
        calls[0] += 1
        loss = (m.w - 1).square().sum()
        return loss * math.nan if calls[0] > steps else loss

    return loss_fn


def nan_gradient_after(steps: int):
    """A finite loss whose gradient turns NaN at its ``steps``-th call (sqrt at 0)."""
    calls = [0]

    def loss_fn(m: Quadratic, _batch: object) -> torch.Tensor:
        calls[0] += 1
        loss = (m.w - 1).square().sum()
        return loss + (m.w - m.w.detach()).sqrt().sum() if calls[0] > steps else loss

    return loss_fn


@pytest.mark.parametrize("make_loss", [nan_after, nan_gradient_after])
@pytest.mark.parametrize("optimizer", ["sgd", "async-raise", "async-skip"])
def test_divergence_is_flagged_without_raising_or_stepping(make_loss, optimizer: str) -> None:
    def build() -> tuple[Quadratic, torch.optim.Optimizer]:
        model = Quadratic()
        if optimizer == "sgd":
            return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        nonfinite = optimizer.removeprefix("async-")
        return model, AsyncMomentumSGD(model.parameters(), lr=0.1, nonfinite=nonfinite)

    model, opt = build()
    history = simulate(model, make_loss(6), [None], opt, workers(3), steps=20, seed=2)
    assert history.diverged
    assert len(history) == 6
    assert all(math.isfinite(v) for v in history.loss)
    # The bad gradient was not applied: the model is where 6 clean updates put it.
    reference, reference_opt = build()
    clean = simulate(reference, make_loss(99), [None], reference_opt, workers(3), steps=6, seed=2)
    assert not clean.diverged
    assert clean.staleness == history.staleness
    assert torch.equal(model.w, reference.w)
    if optimizer != "sgd":
        assert opt.tracker.clock.value == 6
        assert opt.tracker.estimator.count == 6


def test_overflowing_parameters_are_flagged(cnn_batches) -> None:
    model = make_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=1e30)
    history = simulate(model, cross_entropy, cnn_batches, opt, geometric(0.5), steps=50)
    assert history.diverged
    assert 0 < len(history) < 50


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"steps": -1}, "steps"),
        ({"seed": -3}, "seed"),
        ({"model": "not a module"}, "Module"),
        ({"optimizer": object()}, "Optimizer"),
        ({"staleness": 4}, "StalenessModel"),
        ({"loss_fn": lambda m, b: m.w}, "scalar"),
        ({"loss_fn": lambda m, b: 1.0}, "scalar"),
    ],
)
def test_bad_simulate_arguments_raise_value_error(change: dict, match: str) -> None:
    model = Quadratic()
    arguments = {
        "model": model,
        "loss_fn": lambda m, b: m.w.square().sum(),
        "batches": [None],
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "staleness": round_robin(2),
        "steps": 3,
        "seed": 0,
    } | change
    seed = arguments.pop("seed")
    before = model.w.detach().clone()
    with pytest.raises(ValueError, match=match):
        simulate(**arguments, seed=seed)
    assert torch.equal(model.w, before)
