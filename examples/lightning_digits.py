"""Asynchrony-aware momentum in a PyTorch Lightning run: a small CNN on scikit-learn's digits.

``StaleGradients(workers=8)`` makes the run behave like 8 asynchronous workers (each gradient is
computed at the parameters of ``tau`` steps ago); ``AsyncMomentumCallback(target_momentum=0.9)``
logs how the optimizer compensates: with ``M = 8`` workers the asynchrony itself brings an
implicit momentum ``1 - 1/8 = 0.875``, so only ``0.025`` is applied on top.

Run::

    python examples/lightning_digits.py                    # AsyncMomentumSGD
    python examples/lightning_digits.py --optimizer adam   # Adam, its beta1 tuned by the callback

and read the CSV it names (columns ``momentum/implicit``, ``momentum/algorithmic``,
``momentum/total``, ``staleness/mean``, ``staleness/max``, ``workers/estimated``, ``val/acc``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asyncmomentum.applications.digits import SmallCNN, load_digits_split
from asyncmomentum.core.optimizer import AsyncMomentumSGD
from lightning_callbacks import AsyncMomentumCallback, StaleGradients

TARGET_MOMENTUM = 0.9


class DigitsClassifier(pl.LightningModule):
    """SmallCNN trained with cross-entropy; reports held-out accuracy.

    Args:
        optimizer: ``"async"`` (AsyncMomentumSGD), ``"sgd"`` or ``"adam"`` (torch's, tuned by
            the callback).
        lr: learning rate.
        horizon: span of the staleness moving average (AsyncMomentumSGD's own estimator).
        warmup: observations before AsyncMomentumSGD's estimate leaves ``M = 1``.
    """

    def __init__(self, optimizer: str, lr: float, horizon: int, warmup: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = SmallCNN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of images shaped ``(N, 1, 8, 8)``."""
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        """Cross-entropy of one batch, logged as ``train/loss``.

        Args:
            batch: images and their labels.
            batch_idx: the batch's index in the epoch (unused).

        Returns:
            The loss to minimize.
        """
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Log the accuracy on one held-out batch as ``val/acc``.

        Args:
            batch: images and their labels.
            batch_idx: the batch's index in the epoch (unused).
        """
        x, y = batch
        self.log("val/acc", (self(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimizer chosen by ``optimizer``: AsyncMomentumSGD, torch's SGD or Adam.

        Returns:
            AsyncMomentumSGD or SGD at momentum ``TARGET_MOMENTUM``, or Adam at its defaults.
        """
        hp = self.hparams
        if hp.optimizer == "async":
            return AsyncMomentumSGD(
                self.parameters(),
                lr=hp.lr,
                momentum=TARGET_MOMENTUM,
                horizon=hp.horizon,
                warmup=hp.warmup,
            )
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=TARGET_MOMENTUM)
        return torch.optim.Adam(self.parameters(), lr=hp.lr)


def parse_args() -> argparse.Namespace:
    """The command line.

    Returns:
        The parsed arguments of ``sys.argv``.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=("async", "sgd", "adam"), default="async")
    parser.add_argument("--workers", type=int, default=8, help="simulated asynchronous workers")
    parser.add_argument("--staleness-model", default="exponential")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=None, help="default 0.05 (SGD), 3e-3 (Adam)")
    parser.add_argument("--horizon", type=int, default=100, help="staleness moving-average span")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--logdir", type=Path, default=Path("lightning_logs"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args()


def main() -> None:
    """Train under simulated asynchrony, then print the tuned momentum and the accuracy."""
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    split = load_digits_split(seed=args.seed)
    train = DataLoader(
        TensorDataset(split.x_train, split.y_train),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    held_out = DataLoader(TensorDataset(split.x_test, split.y_test), batch_size=256)

    lr = args.lr if args.lr is not None else (3e-3 if args.optimizer == "adam" else 0.05)
    model = DigitsClassifier(args.optimizer, lr, args.horizon, args.warmup)
    logger = CSVLogger(args.logdir, name=f"digits_{args.optimizer}_M{args.workers}")
    callbacks = [
        StaleGradients(workers=args.workers, model=args.staleness_model, seed=args.seed),
        AsyncMomentumCallback(
            target_momentum=TARGET_MOMENTUM, horizon=args.horizon, warmup=args.warmup
        ),
    ]
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=args.log_every,
        val_check_interval=100,
        check_val_every_n_epoch=None,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, train, held_out)
    final = dict(trainer.callback_metrics)  # validate() below starts a fresh set
    (result,) = trainer.validate(model, held_out, verbose=False)

    print(f"\n{args.optimizer} under {args.workers} simulated workers, {args.steps} steps:")
    for name in (
        "workers/estimated",
        "staleness/mean",
        "momentum/implicit",
        "momentum/algorithmic",
        "momentum/total",
    ):
        if name in final:
            print(f"  {name:22s} {float(final[name]):.4f}")
    print(f"  {'held-out accuracy':22s} {result['val/acc']:.4f}")
    print(f"\nmetrics: {Path(logger.log_dir) / 'metrics.csv'}")


if __name__ == "__main__":
    main()
