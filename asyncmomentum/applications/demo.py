"""``asyncmomentum demo``: the whole point in a couple of minutes on a laptop.

Trains :class:`~asyncmomentum.applications.digits.SmallCNN` on scikit-learn's digits twice under
the same
asynchrony: once with ``torch.optim.SGD(momentum=0.9)``, what a user does today, and once with
``AsyncMomentumSGD(momentum=0.9)``. Then it prints a table, and writes a CSV of both traces
and a PNG of loss and momentum against updates.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from asyncmomentum.applications.digits import SmallCNN, accuracy, iterate_batches, load_digits_split
from asyncmomentum.applications.output_dir import check_writable_dir
from asyncmomentum.applications.progress import progress_bar
from asyncmomentum.core.optimizer import AsyncMomentumSGD
from asyncmomentum.core.validation import check_choice, check_int, check_real
from asyncmomentum.runtimes import simulate as simulation

#: ``asyncmomentum demo --help``'s description (plain text).
DESCRIPTION = (
    "Train a small CNN on scikit-learn's digits under real asynchrony twice, with "
    "torch.optim.SGD(momentum=0.9) and with AsyncMomentumSGD(momentum=0.9); print a table and "
    "write a CSV of both runs and a PNG of loss and momentum against updates."
)

__all__ = ["BACKENDS", "DemoConfig", "DemoResult", "RunSummary", "register", "run_demo"]

BACKENDS = ("hogwild", "server", "simulate")
TRACE_FIELDS = ("update", "loss", "staleness", "algorithmic_momentum", "implicit_momentum")
RUNS = {
    "torch.optim.SGD(momentum=0.9)": "fixed",
    "AsyncMomentumSGD(momentum=0.9)": "tuned",
}


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs.

    Args:
        workers: asynchronous workers (processes for hogwild and server, simulated otherwise).
        backend: ``"hogwild"`` (real processes sharing memory), ``"server"`` (a real parameter
            server on torch.distributed.rpc, on loopback) or ``"simulate"`` (seeded simulator).
        steps: training steps per worker.
        lr: learning rate of both runs.
        batch_size: examples per gradient.
        seed: seed of the model, the data split and the batches.
        out: folder for ``demo.csv`` and ``demo.png``.
        progress: draw a progress bar per run.
    """

    workers: int = 8
    backend: str = "hogwild"
    steps: int = 150
    lr: float = 0.1
    batch_size: int = 32
    seed: int = 0
    out: Path = Path("asyncmomentum-demo")
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice(self.backend, "backend", BACKENDS)
        for name in ("workers", "steps", "batch_size"):
            check_int(getattr(self, name), name, 1)
        check_real(self.lr, "lr", minimum=0.0, min_inclusive=False)
        check_int(self.seed, "seed", 0)


@dataclass
class RunSummary:
    """One training run of the demo: its trace and the figures of the table."""

    label: str
    trace: list[tuple[int, float, float, float, float]] = field(default_factory=list)
    mean_staleness: float = 0.0
    estimated_workers: float = 1.0
    implicit_momentum: float = 0.0
    algorithmic_momentum: float = 0.0
    train_loss: float = math.nan
    test_accuracy: float = math.nan
    updates: int = 0
    wall_time: float = 0.0

    @property
    def diverged(self) -> bool:
        """A non-finite final loss: the run blew up."""
        return not math.isfinite(self.train_loss)


@dataclass
class DemoResult:
    """Both runs and where their files were written."""

    config: DemoConfig
    runs: list[RunSummary]
    csv_path: Path
    png_path: Path


# -- the two optimizers ---------------------------------------------------------------------------


def _make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN()


def _make_optimizer(kind: str, lr: float, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if kind == "fixed":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    # A horizon of a few hundred updates: the demo is short, and the estimate must settle in it.
    return AsyncMomentumSGD(params, lr=lr, momentum=0.9, horizon=200)


# -- backends -------------------------------------------------------------------------------------


class _Bar:
    """Progress on stderr (a bar on a terminal, lines in a log), or nothing.

    Its clock starts at the first report from the workers: process start-up (seconds, importing
    torch in every worker) is not counted in the rate or the ETA.
    """

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self._progress = progress_bar(total, label, unit="upd", enabled=enabled, interval=10.0)
        self._started = False

    def to(self, value: int) -> None:
        if not self._started:
            self._started = True
            self._progress.start()
        self._progress.to(value)

    def close(self) -> None:
        self._progress.close()


def _run_hogwild(config: DemoConfig, kind: str, label: str) -> tuple[RunSummary, nn.Module]:
    from asyncmomentum.runtimes.hogwild import classification_loss, train_hogwild

    data = load_digits_split(seed=config.seed)
    model = _make_model(config.seed)
    optimizer = _make_optimizer(kind, config.lr, model.parameters())
    bar = _Bar(config.progress, config.workers * config.steps, label)
    try:
        result = train_hogwild(
            model,
            optimizer,
            classification_loss,
            (data.x_train, data.y_train),
            workers=config.workers,
            steps_per_worker=config.steps,
            batch_size=config.batch_size,
            seed=config.seed,
            report_every=5,
            timeout=600.0,
            on_progress=lambda progress: bar.to(progress.update),
        )
    finally:
        bar.close()
    result.raise_if_failed()
    summary = RunSummary(
        label=label,
        trace=[point[:5] for point in result.trace],
        mean_staleness=result.mean_staleness,
        estimated_workers=result.estimated_workers,
        implicit_momentum=result.implicit_momentum,
        algorithmic_momentum=result.algorithmic_momentum,
        updates=result.total_updates,
        wall_time=result.train_time,  # from the start signal: process start-up excluded
    )
    return summary, model


def _server_model(seed: int) -> nn.Module:
    return _make_model(seed)


def _server_batches(
    worker_index: int, num_workers: int, *, seed: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from asyncmomentum.runtimes.hogwild import shard

    data = load_digits_split(seed=seed)
    x, y = shard((data.x_train, data.y_train), worker_index, num_workers)
    return iterate_batches(x, y, batch_size, seed=seed + worker_index)


def _run_server(config: DemoConfig, kind: str, label: str) -> tuple[RunSummary, nn.Module]:
    from asyncmomentum.runtimes.server import (
        ParameterServerJob,
        ServerConfig,
        launch_local,
        load_checkpoint,
    )

    total = config.workers * config.steps
    with tempfile.TemporaryDirectory(prefix="asyncmomentum-demo-") as scratch:
        checkpoint = os.path.join(scratch, "server.pt")
        job = ParameterServerJob(
            model_fn=functools.partial(_server_model, config.seed),
            optimizer_fn=functools.partial(_make_optimizer, kind, config.lr),
            batches_fn=functools.partial(
                _server_batches, seed=config.seed, batch_size=config.batch_size
            ),
            seed=config.seed,
        )
        server_config = ServerConfig(total_updates=total, checkpoint_path=checkpoint)
        bar = _Bar(config.progress, total, label)
        try:
            outcome = launch_local(job, workers=config.workers, config=server_config, timeout=600)
            bar.to(outcome.server.updates)
        finally:
            bar.close()
        server = outcome.server
        model = _make_model(config.seed)
        optimizer = _make_optimizer(kind, config.lr, model.parameters())
        load_checkpoint(checkpoint, model, optimizer)
    summary = RunSummary(
        label=label,
        trace=[
            (p.update, p.loss, float(p.staleness), p.algorithmic_momentum, p.implicit_momentum)
            for p in server.trace
        ],
        mean_staleness=server.mean_staleness,
        estimated_workers=server.estimated_workers,
        implicit_momentum=server.implicit_momentum,
        algorithmic_momentum=server.algorithmic_momentum,
        updates=server.updates,
        wall_time=server.wall_time,
    )
    return summary, model


def _simulation_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _run_simulate(config: DemoConfig, kind: str, label: str) -> tuple[RunSummary, nn.Module]:
    data = load_digits_split(seed=config.seed)
    model = _make_model(config.seed)
    optimizer = _make_optimizer(kind, config.lr, model.parameters())
    total = config.workers * config.steps
    bar = _Bar(config.progress, total, label)
    start = time.perf_counter()
    try:
        history = simulation.simulate(
            model,
            _simulation_loss,
            iterate_batches(data.x_train, data.y_train, config.batch_size, seed=config.seed),
            optimizer,
            simulation.workers(config.workers),
            total,
            seed=config.seed,
            on_step=lambda step, _history: bar.to(step + 1),
        )
    finally:
        bar.close()
    staleness = history.staleness
    summary = RunSummary(
        label=label,
        trace=[
            (
                i + 1,
                history.loss[i],
                float(staleness[i]),
                history.algorithmic_momentum[i],
                history.implicit_momentum[i],
            )
            for i in range(len(history))
        ],
        mean_staleness=sum(staleness) / max(len(staleness), 1),
        estimated_workers=history.estimated_workers[-1] if len(history) else 1.0,
        implicit_momentum=history.implicit_momentum[-1] if len(history) else 0.0,
        algorithmic_momentum=history.algorithmic_momentum[-1] if len(history) else 0.0,
        updates=len(history),
        wall_time=time.perf_counter() - start,
    )
    return summary, model


_BACKEND_RUNNERS: dict[str, Callable[[DemoConfig, str, str], tuple[RunSummary, nn.Module]]] = {
    "hogwild": _run_hogwild,
    "server": _run_server,
    "simulate": _run_simulate,
}


# -- outputs --------------------------------------------------------------------------------------


def _finish(summary: RunSummary, model: nn.Module, seed: int) -> RunSummary:
    data = load_digits_split(seed=seed)
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(data.x_train), data.y_train))
    summary.train_loss = loss if math.isfinite(loss) else math.nan
    summary.test_accuracy = accuracy(model, data.x_test, data.y_test)
    return summary


def format_table(runs: list[RunSummary]) -> str:
    """The demo's table: one row per run, ``diverged`` instead of NaN.

    Args:
        runs: the runs to show.
    """
    header = (
        f"{'run':<39} {'stale':>6} {'M_hat':>6} {'implicit':>8} {'algorithm':>9} "
        f"{'train loss':>10} {'test acc':>8} {'updates':>7} {'time':>6}"
    )
    lines = [header, "-" * len(header)]
    for run in runs:
        loss = "diverged" if run.diverged else f"{run.train_loss:.4f}"
        acc = "-" if run.diverged else f"{run.test_accuracy:.1%}"
        lines.append(
            f"{run.label:<39} {run.mean_staleness:>6.2f} {run.estimated_workers:>6.2f} "
            f"{run.implicit_momentum:>8.3f} {run.algorithmic_momentum:>9.3f} {loss:>10} "
            f"{acc:>8} {run.updates:>7d} {run.wall_time:>5.1f}s"
        )
    return "\n".join(lines)


def _write_csv(path: Path, runs: list[RunSummary]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", *TRACE_FIELDS])
        for run in runs:
            for row in run.trace:
                writer.writerow([run.label, *row])


def _moving_average(values: tuple[float, ...], window: int) -> list[float]:
    # Worker batch losses are noisy; a trailing mean makes the two runs comparable at a glance.
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _write_plot(path: Path, runs: list[RunSummary], config: DemoConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_mom) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    colors = ("tab:red", "tab:blue")
    for run, color in zip(runs, colors, strict=True):
        if not run.trace:
            continue
        update, loss, _, algorithmic, implicit = zip(*sorted(run.trace), strict=True)
        finite = [(u, v) for u, v in zip(update, loss, strict=True) if math.isfinite(v)]
        if finite:
            xs, ys = zip(*finite, strict=True)
            ax_loss.plot(xs, ys, color=color, lw=0.6, alpha=0.25)
            ax_loss.plot(xs, _moving_average(ys, 25), color=color, lw=1.8, label=run.label)
        name = run.label.split("(")[0]
        total = [a + i for a, i in zip(algorithmic, implicit, strict=True)]
        # Dashed and on top: a fixed 0.9 stays visible over a tuned total of 0.9.
        ax_mom.plot(
            update,
            algorithmic,
            color=color,
            ls="--",
            lw=1.2,
            zorder=5,
            label=f"{name}: algorithmic",
        )
        # The tuned total sits on the target: drawn on top of the target band, with markers.
        ax_mom.plot(
            update,
            total,
            color=color,
            lw=2.0,
            marker="o",
            markersize=2.5,
            markevery=max(len(update) // 40, 1),
            zorder=4,
            label=f"{name}: total (algorithmic + implicit)",
        )
        if RUNS[run.label] == "tuned":
            ax_mom.plot(update, implicit, color="grey", ls=":", lw=1, label="implicit 1 - 1/M_hat")
    ax_loss.set(
        xlabel="updates applied", ylabel="training loss (worker batches, mean of 25)", yscale="log"
    )
    ax_loss.set_title(f"Loss, {config.workers} asynchronous workers ({config.backend})")
    ax_loss.legend(fontsize=8)
    ax_mom.axhline(
        0.9, color="black", lw=6, alpha=0.15, zorder=1, label="target total momentum 0.9"
    )
    ax_mom.axhline(1.0, color="black", lw=0.6, ls="--", alpha=0.5)
    ax_mom.set(xlabel="updates applied", ylabel="momentum", ylim=(-1.0, 2.0))
    ax_mom.set_title("Momentum: applied, and in total (algorithmic + implicit)")
    ax_mom.legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_writable(out: Path) -> None:
    try:
        check_writable_dir(out)
    except OSError as error:
        message = f"cannot write the demo's files to --out {str(out)!r}: {error.strerror}"
        raise OSError(message) from None


def _publish(out: Path, runs: list[RunSummary], config: DemoConfig) -> tuple[Path, Path]:
    # Write into a scratch folder inside --out, then move each finished file into place: a
    # failure leaves the previous results (or nothing), never a half-written file.
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        _write_csv(scratch / "demo.csv", runs)
        _write_plot(scratch / "demo.png", runs, config)
        for name in ("demo.csv", "demo.png"):
            os.replace(scratch / name, out / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out / "demo.csv", out / "demo.png"


def run_demo(config: DemoConfig) -> DemoResult:
    """Run both trainings under ``config`` and write the CSV and the plot.

    Args:
        config: what to run and where to write.
    """
    _check_writable(config.out)
    runner = _BACKEND_RUNNERS[config.backend]
    runs = []
    for label, kind in RUNS.items():
        summary, model = runner(config, kind, label)
        runs.append(_finish(summary, model, config.seed))
    csv_path, png_path = _publish(config.out, runs, config)
    return DemoResult(config, runs, csv_path, png_path)


# -- command line ---------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` subcommand.

    Args:
        subparsers: the ``asyncmomentum`` command's subparsers.
    """
    defaults = DemoConfig()
    parser = subparsers.add_parser(
        "demo",
        help="fixed vs auto-tuned momentum under real asynchrony, in a couple of minutes",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--workers", type=int, default=defaults.workers, help="asynchronous workers"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=defaults.backend,
        help="hogwild: processes sharing memory; server: a parameter server on loopback; "
        "simulate: the seeded simulator",
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="steps per worker")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="learning rate of both runs")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of model and data")
    parser.add_argument(
        "--out", type=Path, default=defaults.out, help="folder for demo.csv and demo.png"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="show no progress bar (or, in a log, lines)"
    )
    parser.set_defaults(handler=run_demo_command, parser=parser)


def run_demo_command(args: argparse.Namespace) -> int:
    """Run ``asyncmomentum demo``; returns the exit code.

    Args:
        args: parsed arguments of ``asyncmomentum demo``.
    """
    try:
        config = DemoConfig(
            workers=args.workers,
            backend=args.backend,
            steps=args.steps,
            lr=args.lr,
            seed=args.seed,
            out=args.out,
            progress=not args.no_progress,
        )
    except ValueError as error:
        args.parser.error(str(error))  # exits 2
    try:
        result = run_demo(config)
    except OSError as error:
        print(f"asyncmomentum demo: {error}", file=sys.stderr)
        return 2
    print()
    print(format_table(result.runs))
    print(f"\nwrote {result.csv_path} and {result.png_path}")
    return 0
