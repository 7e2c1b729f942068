"""The callbacks under Lightning DDP: 2 real CPU processes (gloo) on 127.0.0.1.

The processes are forked, as in the other Lightning tests: a forked process ends with
``os._exit``, while a spawned one runs the interpreter's teardown, where Gloo's threads can
abort it (SIGABRT) after its work is done (pytorch/pytorch#179291).
"""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asyncmomentum.applications.digits import SmallCNN
from asyncmomentum.core.optimizer import AsyncMomentumSGD
from lightning_callbacks import AsyncMomentumCallback, StaleGradients

STEPS = 24


class TinyDigits(pl.LightningModule):
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = SmallCNN()
        self.optimizer = optimizer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "async":
            return AsyncMomentumSGD(self.parameters(), lr=0.05, horizon=20, warmup=5)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class SaveRankResult(pl.Callback):
    """Each rank saves what it logged, the staleness it applied and its parameters."""

    def __init__(self, stale: StaleGradients, out: Path) -> None:
        self.stale = stale
        self.out = out
        self.taus: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.taus.append(self.stale.last_staleness)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.set_num_threads(1)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        params = [p.detach().clone() for p in pl_module.parameters()]
        result = {"metrics": metrics, "taus": self.taus, "params": params}
        torch.save(result, self.out / f"rank{trainer.global_rank}.pt")


class OneThread(pl.Callback):
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.set_num_threads(1)  # in each forked rank: 2 cores shared by 2 ranks


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(240)
# About 10 s per run (two forked processes): one by default.
@pytest.mark.parametrize("optimizer", ["async", pytest.param("sgd", marks=pytest.mark.slow)])
def test_ddp_ranks_agree_on_staleness_momentum_and_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optimizer: str
) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(512, 1, 8, 8, generator=gen), torch.randint(0, 10, (512,)))
    stale = StaleGradients(workers=4, seed=3)
    trainer = pl.Trainer(
        max_steps=STEPS,
        strategy=DDPStrategy(start_method="fork", timeout=timedelta(seconds=60)),
        accelerator="cpu",
        devices=2,
        callbacks=[
            OneThread(),
            stale,
            AsyncMomentumCallback(0.9, horizon=20, warmup=5),
            SaveRankResult(stale, tmp_path),
        ],
        logger=False,
        log_every_n_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(TinyDigits(optimizer), DataLoader(data, batch_size=16))

    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    # Same seed on every rank: the same simulated asynchrony, hence the same momentum ...
    assert rank0["taus"] == rank1["taus"]
    assert max(rank0["taus"]) > 0
    for name in ("staleness/mean", "staleness/max", "workers/estimated", "momentum/algorithmic"):
        assert rank0["metrics"][name] == rank1["metrics"][name]
    # ... and identical replicas, although each rank trained on its own shard of the data.
    for p0, p1 in zip(rank0["params"], rank1["params"], strict=True):
        torch.testing.assert_close(p0, p1, rtol=0, atol=0)
    # The logged mean is the reduction over both ranks of the last window's staleness (4 steps
    # per rank): with identical ranks it equals each rank's own mean of that window.
    window = rank0["taus"][-4:]
    assert rank0["metrics"]["staleness/mean"] == pytest.approx(sum(window) / len(window))
    assert rank0["metrics"]["workers/estimated"] > 1.5
