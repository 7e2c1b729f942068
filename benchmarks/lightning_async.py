"""Asynchronous Lightning training on real processes: compute groups, tuned against fixed momentum.

For the digits CNN and ``--processes`` CPU processes (Lightning starts them), for each number of
compute groups ``G`` it trains with :class:`~lightning_callbacks.AsyncParameterServerStrategy`:

* with ``AsyncMomentumSGD(momentum=0.9)`` tuned to the measured asynchrony, and with the momentum
  fixed at every value of ``--grid`` (0.9 among them): the paper's experiment, the best fixed
  momentum per number of groups against what the tuned optimizer applies;
* and, in the same run, plain synchronous DDP (``torch.optim.SGD(momentum=0.9)``) as the
  baseline of the ratios.

It prints, per run, updates/s, the updates and the wall time to ``--target`` held-out accuracy
(rank 0 validates the server's parameters every ``--val-every`` of its batches), and the ratios
to DDP; then, per ``G``, the best fixed momentum of the grid against the tuned run's applied
(algorithmic) and total momentum. ``--markdown`` prints the tables as markdown.

    python benchmarks/lightning_async.py                       # G in 1,2,4; grid -0.3..0.9
    python benchmarks/lightning_async.py --groups 4 --grid 0,0.9 --max-steps 400

It is a script of the source tree (it needs ``lightning_callbacks``), not part of
``asyncmomentum bench``.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asyncmomentum.applications.digits import SmallCNN, load_digits_split
from asyncmomentum.core.optimizer import AsyncMomentumSGD
from lightning_callbacks import AsyncMomentumCallback, AsyncParameterServerStrategy


class Digits(pl.LightningModule):
    """The digits CNN; ``val/acc`` is the held-out accuracy.

    Args:
        optimizer: ``"tuned"``, ``"fixed"`` (AsyncMomentumSGD with ``tune=False``) or ``"sgd"``.
        momentum: the momentum (the total to keep, when tuned).
        lr: learning rate.
        seed: seed of the initial weights.
    """

    def __init__(self, optimizer: str, momentum: float, lr: float, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = SmallCNN()
        self.kind, self.momentum, self.lr = optimizer, momentum, lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        """Cross-entropy of one batch.

        Args:
            batch: images and labels.
            batch_idx: index of the batch.
        """
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Held-out accuracy.

        Args:
            batch: images and labels.
            batch_idx: index of the batch.
        """
        x, y = batch
        self.log("val/acc", (self.net(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimizer of the run."""
        if self.kind == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        tune = self.kind == "tuned"
        return AsyncMomentumSGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, tune=tune, horizon=100
        )


class _Record(pl.Callback):
    """Rank 0 writes held-out accuracy per update, wall times and the final momenta."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.history: list[tuple[int, float, float]] = []
        self.began = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.began = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            accuracy = float(trainer.callback_metrics["val/acc"])
            self.history.append((trainer.global_step, time.monotonic() - self.began, accuracy))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.wall = time.monotonic() - self.began

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        torch.save(
            {
                "history": self.history,
                "wall": getattr(self, "wall", math.nan),
                "updates": trainer.global_step,
                "algorithmic": metrics.get("momentum/algorithmic", math.nan),
                "total": metrics.get("momentum/total", math.nan),
                "estimated_workers": metrics.get("workers/estimated", math.nan),
            },
            self.out,
        )


@dataclass(frozen=True)
class RunResult:
    """One training run."""

    name: str
    groups: int | None
    momentum: float
    tuned: bool
    updates: int
    wall: float
    to_target_updates: float
    to_target_seconds: float
    final_accuracy: float
    algorithmic: float
    total: float
    estimated_workers: float

    @property
    def updates_per_second(self) -> float:
        """Applied updates per second of training (validation included)."""
        return self.updates / self.wall if self.wall > 0 else math.nan


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_once(
    args: argparse.Namespace,
    groups: int | None,
    optimizer: str,
    momentum: float,
    folder: Path,
    seed: int = 0,
) -> RunResult:
    """Train once; ``groups=None`` is plain synchronous DDP.

    Args:
        args: the command line.
        groups: number of compute groups, or ``None`` for DDP.
        optimizer: ``"tuned"``, ``"fixed"`` or ``"sgd"``.
        momentum: the momentum.
        folder: scratch folder of the run.
        seed: seed of the initial weights and of the data order.
    """
    os.environ["MASTER_PORT"] = str(_free_port())
    os.environ["PL_GLOBAL_SEED"] = str(seed)  # the order of the distributed sampler's shards
    data = load_digits_split()
    train = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=32, shuffle=True)
    held_out = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=512)
    if groups is None:
        strategy: Any = DDPStrategy(start_method="fork", timeout=timedelta(seconds=120))
        max_steps = args.max_steps[0]  # one group: as many updates as groups=1
    else:
        strategy = AsyncParameterServerStrategy(
            groups=groups, start_method="fork", timeout=timedelta(seconds=120)
        )
        max_steps = args.max_steps[min(args.groups.index(groups), len(args.max_steps) - 1)]
    out = folder / "record.pt"
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.processes,
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=args.val_every,
        num_sanity_val_steps=0,
        log_every_n_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
        callbacks=[_Record(out), *([] if groups is None else [AsyncMomentumCallback(0.9)])],
    )
    trainer.fit(Digits(optimizer, momentum, args.lr, seed), train, held_out)
    record = torch.load(out)
    hit = next(((s, t) for s, t, acc in record["history"] if acc >= args.target), None)
    name = "DDP, SGD(0.9)" if groups is None else f"G={groups} {optimizer} {momentum:g}"
    return RunResult(
        name=name,
        groups=groups,
        momentum=momentum,
        tuned=optimizer == "tuned",
        updates=record["updates"],
        wall=record["wall"],
        to_target_updates=math.inf if hit is None else hit[0],
        to_target_seconds=math.inf if hit is None else hit[1],
        final_accuracy=record["history"][-1][2] if record["history"] else math.nan,
        algorithmic=record["algorithmic"],
        total=record["total"],
        estimated_workers=record["estimated_workers"],
    )


def _median(runs: list[RunResult]) -> RunResult:
    """One row for the runs of a setting: the median of each figure (``inf`` counts as large)."""
    if len(runs) == 1:
        return runs[0]

    def mid(name: str) -> float:
        values = sorted(getattr(r, name) for r in runs)
        return values[len(values) // 2] if len(values) % 2 else statistics.median(values)

    first = runs[0]
    return RunResult(
        name=f"{first.name} (median of {len(runs)})",
        groups=first.groups,
        momentum=first.momentum,
        tuned=first.tuned,
        updates=round(mid("updates")),
        wall=mid("wall"),
        to_target_updates=mid("to_target_updates"),
        to_target_seconds=mid("to_target_seconds"),
        final_accuracy=mid("final_accuracy"),
        algorithmic=mid("algorithmic"),
        total=mid("total"),
        estimated_workers=mid("estimated_workers"),
    )


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument(
        "--groups", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2, 4]
    )
    parser.add_argument("--grid", type=_floats, default=[-0.3, 0.0, 0.3, 0.6, 0.9])
    parser.add_argument(
        "--max-steps",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[200, 400, 600],
        help="updates per run, one per --groups entry (the last repeats)",
    )
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--val-every", type=int, default=4, help="rank 0's batches")
    parser.add_argument("--seeds", type=int, default=1, help="runs per setting (medians)")
    parser.add_argument("--markdown", action="store_true")
    return parser


def _fmt(value: float, digits: int = 0) -> str:
    return "never" if math.isinf(value) else f"{value:.{digits}f}"


def report(results: list[RunResult], baseline: RunResult, markdown: bool) -> str:
    """The two tables: every run against DDP; per G, the best fixed momentum and the tuned one.

    Args:
        results: the asynchronous runs.
        baseline: the DDP run.
        markdown: markdown tables instead of aligned text.
    """
    head = [
        "run",
        "updates/s",
        "x DDP",
        "updates to target",
        "s to target",
        "x DDP (time)",
        "final acc",
        "M_hat",
    ]
    rows = []
    for r in [baseline, *results]:
        rows.append(
            [
                r.name,
                f"{r.updates_per_second:.0f}",
                f"{r.updates_per_second / baseline.updates_per_second:.2f}",
                _fmt(r.to_target_updates),
                _fmt(r.to_target_seconds, 1),
                _fmt(r.to_target_seconds / baseline.to_target_seconds, 2),
                f"{r.final_accuracy:.3f}",
                "" if r.groups is None else f"{r.estimated_workers:.2f}",
            ]
        )
    lines = [_table(head, rows, markdown), ""]
    head2 = [
        "G",
        "best fixed momentum (updates)",
        "tuned: applied",
        "tuned: total",
        "tuned (updates)",
    ]
    rows2 = []
    for groups in sorted({r.groups for r in results if r.groups is not None}):
        fixed = [r for r in results if r.groups == groups and not r.tuned]
        tuned = next((r for r in results if r.groups == groups and r.tuned), None)
        best = min(fixed, key=lambda r: (r.to_target_updates, -r.final_accuracy), default=None)
        rows2.append(
            [
                str(groups),
                "-" if best is None else f"{best.momentum:g} ({_fmt(best.to_target_updates)})",
                "-" if tuned is None else f"{tuned.algorithmic:.3f}",
                "-" if tuned is None else f"{tuned.total:.3f}",
                "-" if tuned is None else _fmt(tuned.to_target_updates),
            ]
        )
    lines.append(_table(head2, rows2, markdown))
    return "\n".join(lines)


def _table(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*row) for row in rows)])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its tables.

    Args:
        argv: the arguments (default: the command line's).
    """
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    load = os.getloadavg()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="asyncmomentum-bench-") as scratch:
        folder = Path(scratch)
        seeds = range(args.seeds)
        baseline = _median([train_once(args, None, "sgd", 0.9, folder, s) for s in seeds])
        results = []
        for groups in args.groups:
            settings = [("tuned", 0.9)] + [("fixed", m) for m in args.grid]
            for optimizer, momentum in settings:
                runs = [train_once(args, groups, optimizer, momentum, folder, s) for s in seeds]
                results.append(_median(runs))
    print(
        f"digits CNN, {args.processes} processes, batch 32 per process, lr {args.lr}, target "
        f"{args.target:.2f} held-out accuracy; {args.seeds} seed(s); load average before "
        f"{load[0]:.1f}; "
        f"{time.monotonic() - began:.0f} s in all"
    )
    print(report(results, baseline, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
