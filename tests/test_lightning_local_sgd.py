"""AsyncParameterServerStrategy(sync_every=H, outer_optimizer=fn): local SGD under Lightning.

Three real CPU processes on 127.0.0.1 (Lightning forks them), in two compute groups: group 0 is
rank 0 alone, group 1 is ranks 1 and 2 (their inner steps synchronous). Each group takes ``H``
AdamW steps, then pushes a pseudo-gradient to the server in rank 0, whose outer optimizer is an
``AsyncMomentumSGD(nesterov=True)``.
"""

from __future__ import annotations

import csv
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.applications.digits import SmallCNN, load_digits_split
from lightning_callbacks import AsyncMomentumCallback
from lightning_callbacks.async_strategy import LOCAL_SGD_KEY, AsyncParameterServerStrategy

PROCESSES, GROUPS, H = 3, 2, 4


class Digits(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = SmallCNN()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)  # the inner optimizer


def outer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return AsyncMomentumSGD(params, lr=0.5, momentum=0.9, nesterov=True, horizon=10, warmup=2)


class Record(pl.Callback):
    """Rank 0 writes the outer optimizer's state at the start and the server's result."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.start: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        (served,) = trainer.strategy.served_optimizers or [None]
        if served is not None:
            self.start = {
                "observations": served.tracker.estimator.count,
                "clock": served.tracker.clock.value,
                "global_step": trainer.global_step,
            }

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        result = trainer.strategy.server_result
        (served,) = trainer.strategy.served_optimizers
        torch.save(
            {
                "start": self.start,
                "global_step": trainer.global_step,
                "updates": result.updates,
                "per_group": result.updates_per_worker,
                "stop_reason": result.stop_reason,
                "mean_staleness": result.mean_staleness,
                "observations": served.tracker.estimator.count,
                "clock": served.tracker.clock.value,
            },
            self.out,
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def loopback_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


def _trainer(root: Path, max_steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        strategy=AsyncParameterServerStrategy(
            groups=GROUPS,
            sync_every=H,
            outer_optimizer=outer,
            worker_timeout=30.0,
            rpc_timeout=30.0,
            start_method="fork",
            timeout=timedelta(seconds=60),
        ),
        accelerator="cpu",
        devices=PROCESSES,
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=8,
        num_sanity_val_steps=0,
        log_every_n_steps=2,
        logger=CSVLogger(root, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[AsyncMomentumCallback(0.9), *callbacks],
    )


def _data() -> tuple[DataLoader, DataLoader]:
    data = load_digits_split()
    train = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=32, shuffle=True)
    held_out = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=512)
    return train, held_out


def _logged(root: Path, name: str) -> list[float]:
    (path,) = root.glob("logs/version_*/metrics.csv")
    with path.open() as file:
        return [float(row[name]) for row in csv.DictReader(file) if row.get(name)]


def test_local_sgd_arguments_are_checked_before_anything_runs() -> None:
    with pytest.raises(ValueError, match="sync_every must be >= 1"):
        AsyncParameterServerStrategy(sync_every=0, outer_optimizer=outer)
    with pytest.raises(ValueError, match="needs outer_optimizer"):
        AsyncParameterServerStrategy(sync_every=4)
    with pytest.raises(ValueError, match="give sync_every"):
        AsyncParameterServerStrategy(outer_optimizer=outer)


@pytest.mark.timeout(150)
@pytest.mark.usefixtures("loopback_job")
def test_groups_push_pseudo_gradients_and_a_resumed_run_continues_the_outer_optimizer(
    tmp_path: Path,
) -> None:
    train, held_out = _data()
    first = tmp_path / "first.pt"
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path / "a", 8 * H, [Record(first), checkpoints])
    trainer.fit(Digits(), train, held_out)
    record = torch.load(first)
    # max_steps counts inner steps: each group pushed 8 pseudo-gradients, then left.
    assert record["global_step"] == 8 * H
    assert record["per_group"] == {1: 8, 2: 8}
    assert (record["updates"], record["stop_reason"]) == (16, "no_workers")
    assert record["clock"] == 16  # the outer optimizer's tracker saw every push
    assert 0.3 < record["mean_staleness"] < 2.0  # two groups: about 1
    # The callback logged the outer tracker.
    assert _logged(tmp_path / "a", "workers/estimated")
    assert _logged(tmp_path / "a", "momentum/algorithmic")
    assert _logged(tmp_path / "a", "staleness/mean")

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved[LOCAL_SGD_KEY]["sync_every"] == H
    assert saved[LOCAL_SGD_KEY]["outer_optimizer_class"] == "AsyncMomentumSGD"
    # optimizer_states holds the inner optimizer (AdamW's state), the outer one its own key.
    assert "exp_avg" in next(iter(saved["optimizer_states"][0]["state"].values()))
    restored = outer(list(Digits().parameters()))
    restored.load_state_dict(saved[LOCAL_SGD_KEY]["outer_optimizer"])
    # Saved at rank 0's last validation, mid-run: the pushes applied by then.
    saved_clock, saved_step = restored.tracker.clock.value, saved["global_step"]
    assert 0 < saved_clock < 16
    assert 0 < saved_step < 8 * H

    second = tmp_path / "second.pt"
    resumed = _trainer(tmp_path / "b", 12 * H, [Record(second)])
    resumed.fit(Digits(), train, held_out, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    record = torch.load(second)
    # The outer optimizer and its tracker start where the checkpoint left them.
    assert record["start"]["global_step"] == saved_step
    assert record["start"]["clock"] == saved_clock
    assert record["start"]["observations"] == restored.tracker.estimator.count
    # Every group takes the inner steps left to max_steps, and pushes every H of them.
    assert record["global_step"] == 12 * H
    assert record["updates"] == GROUPS * ((12 * H - saved_step) // H)
    assert record["clock"] == saved_clock + record["updates"]
