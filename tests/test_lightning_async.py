"""AsyncParameterServerStrategy: 4 real CPU processes on 127.0.0.1 train a LightningModule.

Lightning starts the processes (``start_method="fork"``: the test process is not re-imported,
which keeps each run to seconds) except in the fault test that starts them by hand, as a
cluster scheduler would. Run as a script, this file is one process of such a job.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
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

from asyncmomentum.applications.digits import SmallCNN, load_digits_split
from asyncmomentum.core.optimizer import AsyncMomentumSGD
from lightning_callbacks import AsyncMomentumCallback
from lightning_callbacks.async_strategy import AsyncParameterServerStrategy
from lightning_callbacks.compute_groups import assign_groups

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightning_async_digits.py"
PROCESSES = 4
TARGET_ACCURACY = 0.8
# Updates each run may apply: enough for every group count to pass the target with tuning.
MAX_STEPS = {1: 120, 2: 300, 4: 500}


class Digits(pl.LightningModule):
    """The digits CNN; ``val/acc`` and ``test/acc`` are held-out accuracies."""

    def __init__(
        self, momentum: float = 0.9, tune: bool = True, torch_sgd: bool = False, rule: str = ""
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = SmallCNN()
        self.momentum = momentum
        self.tune = tune
        self.torch_sgd = torch_sgd
        self.rule = rule

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self.net(x).argmax(1) == y).float().mean(), sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/acc", (self.net(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.torch_sgd:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=self.momentum)
        rule = {"rule": self.rule} if self.rule else {}
        return AsyncMomentumSGD(
            self.parameters(), lr=0.05, momentum=self.momentum, tune=self.tune, horizon=50, **rule
        )


class Record(pl.Callback):
    """Rank 0 writes what it saw: held-out accuracy per applied update, the server's result."""

    def __init__(self, out: Path, die_at: tuple[int, int] | None = None) -> None:
        self.out = out
        self.die_at = die_at
        self.history: list[tuple[int, float]] = []
        self.start: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        served = trainer.strategy.served_optimizers
        if served and isinstance(served[0], AsyncMomentumSGD):
            tuner = served[0].tracker
            self.start = {
                "global_step": trainer.global_step,
                "estimated_workers": tuner.estimated_workers,
                "observations": tuner.estimator.count,
            }

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.die_at is None or trainer.global_rank != self.die_at[0]:
            return
        if trainer.fit_loop.epoch_loop.batch_progress.total.completed >= self.die_at[1]:
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dies mid-run, unannounced

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.history.append((trainer.global_step, float(trainer.callback_metrics["val/acc"])))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        result = trainer.strategy.server_result
        served = trainer.strategy.served_optimizers
        torch.save(
            {
                "estimated_workers": getattr(served[0], "estimated_workers", None),
                "rule": None
                if not hasattr(getattr(served[0], "rule", None), "detector")  # the auto rule's
                else {
                    "largest_batch": served[0].rule.state_dict()["ladder"][-1],
                    "norms_read": served[0].rule.detector.count,
                },
                "momentum": served[0].param_groups[0]["momentum"] if served else None,
                "history": self.history,
                "start": self.start,
                "global_step": trainer.global_step,
                "server": None
                if result is None
                else {
                    "updates": result.updates,
                    "dropped": result.dropped_workers,
                    "stop_reason": result.stop_reason,
                    "estimated_workers": result.estimated_workers,
                },
            },
            self.out,
        )


def _data() -> tuple[DataLoader, DataLoader]:
    data = load_digits_split()
    train = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=32, shuffle=True)
    held_out = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=512)
    return train, held_out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _trainer(
    root: Path,
    groups: int,
    max_steps: int,
    *,
    callbacks: list[pl.Callback],
    start_method: str = "fork",
    worker_timeout: float = 30.0,
    **kwargs: Any,
) -> pl.Trainer:
    return pl.Trainer(
        strategy=AsyncParameterServerStrategy(
            groups=groups,
            worker_timeout=worker_timeout,
            rpc_timeout=30.0,
            start_method=start_method,  # type: ignore[arg-type]
            timeout=timedelta(seconds=60),
        ),
        accelerator="cpu",
        devices=PROCESSES,
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=4,  # batches of rank 0
        num_sanity_val_steps=0,
        log_every_n_steps=5,
        logger=CSVLogger(root, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[AsyncMomentumCallback(0.9), *callbacks],
        **kwargs,
    )


@pytest.fixture
def loopback_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """The job's rendezvous and Lightning's Gloo group on 127.0.0.1."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


def _logged(root: Path, name: str) -> list[float]:
    import csv

    (path,) = root.glob("logs/version_*/metrics.csv")
    with path.open() as file:
        return [float(row[name]) for row in csv.DictReader(file) if row.get(name)]


def _updates_to_target(history: list[tuple[int, float]]) -> float:
    return next((step for step, acc in history if acc >= TARGET_ACCURACY), float("inf"))


def test_groups_are_blocks_of_consecutive_ranks() -> None:
    assert assign_groups(4, 1) == [[0, 1, 2, 3]]
    assert assign_groups(4, 2) == [[0, 1], [2, 3]]
    assert assign_groups(5, 2) == [[0, 1], [2, 3, 4]]
    assert assign_groups(4, 4) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="groups"):
        assign_groups(4, 5)
    with pytest.raises(ValueError, match="groups"):
        AsyncParameterServerStrategy(groups=0)
    with pytest.raises(ValueError, match="worker_timeout"):
        AsyncParameterServerStrategy(worker_timeout=-1)


class _Manual(Digits):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class _Scheduled(Digits):
    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 10)]


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("loopback_job")
@pytest.mark.parametrize(
    ("module", "groups", "message"),
    [
        (Digits(), 3, "groups=3 but the job has 2 processes"),
        (_Manual(), 1, "automatic optimization"),
        (_Scheduled(), 1, "no learning-rate scheduler"),
    ],
    ids=["too-many-groups", "manual", "scheduler"],
)
def test_fit_refuses_what_the_server_cannot_run(
    tmp_path: Path, module: pl.LightningModule, groups: int, message: str
) -> None:
    trainer = pl.Trainer(
        strategy=AsyncParameterServerStrategy(groups=groups, start_method="fork"),
        accelerator="cpu",
        devices=2,
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    train, _ = _data()
    # Raised in the processes at the start of fit, before anything trains; the launcher
    # reports it.
    with pytest.raises(Exception, match=message):
        trainer.fit(module, train)


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("loopback_job")
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_compute_groups_train_to_held_out_accuracy_and_set_the_asynchrony(
    tmp_path: Path, groups: int
) -> None:
    out = tmp_path / "record.pt"
    trainer = _trainer(tmp_path, groups, MAX_STEPS[groups], callbacks=[Record(out)])
    train, held_out = _data()
    trainer.fit(Digits(), train, held_out)

    record = torch.load(out)
    # max_steps counts the updates the server applied.
    assert record["server"]["updates"] == MAX_STEPS[groups]
    assert record["server"]["stop_reason"] == "total_updates"
    assert record["global_step"] == MAX_STEPS[groups]
    assert record["history"], "no validation ran"
    # The logged estimate of M follows the number of groups (the median of the second half of
    # the run: on 2 shared cores a group is sometimes starved for a while).
    logged = _logged(tmp_path, "workers/estimated")
    assert len(logged) >= 10
    assert statistics.median(logged[len(logged) // 2 :]) == pytest.approx(groups, rel=0.3)
    staleness = _logged(tmp_path, "staleness/mean")
    assert staleness, "no staleness logged"
    # The progress bar shows the server's pace and its estimate of M.
    assert float(trainer.callback_metrics["updates/s"]) > 0
    assert float(trainer.callback_metrics["M_hat"]) == pytest.approx(record["estimated_workers"])
    # fit leaves the server's final parameters in the module: a test on every process (each on
    # its shard, reduced) scores them. The bar is on them, not on the last validation, which a
    # starved rank 0 may have run long before the last update.
    (tested,) = trainer.test(trainer.lightning_module, held_out, verbose=False)
    assert tested["test/acc"] >= TARGET_ACCURACY, (tested, record["history"])
    if groups == 2:
        # Validation ran on the server's parameters, not a stale copy: with 2 groups rank 0
        # validates every few of the server's last updates, and scores what the test does.
        assert tested["test/acc"] == pytest.approx(record["history"][-1][1], abs=0.01)


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("loopback_job")
def test_with_four_groups_tuned_momentum_reaches_the_target_in_fewer_updates(
    tmp_path: Path,
) -> None:
    train, held_out = _data()
    runs = {}
    for name, tune in (("tuned", True), ("fixed", False)):
        out = tmp_path / f"{name}.pt"
        trainer = _trainer(tmp_path / name, 4, MAX_STEPS[4], callbacks=[Record(out)])
        trainer.fit(Digits(momentum=0.9, tune=tune), train, held_out)
        runs[name] = _updates_to_target(torch.load(out)["history"])
    assert runs["tuned"] < runs["fixed"], runs


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("loopback_job")
def test_each_push_carries_its_groups_batch_size_to_the_servers_rule(tmp_path: Path) -> None:
    # Two groups of two processes, batches of 32 per process: each push averages 64 samples.
    # The sampler gives each process 337 digits, so an epoch ends with batches of 17: 34 a
    # push, over half of 64, so the auto rule on the server reads every norm.
    out = tmp_path / "record.pt"
    trainer = _trainer(tmp_path, 2, 30, callbacks=[Record(out)])
    train, held_out = _data()
    trainer.fit(Digits(rule="auto"), train, held_out)
    rule = torch.load(out)["rule"]
    assert rule["largest_batch"] == 64.0  # the largest batch the server's rule was handed
    assert rule["norms_read"] == 30


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("loopback_job")
def test_the_callback_tunes_a_torch_optimizer_on_the_server(tmp_path: Path) -> None:
    out = tmp_path / "record.pt"
    trainer = _trainer(tmp_path, 4, 200, callbacks=[Record(out)])
    train, held_out = _data()
    trainer.fit(Digits(torch_sgd=True), train, held_out)

    record = torch.load(out)
    estimated = _logged(tmp_path, "workers/estimated")
    applied = _logged(tmp_path, "momentum/algorithmic")
    assert statistics.median(estimated[len(estimated) // 2 :]) == pytest.approx(4, rel=0.3)
    # The server's torch.optim.SGD gets the additive rule's momentum from the callback's tuner
    # (0.9 - (1 - 1/M_hat), about 0.15 at M = 4), not its own 0.9.
    assert applied[-1] == pytest.approx(record["momentum"])
    assert 0.0 <= record["momentum"] < 0.5
    assert float(trainer.callback_metrics["momentum/total"]) == pytest.approx(0.9, abs=0.05)


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("loopback_job")
def test_checkpoints_hold_the_server_state_and_resume_it(tmp_path: Path) -> None:
    train, held_out = _data()
    first = tmp_path / "first.pt"
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, 2, 120, callbacks=[Record(first), checkpoints])
    trainer.fit(Digits(), train, held_out)
    record = torch.load(first)

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 120
    # The model is the server's: what fit left in the module (the server's final parameters).
    final = trainer.lightning_module.state_dict()
    for name, value in saved["state_dict"].items():
        torch.testing.assert_close(value, final[name], rtol=0, atol=0)
    # The optimizer is the server's, with its tuner: its estimate of M is the server's.
    restored = Digits()
    optimizer = restored.configure_optimizers()
    optimizer.load_state_dict(saved["optimizer_states"][0])
    assert optimizer.estimated_workers == pytest.approx(record["estimated_workers"])
    assert optimizer.estimated_workers == pytest.approx(2, rel=0.3)

    second = tmp_path / "second.pt"
    resumed = _trainer(tmp_path / "resumed", 2, 200, callbacks=[Record(second)])
    resumed.fit(Digits(), train, held_out, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    record = torch.load(second)
    # The server starts where the checkpoint was: 120 updates, the tuner's estimate, and it
    # applies only the 80 updates left to max_steps.
    assert record["start"]["global_step"] == 120
    assert record["start"]["estimated_workers"] == pytest.approx(optimizer.estimated_workers)
    assert record["start"]["observations"] == optimizer.tracker.estimator.count
    assert record["server"]["updates"] == 80
    assert record["global_step"] == 200


def _kill_tree(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        process.wait(timeout=10)


@pytest.mark.slow  # 4 fresh interpreters importing torch and Lightning: ~50 s on 2 busy cores
@pytest.mark.timeout(180)
def test_a_worker_killed_mid_run_is_dropped_and_the_others_finish_with_a_whole_checkpoint(
    tmp_path: Path,
) -> None:
    # The processes are started by hand, as a cluster scheduler starts them: nothing ends the
    # others when one dies.
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(PROCESSES),
        "NODE_RANK": "0",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, __file__, "--out", str(tmp_path), "--die-rank", "3"]
    processes = [
        subprocess.Popen(command, env={**env, "LOCAL_RANK": str(rank)}, cwd=tmp_path)
        for rank in range(PROCESSES)
    ]
    try:
        deadline = time.monotonic() + 150
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in processes]
    finally:
        _kill_tree(processes)
    assert codes[3] == -signal.SIGKILL
    assert codes[:3] == [0, 0, 0], codes
    record = torch.load(tmp_path / "record.pt")
    server = record["server"]
    # The server dropped the dead group (server rank 4) and applied every update asked for.
    assert server["dropped"] == (4,)
    assert server["stop_reason"] == "total_updates"
    assert server["updates"] == SCRIPT_STEPS
    # The estimate of M falls from 4 groups to the 3 left.
    assert record["estimated_workers"] == pytest.approx(3, rel=0.25)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == SCRIPT_STEPS
    Digits().load_state_dict(saved["state_dict"])


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("loopback_job")
def test_under_a_launcher_that_ends_every_process_the_last_checkpoint_resumes(
    tmp_path: Path,
) -> None:
    train, held_out = _data()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    record = tmp_path / "record.pt"
    trainer = _trainer(tmp_path, 4, 400, callbacks=[Record(record, die_at=(3, 30)), checkpoints])
    # Lightning's launcher (as torchrun) ends every process once one has died.
    with pytest.raises(Exception, match="SIGKILL"):
        trainer.fit(Digits(), train, held_out)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert 0 < saved["global_step"] < 400

    resumed = _trainer(tmp_path / "resumed", 4, 400, callbacks=[Record(record)])
    resumed.fit(Digits(), train, held_out, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    result = torch.load(record)
    assert result["start"]["global_step"] == saved["global_step"]
    assert result["global_step"] == 400
    assert result["server"]["updates"] == 400 - saved["global_step"]


def _run_script(
    script: Path, args: list[str], tmp_path: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in ``tmp_path`` on loopback, one thread per process; its finished run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}
    env.update(OMP_NUM_THREADS="1")
    env.pop("MASTER_PORT", None)
    done = subprocess.run(
        [sys.executable, str(script), *args, "--out", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.timeout(180)
def test_the_example_trains_under_lightnings_own_launcher(tmp_path: Path) -> None:
    # Lightning's default launcher re-runs the script for every other process, as for DDP.
    args = ["--devices", "2", "--groups", "2", "--max-steps", "60"]
    done = _run_script(EXAMPLE, args, tmp_path, timeout=150)
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("updates=")]
    fields = dict(item.split("=", 1) for item in line.replace("held-out acc", "acc").split())
    assert fields["updates"] == "60"
    assert float(fields["M_hat"]) == pytest.approx(2, rel=0.3)
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    # Output fit for a log: no advice that does not apply, no transport noise on a clean exit,
    # no progress bar redrawn into a file, no warning twice.
    output = done.stdout + done.stderr
    assert "sync_dist" not in output
    assert "pipe closed" not in output.lower()
    assert "tensorpipe" not in output.lower()
    assert "\r" not in output
    warned = [ln for ln in done.stderr.splitlines() if "Warning" in ln]
    assert len(warned) == len(set(warned)), warned


@pytest.mark.timeout(120)
def test_the_process_groups_are_destroyed_before_the_interpreter_ends(tmp_path: Path) -> None:
    # Lightning destroys them at exit for nccl only; gloo's left to the interpreter's teardown
    # can abort a finished process (pytorch/pytorch#179291). An exit handler registered before
    # fit runs after the strategy's (last in, first out) and sees what that left.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import atexit, runpy, sys\n"
        "import torch.distributed as dist\n"
        "atexit.register(lambda: print(f'initialized at exit: {dist.is_initialized()}'))\n"
        f"sys.argv = [{str(EXAMPLE)!r}, *sys.argv[1:]]\n"
        f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n"
    )
    done = _run_script(probe, ["--devices", "1", "--max-steps", "5"], tmp_path, timeout=100)
    assert "updates=5 " in done.stdout
    assert "initialized at exit: False" in done.stdout, done.stdout[-2000:]


# -- one process of the by-hand job (run as a script) -------------------------------------------

SCRIPT_STEPS = 300


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--die-rank", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, held_out = _data()
    die_at = None if args.die_rank is None else (args.die_rank, 10)
    trainer = _trainer(
        args.out,
        PROCESSES,
        SCRIPT_STEPS,
        callbacks=[
            Record(args.out / "record.pt", die_at=die_at),
            ModelCheckpoint(dirpath=args.out / "ckpt", save_last=True),
        ],
        start_method="popen",
        worker_timeout=3.0,
    )
    trainer.fit(Digits(), train, held_out)
    # Done, and the record and checkpoint are on disk: skip the interpreter's teardown, where
    # Gloo's threads can abort a process after its work (pytorch/pytorch#179291), as the
    # package's own launchers do.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _main()
