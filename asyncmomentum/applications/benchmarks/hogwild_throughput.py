"""Updates per second of Hogwild training, and what the momentum tuning costs in it.

Trains the digits CNN with Hogwild processes (1, 2, 4 workers) sharing one
AsyncMomentumSGD(momentum=0.9), ``--runs`` times each, and prints the updates per second of each
worker count (min / median / max over the runs) and the speed-up over 1 worker. The rate is
taken after a warm-up (the first ``--warmup`` steps of every worker: a fresh process allocates
and fills its caches), from the workers' progress reports, so that start-up is not in it. The
machine's load average is printed before and after: on a machine where other jobs hold cores,
workers do not scale, and the figure says why. Then it times, in this process, the tuning part
of a step (clock tick and staleness record in one critical section, the rule's momentum)
against a whole worker step (forward, backward, optimizer step) of the same model, and prints
the tuning's share: it must stay < 2%. The parameter server has its own benchmark,
``server_throughput``.

    python benchmarks/hogwild_throughput.py           # full run: 600 steps per worker, 3 runs
    python benchmarks/hogwild_throughput.py --quick   # 150 steps per worker

The same runs as ``python -m asyncmomentum.applications.benchmarks.hogwild_throughput`` (what
``asyncmomentum bench hogwild_throughput`` does), from an installed wheel too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.optimizer import ParamsT

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.applications.digits import SmallCNN, iterate_batches, load_digits_split
from asyncmomentum.runtimes.hogwild import classification_loss, train_hogwild

WORKER_COUNTS = (1, 2, 4)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN()


def _optimizer(params: ParamsT) -> AsyncMomentumSGD:
    return AsyncMomentumSGD(params, lr=0.05, momentum=0.9)


def hogwild_rate(workers: int, steps: int, warmup: int) -> float:
    """Updates per second with ``workers`` Hogwild processes, after the warm-up.

    Args:
        workers: worker processes.
        steps: steps per worker, warm-up included.
        warmup: steps per worker left out of the rate.
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
        report_every=10,
        timeout=600,
    )
    result.raise_if_failed()
    return result.steady_updates_per_second(warmup_updates=warmup * workers)


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
        opt.tracker.version_read = opt.tracker.clock.value - 3
        opt.tracker.record_update()
        opt.tracker.algorithmic_momentum(0.9)
        tuning.append(time.perf_counter() - start)
    tuning_us = statistics.median(tuning) * 1e6
    whole_us = statistics.median(whole) * 1e6
    return tuning_us, whole_us, tuning_us / whole_us


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's argument parser."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="150 steps per worker, not 600")
    parser.add_argument("--runs", type=int, default=3, help="runs per worker count")
    parser.add_argument(
        "--warmup", type=int, default=50, help="steps per worker left out of the rate"
    )
    return parser


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its figures; returns the exit code.

    Args:
        argv: command-line arguments (``None`` reads ``sys.argv``).
    """
    args = build_parser().parse_args(argv)
    steps = 150 if args.quick else 600
    runs = max(args.runs, 1)
    torch.set_num_threads(1)
    print(
        f"digits CNN, AsyncMomentumSGD, Hogwild: {steps} steps per worker, the first "
        f"{args.warmup} left out, {runs} runs, {torch.get_num_threads()} thread per process"
    )
    print(f"load average before: {_load()}")
    print(f"{'workers':>7} {'upd/s min':>10} {'median':>8} {'max':>8} {'speed-up':>9}")
    medians: dict[int, float] = {}
    for workers in WORKER_COUNTS:
        rates = sorted(hogwild_rate(workers, steps, args.warmup) for _ in range(runs))
        medians[workers] = statistics.median(rates)
        print(
            f"{workers:>7} {rates[0]:>10.0f} {medians[workers]:>8.0f} {rates[-1]:>8.0f} "
            f"{medians[workers] / medians[WORKER_COUNTS[0]]:>8.2f}x"
        )
    print(f"load average after: {_load()}")
    tuning_us, whole_us, share = tuning_share(300 if args.quick else 1000)
    print(f"tuning: {tuning_us:.1f} us of a {whole_us:.0f} us worker step = {share:.2%} (limit 2%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
