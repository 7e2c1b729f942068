"""AsyncMomentumCallback and StaleGradients in real (CPU, single-process) pl.Trainer runs."""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asyncmomentum.applications.digits import SmallCNN, load_digits_split
from asyncmomentum.core import formulas
from asyncmomentum.core.optimizer import AsyncMomentumSGD
from asyncmomentum.core.tuning import rules
from asyncmomentum.runtimes.adapter import OptimizerView
from asyncmomentum.runtimes.simulate import staleness_model
from lightning_callbacks import AsyncMomentumCallback, StaleGradients

WORKERS = 8
STEPS = 60
LOG_EVERY = 5
# The estimator must settle within a few dozen steps: a short moving average, a short warm-up.
ESTIMATOR = {"horizon": 40, "warmup": 10}
METRIC_NAMES = (
    "momentum/implicit",
    "momentum/algorithmic",
    "momentum/total",
    "staleness/mean",
    "staleness/max",
    "workers/estimated",
)

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerFactory] = {
    "async": lambda params: AsyncMomentumSGD(params, lr=0.05, momentum=0.9, **ESTIMATOR),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
}


class DigitsModule(pl.LightningModule):
    """SmallCNN on the digits, with the optimizer a test chooses."""

    def __init__(self, make_optimizer: OptimizerFactory) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = SmallCNN()
        self.make_optimizer = make_optimizer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(list(self.parameters()))


class Recorder(pl.Callback):
    """Per step: the staleness StaleGradients used and, for AsyncMomentumSGD, what it applied."""

    def __init__(self, stale: StaleGradients) -> None:
        self.stale = stale
        self.taus: list[int] = []
        self.applied: list[int] = []
        self.momenta: list[float] = []
        self.expected_momenta: list[float] = []
        self.start_estimates: list[float] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        view = OptimizerView(trainer.optimizers[0])
        if view.is_async_momentum:
            self.start_estimates.append(view.tracker.estimated_workers)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.taus.append(self.stale.last_staleness)
        view = OptimizerView(trainer.optimizers[0])
        if view.is_async_momentum:
            self.applied.append(view.tracker.last_staleness)
            # The momentum it applied; its group["momentum"] stays the 0.9 it was given.
            self.momenta.append(view.applied_momentum())
            self.expected_momenta.append(view.tracker.algorithmic_momentum(0.9))
            assert view.optimizer.param_groups[0]["momentum"] == 0.9


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Two cores shared with other test runs: intra-op threads contending for them make this tiny
    # CNN's backward pass about 100x slower (0.3 s instead of 3 ms per step).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_loader() -> DataLoader:
    split = load_digits_split(seed=0)
    data = TensorDataset(split.x_train, split.y_train)
    return DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))


def make_trainer(
    tmp_path: Path, callbacks: list[pl.Callback], max_steps: int = STEPS
) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=CSVLogger(tmp_path, name="logs", version=0),
        log_every_n_steps=LOG_EVERY,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )


def read_rows(tmp_path: Path) -> list[dict[str, float]]:
    """Rows of our metrics in the CSV log, as floats (empty cells dropped)."""
    with open(tmp_path / "logs" / "version_0" / "metrics.csv", newline="") as f:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return [row for row in rows if "workers/estimated" in row]


def expected_algorithmic(row: dict[str, float], target: float, floor: float = -1.0) -> float:
    """The tuner's formula applied to the logged estimate of M (clipped at ``floor``)."""
    implicit = formulas.implicit_momentum(row["workers/estimated"])
    return max(floor, rules.algorithmic_momentum(target, implicit))


def fit_digits(
    tmp_path: Path,
    loader: DataLoader,
    optimizer: str,
    target: float = 0.9,
    **callback_options: Any,
) -> tuple[pl.Trainer, Recorder, list[warnings.WarningMessage]]:
    pl.seed_everything(0, verbose=False)
    stale = StaleGradients(workers=WORKERS, model="exponential", seed=0)
    recorder = Recorder(stale)
    momentum = AsyncMomentumCallback(target_momentum=target, **ESTIMATOR, **callback_options)
    trainer = make_trainer(tmp_path, [stale, momentum, recorder])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(DigitsModule(OPTIMIZERS[optimizer]), loader)
    return trainer, recorder, caught


def clip_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "negative algorithmic momentum" in str(w.message)]


# -- acceptance: the estimate and the momentum, three optimizers ----------------------------------


def test_async_momentum_sgd_estimates_workers_and_logs_everything(
    tmp_path: Path, digits_loader: DataLoader
) -> None:
    _, recorder, caught = fit_digits(tmp_path, digits_loader, "async")
    rows = read_rows(tmp_path)
    # Logged at the trainer's interval: steps 4, 9, ..., 59.
    assert [int(r["step"]) for r in rows] == list(range(LOG_EVERY - 1, STEPS, LOG_EVERY))
    assert all(set(METRIC_NAMES) <= set(row) for row in rows)
    last = rows[-1]
    assert abs(last["workers/estimated"] - WORKERS) <= 0.25 * WORKERS
    for row in rows:
        assert row["momentum/algorithmic"] == pytest.approx(expected_algorithmic(row, 0.9))
        implicit = formulas.implicit_momentum(row["workers/estimated"])
        assert row["momentum/implicit"] == pytest.approx(implicit)
        assert row["momentum/total"] == pytest.approx(0.9)  # nothing clipped at M = 8
    # StaleGradients' staleness reached the optimizer: it applied exactly those.
    assert recorder.applied == recorder.taus
    assert max(recorder.taus) > 0
    # The callback did not fight the optimizer: the momentum is the optimizer's own tuner's.
    assert recorder.momenta == pytest.approx(recorder.expected_momenta)
    assert not clip_warnings(caught)


def test_torch_sgd_is_tuned_and_clipped_at_zero_with_one_warning(
    tmp_path: Path, digits_loader: DataLoader
) -> None:
    # Target 0.8 under M = 8 (implicit 0.875) asks for -0.075: torch's SGD cannot take it.
    trainer, _, caught = fit_digits(tmp_path, digits_loader, "sgd", target=0.8)
    rows = read_rows(tmp_path)
    assert all(set(METRIC_NAMES) <= set(row) for row in rows)
    assert abs(rows[-1]["workers/estimated"] - WORKERS) <= 0.25 * WORKERS
    for row in rows:
        assert row["momentum/algorithmic"] == pytest.approx(expected_algorithmic(row, 0.8, 0.0))
    assert rows[0]["momentum/algorithmic"] > 0  # warm-up: M = 1, the whole target
    assert rows[-1]["momentum/algorithmic"] == 0.0
    assert rows[-1]["momentum/total"] > 0.8  # clipping leaves the total above the target
    assert trainer.optimizers[0].param_groups[0]["momentum"] == 0.0
    warned = clip_warnings(caught)
    assert len(warned) == 1
    assert "SGD" in warned[0]
    assert "AsyncMomentumSGD" in warned[0]


def test_adam_first_beta_is_tuned(tmp_path: Path, digits_loader: DataLoader) -> None:
    trainer, _, caught = fit_digits(tmp_path, digits_loader, "adam")
    rows = read_rows(tmp_path)
    assert abs(rows[-1]["workers/estimated"] - WORKERS) <= 0.25 * WORKERS
    for row in rows:
        assert row["momentum/algorithmic"] == pytest.approx(expected_algorithmic(row, 0.9, 0.0))
    beta1, beta2 = trainer.optimizers[0].param_groups[0]["betas"]
    assert beta1 == pytest.approx(rows[-1]["momentum/algorithmic"])
    assert beta1 < 0.5  # moved far from Adam's 0.9 by the asynchrony
    assert beta2 == 0.999  # untouched
    assert not clip_warnings(caught)


def test_known_workers_skip_estimation(tmp_path: Path, digits_loader: DataLoader) -> None:
    fit_digits(tmp_path, digits_loader, "sgd", workers=5)
    rows = read_rows(tmp_path)
    assert {row["workers/estimated"] for row in rows} == {5.0}
    assert rows[0]["momentum/algorithmic"] == pytest.approx(0.9 - (1 - 1 / 5))


def test_staleness_reaches_the_optimizer_with_a_gradient_scaler(digits_loader: DataLoader) -> None:
    # With a GradScaler, Lightning runs the closure (and on_before_optimizer_step) first and
    # calls optimizer.step afterwards: the staleness must still be pending then.
    stale = StaleGradients(workers=WORKERS)
    recorder = Recorder(stale)
    scaled = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = pl.Trainer(
        max_steps=20,
        plugins=[scaled],
        callbacks=[stale, recorder],
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(DigitsModule(OPTIMIZERS["async"]), digits_loader)
    assert trainer.optimizers[0].tracker.clock.value == 20  # the scaler skipped no step
    assert recorder.applied == recorder.taus
    assert max(recorder.taus) > 0


def _fit_auto(
    tmp_path: Path, loader: DataLoader, callbacks: list[pl.Callback], max_steps: int
) -> pl.Trainer:
    """Fit the digits with ``AsyncMomentumSGD(rule="auto")`` under simulated staleness."""
    auto = lambda params: AsyncMomentumSGD(params, lr=0.05, momentum=0.9, rule="auto")  # noqa: E731
    pl.seed_everything(0, verbose=False)
    stale = StaleGradients(workers=WORKERS, model="exponential", seed=0)
    trainer = make_trainer(tmp_path, [stale, *callbacks], max_steps=max_steps)
    trainer.fit(DigitsModule(auto), loader)
    return trainer


def test_lightning_hands_the_auto_rule_each_batchs_loss(
    tmp_path: Path, digits_loader: DataLoader
) -> None:
    # Lightning steps the optimizer with a closure: its loss reaches the rule's loss watch.
    trainer = _fit_auto(tmp_path, digits_loader, [], max_steps=12)
    watch = trainer.optimizers[0].rule.loss_watch
    assert watch.count == 12
    assert 0.5 < watch.average < 5.0  # the digits' cross-entropy, not a placeholder


def test_the_callback_hands_the_auto_rule_each_batchs_size(
    tmp_path: Path, digits_loader: DataLoader
) -> None:
    # 1,348 digits in batches of 32: the 43rd batch of each epoch holds 4. The callback counts
    # each batch's samples and hands them to the optimizer's rule, which does not read the
    # gradient norm of that short batch.
    momentum = AsyncMomentumCallback(0.9, rule="auto", log=False)
    trainer = _fit_auto(tmp_path, digits_loader, [momentum], max_steps=45)
    rule = trainer.optimizers[0].rule
    assert rule.state_dict()["ladder"][-1] == 32.0  # the largest batch it was handed
    assert rule.detector.count == 44  # 45 updates, the short batch's norm not read
    # Without the callback Lightning hands the optimizer no batch: every norm is read.
    trainer = _fit_auto(tmp_path / "without", digits_loader, [], max_steps=45)
    assert trainer.optimizers[0].rule.detector.count == 45


# -- resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["async", "sgd"])
def test_resume_continues_the_estimate(
    tmp_path: Path, digits_loader: DataLoader, optimizer: str
) -> None:
    half = STEPS // 2

    def run(max_steps: int, ckpt_path: Path | None, logs: Path) -> tuple[pl.Trainer, ...]:
        pl.seed_everything(0, verbose=False)
        stale = StaleGradients(workers=WORKERS, seed=0)
        momentum = AsyncMomentumCallback(0.9, **ESTIMATOR)
        recorder = Recorder(stale)
        trainer = make_trainer(logs, [stale, momentum, recorder], max_steps=max_steps)
        trainer.fit(DigitsModule(OPTIMIZERS[optimizer]), digits_loader, ckpt_path=ckpt_path)
        return trainer, momentum, recorder

    def estimate(trainer: pl.Trainer, momentum: AsyncMomentumCallback) -> tuple[float, int]:
        opt = trainer.optimizers[0]
        tuner = getattr(opt, "tracker", None) or momentum.trackers[0]
        return tuner.estimated_workers, tuner.estimator.count

    first, first_momentum, first_recorder = run(half, None, tmp_path / "first")
    saved_estimate, saved_count = estimate(first, first_momentum)
    assert saved_count == half
    assert saved_estimate > 2.0
    checkpoint = tmp_path / "half.ckpt"
    first.save_checkpoint(checkpoint)

    second, second_momentum, second_recorder = run(STEPS, checkpoint, tmp_path / "second")
    assert second.global_step == STEPS
    assert estimate(second, second_momentum)[1] == STEPS  # observations continued, not reset
    rows = read_rows(tmp_path / "second")
    assert int(rows[0]["step"]) >= half
    # A reset estimator would still be in warm-up (M = 1) at the first log line after resuming.
    assert rows[0]["workers/estimated"] == pytest.approx(saved_estimate, rel=0.25)
    if optimizer == "async":
        assert second_recorder.start_estimates == [pytest.approx(saved_estimate)]
    # The staleness stream continued where it stopped; snapshots restart empty after a resume.
    draws = staleness_model("exponential", WORKERS).sample(STEPS, 0)
    assert first_recorder.taus == [min(int(d), k) for k, d in enumerate(draws[:half])]
    assert second_recorder.taus == [min(int(d), k) for k, d in enumerate(draws[half:])]


# -- StaleGradients does what it says ----------------------------------------------------------


class Quadratic(pl.LightningModule):
    """``f(w) = 0.5 ||w - c||^2``: the gradient is ``w - c``, so every step can be checked."""

    def __init__(self, stale: StaleGradients) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        self.register_buffer("c", torch.tensor([0.3, 0.1, -0.7], dtype=torch.float64))
        self.stale = stale
        self.seen: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = [self.w.detach().clone()]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(self.w.detach().clone())
        return 0.5 * (self.w - self.c).pow(2).sum()

    def on_train_batch_end(self, *args: Any) -> None:
        self.after.append(self.w.detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def dummy_loader(n: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=1)


@pytest.mark.parametrize(
    ("name", "cap"), [("geometric", None), ("round_robin", None), ("exponential", 3)]
)
def test_gradients_are_taken_at_the_parameters_of_tau_steps_ago(
    tmp_path: Path, name: str, cap: int | None
) -> None:
    steps, lr = 40, 0.1
    stale = StaleGradients(workers=4, model=name, seed=7, max_staleness=cap)
    module = Quadratic(stale)
    recorder = Recorder(stale)
    trainer = make_trainer(tmp_path, [stale, recorder], max_steps=steps)
    trainer.fit(module, dummy_loader(steps))

    limit = stale.max_staleness
    draws = staleness_model(name, 4).sample(steps, 7)
    expected_taus = [min(int(d), k, limit) for k, d in enumerate(draws)]
    assert recorder.taus == expected_taus
    assert max(expected_taus) > 0
    for k, tau in enumerate(expected_taus):
        # The forward ran at version k - tau ...
        torch.testing.assert_close(module.seen[k], module.after[k - tau], rtol=0, atol=0)
        # ... and its gradient was applied to the current version k.
        expected = module.after[k] - lr * (module.seen[k] - module.c)
        torch.testing.assert_close(module.after[k + 1], expected)
    assert stale.snapshots == 0  # freed at the end of training


def test_failure_mid_step_leaves_current_parameters(tmp_path: Path) -> None:
    stale = StaleGradients(workers=4, model="round_robin")  # tau = 3 once 3 snapshots exist

    class Failing(Quadratic):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == 6:
                assert stale.staleness == 3  # running at stale parameters right now
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    module = Failing(stale)
    trainer = make_trainer(tmp_path, [stale], max_steps=20)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, dummy_loader(20))
    torch.testing.assert_close(module.w.detach(), module.after[-1], rtol=0, atol=0)
    assert not module.after[-1].equal(module.after[-4])  # the stale version really differed


def test_gradient_accumulation_draws_once_per_optimizer_step(tmp_path: Path) -> None:
    stale = StaleGradients(workers=3, model="round_robin")
    module = Quadratic(stale)
    trainer = pl.Trainer(
        max_steps=10,
        accumulate_grad_batches=2,
        callbacks=[stale],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, dummy_loader(20))
    assert stale.state_dict()["draws"] == trainer.global_step == 10
    # Both micro-batches of a window ran at the same (stale) parameters.
    for first, second in zip(module.seen[0::2], module.seen[1::2], strict=True):
        torch.testing.assert_close(first, second, rtol=0, atol=0)


# -- naming, logging switches, errors ---------------------------------------------------------


def test_several_param_groups_get_suffixes(tmp_path: Path, digits_loader: DataLoader) -> None:
    def two_groups(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            [{"params": params[:2], "name": "conv1"}, {"params": params[2:], "momentum": 0.5}],
            lr=0.05,
            momentum=0.9,
        )

    callback = AsyncMomentumCallback(0.9, workers=2)
    trainer = make_trainer(tmp_path, [callback], max_steps=10)
    trainer.fit(DigitsModule(two_groups), digits_loader)
    rows = read_rows(tmp_path)
    assert {"momentum/algorithmic/conv1", "momentum/algorithmic/pg2"} <= set(rows[-1])
    assert {"momentum/total/conv1", "momentum/total/pg2"} <= set(rows[-1])
    assert "staleness/mean" not in rows[-1]  # nothing reported any staleness
    assert [g["momentum"] for g in trainer.optimizers[0].param_groups] == [0.4, 0.4]


def test_log_false_tunes_but_logs_nothing(tmp_path: Path, digits_loader: DataLoader) -> None:
    stale = StaleGradients(workers=WORKERS)
    callback = AsyncMomentumCallback(0.9, log=False, **ESTIMATOR)
    trainer = make_trainer(tmp_path, [stale, callback], max_steps=30)
    trainer.fit(DigitsModule(OPTIMIZERS["sgd"]), digits_loader)
    assert not (tmp_path / "logs" / "version_0" / "metrics.csv").exists() or not read_rows(tmp_path)
    tuner = callback.trackers[0]
    assert tuner.estimator.count == 30
    assert trainer.optimizers[0].param_groups[0]["momentum"] == tuner.algorithmic_momentum(0.9)


def test_no_optimizer_with_momentum_is_an_error(tmp_path: Path, digits_loader: DataLoader) -> None:
    callback = AsyncMomentumCallback(0.9)
    trainer = make_trainer(tmp_path, [callback], max_steps=2)
    module = DigitsModule(lambda params: torch.optim.Adagrad(params, lr=0.1))
    with pytest.raises(ValueError, match="no optimizer with a momentum"):
        trainer.fit(module, digits_loader)


def test_manual_optimization_is_refused_by_stale_gradients(
    tmp_path: Path, digits_loader: DataLoader
) -> None:
    class Manual(DigitsModule):
        def __init__(self) -> None:
            super().__init__(OPTIMIZERS["sgd"])
            self.automatic_optimization = False

    trainer = make_trainer(tmp_path, [StaleGradients(workers=2)], max_steps=2)
    with pytest.raises(ValueError, match="automatic optimization"):
        trainer.fit(Manual(), digits_loader)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"target_momentum": 1.0}, "target_momentum"),
        ({"rule": "multiplicative"}, "rule"),
        ({"momentum_bounds": (0.5, 0.1)}, "momentum_bounds"),
        ({"workers": 0}, "workers"),
        ({"horizon": 0}, "horizon"),
        ({"warmup": -1}, "warmup"),
        ({"log": "yes"}, "log"),
    ],
)
def test_bad_callback_arguments(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AsyncMomentumCallback(**options)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"workers": 0}, "workers"),
        ({"workers": 4, "model": "poisson"}, "model"),
        ({"workers": 4, "seed": -1}, "seed"),
        ({"workers": 4, "max_staleness": -2}, "max_staleness"),
    ],
)
def test_bad_stale_gradients_arguments(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StaleGradients(**options)


def test_observe_staleness_misuse() -> None:
    callback = AsyncMomentumCallback(0.9)
    with pytest.raises(ValueError, match="non-negative"):
        callback.observe_staleness(-1)
    with pytest.raises(RuntimeError, match="outside training"):
        callback.observe_staleness(3)


def test_corrupt_callback_state_is_refused_and_changes_nothing() -> None:
    callback = AsyncMomentumCallback(0.9)
    with pytest.raises(ValueError, match="format"):
        callback.load_state_dict({"format": 99, "tuners": {}})
    with pytest.raises(ValueError, match="StalenessEstimator state is missing"):
        callback.load_state_dict({"format": 1, "tuners": {0: {"estimator": {"format": 1}}}})
    assert callback.trackers == {}
    assert math.isclose(callback.target_momentum, 0.9)


def test_measured_momentum_is_logged_for_a_metered_optimizer(
    tmp_path: Path, digits_loader: DataLoader
) -> None:
    pl.seed_everything(0, verbose=False)

    def metered(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return AsyncMomentumSGD(params, lr=0.05, momentum=0.0, tune=False, measure_momentum=True)

    stale = StaleGradients(workers=4, model="exponential", seed=0)
    callback = AsyncMomentumCallback(target_momentum=0.9, **ESTIMATOR)
    trainer = make_trainer(tmp_path, [stale, callback], max_steps=300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the callback warns that the optimizer's momentum is fixed
        trainer.fit(DigitsModule(metered), digits_loader)
    measured = [
        row["momentum/measured"] for row in read_rows(tmp_path) if "momentum/measured" in row
    ]
    assert measured, "momentum/measured was never logged"
    assert measured[-1] == pytest.approx(1 - 1 / 4, abs=0.15)


def test_stability_rule_runs_inside_lightning_and_is_logged(
    tmp_path: Path, digits_loader: DataLoader
) -> None:
    pl.seed_everything(0, verbose=False)
    split = load_digits_split(seed=0)
    probe_x, probe_y = split.x_train[:128], split.y_train[:128]
    module: DigitsModule

    def stable(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return AsyncMomentumSGD(
            params,
            lr=0.05,
            momentum=0.9,
            rule="stability",
            curvature_probe=lambda: nn.functional.cross_entropy(module.net(probe_x), probe_y),
            curvature_every=20,
            **ESTIMATOR,
        )

    module = DigitsModule(stable)
    stale = StaleGradients(workers=8, model="round_robin", seed=0)
    callback = AsyncMomentumCallback(target_momentum=0.9, **ESTIMATOR)
    trainer = make_trainer(tmp_path, [stale, callback], max_steps=60)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, digits_loader)
    # The callback cannot be set to a feedback rule, so it does not complain that they differ.
    assert not [w for w in caught if "differ from AsyncMomentumCallback" in str(w.message)]
    optimizer = trainer.optimizers[0]
    rows = [row for row in read_rows(tmp_path) if "curvature/lambda_max" in row]
    assert rows, "curvature/lambda_max was never logged"
    assert rows[-1]["curvature/lambda_max"] == pytest.approx(optimizer.curvature)
    # The logged momentum is the stability rule's, not the additive formula's.
    assert rows[-1]["momentum/algorithmic"] == pytest.approx(optimizer.algorithmic_momentum)
    additive = rules.algorithmic_momentum(0.9, optimizer.implicit_momentum)
    assert abs(optimizer.algorithmic_momentum - additive) > 0.05
