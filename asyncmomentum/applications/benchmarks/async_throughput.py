"""Updates per second of real asynchronous training, and what the momentum tuning costs in it.

Trains the digits CNN with Hogwild processes (1, 2, 4 workers) and with the parameter server on
loopback (1 server + 1, 2, 4 workers), AsyncMomentumSGD(momentum=0.9) in both, and prints
the updates per second of each. Then it times, in this process, the tuning part of a step (clock
tick, staleness observation, momentum from the rule) against a whole worker step (forward,
backward, optimizer step) of the same model, and prints the tuning's share: it must stay < 2%.

    python benchmarks/async_throughput.py           # full run, a few minutes on 2 cores
    python benchmarks/async_throughput.py --quick   # fewer steps

The same runs as ``python -m asyncmomentum.applications.benchmarks.async_throughput`` (what
``asyncmomentum bench async_throughput`` does), from an installed wheel too.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.applications.digits import SmallCNN, iterate_batches, load_digits_split
from asyncmomentum.runtimes.hogwild import classification_loss, shard, train_hogwild
from asyncmomentum.runtimes.server import ParameterServerJob, ServerConfig, launch_local

WORKER_COUNTS = (1, 2, 4)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN()


def _optimizer(params) -> AsyncMomentumSGD:
    return AsyncMomentumSGD(params, lr=0.05, momentum=0.9)


def _worker_batches(worker_index: int, num_workers: int):
    data = load_digits_split()
    x, y = shard((data.x_train, data.y_train), worker_index, num_workers)
    return iterate_batches(x, y, batch_size=32, seed=worker_index)


def hogwild_rate(workers: int, steps: int) -> float:
    """Updates per second of training time with ``workers`` Hogwild processes.

    Args:
        workers: worker processes.
        steps: steps per worker.
    """
    data = load_digits_split()
    model = _model()
    result = train_hogwild(
        model,
        _optimizer(model.parameters()),
        classification_loss,
        (data.x_train, data.y_train),
        workers=workers,
        steps_per_worker=steps,
        timeout=600,
    )
    result.raise_if_failed()
    return result.total_updates / result.train_time


def server_rate(workers: int, updates: int) -> tuple[float, float]:
    """Updates per second of the parameter server, and the optimizer's share of its update time.

    Args:
        workers: worker processes (plus one server process).
        updates: gradients the server applies before it stops.
    """
    job = ParameterServerJob(model_fn=_model, optimizer_fn=_optimizer, batches_fn=_worker_batches)
    outcome = launch_local(
        job, workers=workers, config=ServerConfig(total_updates=updates), timeout=600
    )
    return outcome.server.updates_per_second, outcome.server.optimizer_share


def tuning_share(repeats: int) -> tuple[float, float, float]:
    """Median microseconds of the tuning part of a step, of a whole step, and their ratio.

    Args:
        repeats: timed repetitions of each.
    """
    data = load_digits_split()
    batches = iterate_batches(data.x_train, data.y_train, batch_size=32)
    model = _model()
    opt = _optimizer(model.parameters())
    tuning, whole = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.zero_grad()
        classification_loss(model, next(batches)).backward()
        opt.step()
        whole.append(time.perf_counter() - start)
        # Exactly what step() adds for tuning: claim a version, observe, ask the rule.
        start = time.perf_counter()
        opt.clock.tick()
        opt.tuner.observe(3)
        opt.tuner.algorithmic_momentum(0.9)
        tuning.append(time.perf_counter() - start)
    tuning_us = statistics.median(tuning) * 1e6
    whole_us = statistics.median(whole) * 1e6
    return tuning_us, whole_us, tuning_us / whole_us


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's argument parser."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its figures; returns the exit code.

    Args:
        argv: command-line arguments (``None`` reads ``sys.argv``).
    """
    args = build_parser().parse_args(argv)
    steps = 60 if args.quick else 200
    torch.set_num_threads(1)
    print(
        f"digits CNN, AsyncMomentumSGD, {steps} steps per Hogwild worker / "
        f"{steps * 2} server updates, {torch.get_num_threads()} thread per process"
    )
    print(
        f"{'workers':>7} {'hogwild upd/s':>14} {'server upd/s':>13} {'server optimizer share':>23}"
    )
    for workers in WORKER_COUNTS:
        hogwild = hogwild_rate(workers, steps)
        server, share = server_rate(workers, steps * 2)
        print(f"{workers:>7} {hogwild:>14.0f} {server:>13.0f} {share:>23.1%}")
    tuning_us, whole_us, share = tuning_share(300 if args.quick else 1000)
    print(f"tuning: {tuning_us:.1f} us of a {whole_us:.0f} us worker step = {share:.2%} (limit 2%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
