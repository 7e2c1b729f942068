r"""Asynchronous Lightning training through a parameter server: the digits CNN, compute groups.

``AsyncParameterServerStrategy(groups=G)`` runs the ``devices x num_nodes`` processes as ``G``
compute groups (synchronous inside, asynchronous across); rank 0 hosts the server, whose
``AsyncMomentumSGD`` measures the staleness of every update and keeps the total momentum at
0.9. ``AsyncMomentumCallback`` logs what it does and shows ``updates/s`` and ``M_hat`` in the
progress bar.

Run::

    python examples/lightning_async_digits.py --devices 4 --groups 2
    python examples/lightning_async_digits.py --devices 4 --groups 4 --fixed   # plain 0.9
    python examples/lightning_async_digits.py --max-steps 600 --ckpt-path \
        asyncmomentum-lightning/ckpt/last.ckpt                                     # resume

On several machines start it as Lightning's DDP is started (``torchrun --nnodes ...`` or
SLURM, with ``--num-nodes``). Under ``torchrun`` or Lightning's own launcher a process that
dies ends the whole job: resume from the last checkpoint with ``--ckpt-path``. Processes
started by a scheduler that keeps the others running (``LOCAL_RANK``, ``NODE_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set per process) survive it: the server drops
the dead group after ``--worker-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asyncmomentum.applications.digits import SmallCNN, load_digits_split
from asyncmomentum.core.optimizer import AsyncMomentumSGD
from lightning_callbacks import AsyncMomentumCallback, AsyncParameterServerStrategy


class DigitsClassifier(pl.LightningModule):
    """SmallCNN with cross-entropy; ``val/acc`` is the held-out accuracy.

    Args:
        lr: learning rate.
        momentum: the total momentum to keep (or, with ``tune=False``, the momentum applied).
        tune: let AsyncMomentumSGD retune its momentum to the measured asynchrony.
    """

    def __init__(self, lr: float = 0.05, momentum: float = 0.9, tune: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = SmallCNN()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        """Cross-entropy of one batch.

        Args:
            batch: images and labels.
            batch_idx: index of the batch.
        """
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Held-out accuracy (rank 0 validates the server's parameters on the whole set).

        Args:
            batch: images and labels.
            batch_idx: index of the batch.
        """
        x, y = batch
        self.log("val/acc", (self.net(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimizer the server steps."""
        hp = self.hparams
        return AsyncMomentumSGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, tune=hp.tune, horizon=100
        )


def main() -> None:
    """Parse the arguments and train."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4, help="processes per machine")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--groups", type=int, default=None, help="compute groups (default: all)")
    parser.add_argument("--max-steps", type=int, default=400, help="updates the server applies")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--fixed", action="store_true", help="no tuning: momentum as given")
    parser.add_argument("--worker-timeout", type=float, default=60.0)
    parser.add_argument("--ckpt-path", type=Path, default=None, help="checkpoint to resume")
    parser.add_argument("--out", type=Path, default=Path("asyncmomentum-lightning"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # several processes share the machine's cores

    data = load_digits_split()
    train = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=32, shuffle=True)
    held_out = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=512)
    trainer = pl.Trainer(
        strategy=AsyncParameterServerStrategy(
            groups=args.groups, worker_timeout=args.worker_timeout
        ),
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        max_steps=args.max_steps,
        val_check_interval=10,  # batches of rank 0
        log_every_n_steps=5,
        # A progress bar redraws itself; in a log file (not a terminal) it is noise.
        enable_progress_bar=sys.stderr.isatty(),
        logger=CSVLogger(args.out, name="logs"),
        callbacks=[
            AsyncMomentumCallback(target_momentum=args.momentum),
            ModelCheckpoint(dirpath=args.out / "ckpt", save_last=True),
        ],
        default_root_dir=args.out,
    )
    model = DigitsClassifier(args.lr, args.momentum, tune=not args.fixed)
    trainer.fit(model, train, held_out, ckpt_path=args.ckpt_path)
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        nan = float("nan")
        result = trainer.strategy.server_result
        print(
            f"updates={trainer.global_step} held-out acc={metrics.get('val/acc', nan):.3f} "
            f"M_hat={metrics.get('workers/estimated', nan):.2f} "
            f"algorithmic={metrics.get('momentum/algorithmic', nan):.3f} "
            f"updates/s={result.updates_per_second if result else nan:.0f} "
            f"checkpoint={args.out / 'ckpt' / 'last.ckpt'}"
        )


if __name__ == "__main__":
    main()
