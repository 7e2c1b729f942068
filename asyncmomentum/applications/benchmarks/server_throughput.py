"""Updates per second of the parameter server, on each transport (c10d, the default, and RPC).

Trains the digits CNN with AsyncMomentumSGD(momentum=0.9) on 1 server + 1, 2, 4 worker
processes on loopback (one flat gradient tensor per push, one flat parameter tensor per
reply). Every job first applies a warm-up (start-up, first connections) outside the server's
timers, then at least ``--updates`` updates per worker inside them. The transports' jobs are
interleaved, so every one sees the same load. Over ``--runs`` repetitions it prints, per
transport and worker count:

* updates/s, min / median / max, and the ratio of the medians (c10d / RPC);
* per-worker updates: the fewest and the most any worker got, over their mean (fair service);
* the server's CPU time per update (its whole process: I/O threads, (de)serialization, updates);
* where the server's wall time went: ``optimizer.step``, copying parameters out for replies, the
  rest of the locked section, and outside the lock (transfer, the handlers' checks, waiting
  for gradients);
* the machine's load average (``os.getloadavg``, as ``uptime`` prints it) before and after.

Then the link by itself (:mod:`asyncmomentum.applications.link_costs`): the round trip of one
digits-CNN message through an echo server, and the CPU share of a server and of a worker that
wait, connected and idle.

    python benchmarks/server_throughput.py           # full run: 600 updates per worker, 3 runs
    python benchmarks/server_throughput.py --quick   # 60 updates per worker, 3 runs

The same runs as ``python -m asyncmomentum.applications.benchmarks.server_throughput`` (what
``asyncmomentum bench server_throughput`` does), from an installed wheel too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.applications import link_costs
from asyncmomentum.applications.digits import SmallCNN, iterate_batches, load_digits_split
from asyncmomentum.runtimes.hogwild import shard
from asyncmomentum.runtimes.server import (
    ParameterServerJob,
    ServerConfig,
    ServerResult,
    launch_local,
)

WORKER_COUNTS = (1, 2, 4)
TRANSPORTS = ("c10d", "rpc")
SHARES = ("step", "copy_out", "other_locked", "outside_lock")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN()


def _optimizer(params: Iterable[nn.Parameter]) -> AsyncMomentumSGD:
    return AsyncMomentumSGD(params, lr=0.05, momentum=0.9)


def _worker_batches(worker_index: int, num_workers: int) -> Iterable[Any]:
    data = load_digits_split()
    x, y = shard((data.x_train, data.y_train), worker_index, num_workers)
    return iterate_batches(x, y, batch_size=32, seed=worker_index)


def load() -> float:
    """The 1-minute load average of the machine, as ``uptime`` prints it."""
    return os.getloadavg()[0]


def one_job(workers: int, updates: int, warmup: int, transport: str = "c10d") -> dict[str, Any]:
    """Run one job and return its figures.

    Args:
        workers: worker processes (plus one server process).
        updates: updates per worker inside the server's timers.
        warmup: updates per worker before the timers start.
        transport: the server's transport.
    """
    job = ParameterServerJob(model_fn=_model, optimizer_fn=_optimizer, batches_fn=_worker_batches)
    config = ServerConfig(
        total_updates=(warmup + updates) * workers,
        measure_after=warmup * workers,
        transport=transport,
    )
    before = load()
    result: ServerResult = launch_local(job, workers=workers, config=config, timeout=600).server
    counts = list(result.updates_per_worker.values())
    mean = statistics.mean(counts)
    return {
        "transport": transport,
        "workers": workers,
        "fewest_share": min(counts) / mean,
        "most_share": max(counts) / mean,
        "updates_per_second": result.measured_updates_per_second,
        "measured_updates": result.measured_updates,
        "cpu_ms_per_update": result.cpu_seconds_per_update * 1e3,
        "lock_wait_us_per_update": result.lock_wait_seconds / max(result.measured_updates, 1) * 1e6,
        "shares": result.wall_shares(),
        "load_before": before,
        "load_after": load(),
    }


def run(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark, print its table, and return one summary per worker count.

    Args:
        argv: command-line arguments (``None`` reads ``sys.argv``).
    """
    args = build_parser().parse_args(argv)
    updates = args.updates if args.updates is not None else (60 if args.quick else 600)
    warmup = max(updates // 10, 5)
    torch.set_num_threads(1)
    print(
        f"digits CNN, AsyncMomentumSGD, 1 server + N workers on loopback; {warmup} warm-up + "
        f"{updates} timed updates per worker; {args.runs} runs; load average now {load():.2f}"
    )
    jobs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(args.runs):
        for workers in args.workers:  # interleaved: every job sees the same load
            for transport in args.transports:
                runs = jobs.setdefault((transport, workers), [])
                runs.append(one_job(workers, updates, warmup, transport))
    summaries = [_summary(runs) for runs in jobs.values()]
    _print_table(summaries)
    costs = _link_costs(args.transports, round_trips=500 if args.quick else 3000)
    summaries.extend(costs)
    if args.json:
        print(json.dumps(summaries))
    return summaries


def _link_costs(transports: Sequence[str], round_trips: int) -> list[dict[str, Any]]:
    """Measure and print every transport's round trip and idle CPU, side by side."""
    numel = sum(p.numel() for p in _model().parameters())
    print(
        f"\nthe link alone: echo server, {numel} float32 per message, median of 5 blocks of "
        f"{round_trips // 5} round trips; CPU share of a process waiting idle, connected, 2 s"
    )
    print(f"{'transport':>9} {'round trip us':>13} {'idle server CPU':>15} {'idle worker CPU':>15}")
    costs = []
    for transport in transports:
        figures = {"transport": transport, **link_costs.measure(transport, numel, round_trips, 2.0)}
        costs.append(figures)
        print(
            f"{transport:>9} {figures['round_trip_us']:>13.0f} "
            f"{figures['idle_server_cpu']:>15.1%} {figures['idle_worker_cpu']:>15.1%}"
        )
    if len(costs) == 2:
        new, old = costs
        print(
            f"{new['transport']} / {old['transport']}: round trip "
            f"{new['round_trip_us'] / old['round_trip_us']:.2f}x, idle worker CPU "
            f"{new['idle_worker_cpu'] / max(old['idle_worker_cpu'], 1e-9):.3f}x"
        )
    return costs


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["updates_per_second"] for r in runs]
    return {
        "transport": runs[0]["transport"],
        "workers": runs[0]["workers"],
        "fewest_share": min(r["fewest_share"] for r in runs),
        "most_share": max(r["most_share"] for r in runs),
        "runs": len(runs),
        "updates_per_second": {
            "min": min(rates),
            "median": statistics.median(rates),
            "max": max(rates),
        },
        "measured_updates": min(r["measured_updates"] for r in runs),
        "cpu_ms_per_update": statistics.median(r["cpu_ms_per_update"] for r in runs),
        "lock_wait_us_per_update": statistics.median(r["lock_wait_us_per_update"] for r in runs),
        "shares": {k: statistics.median(r["shares"][k] for r in runs) for k in SHARES},
        "load": [min(r["load_before"] for r in runs), max(r["load_after"] for r in runs)],
    }


def _print_table(summaries: list[dict[str, Any]]) -> None:
    print(
        f"{'transport':>9} {'workers':>7} {'upd/s min/median/max':>22} {'per worker':>11} "
        f"{'CPU ms/upd':>10} "
        f"{'step':>5} {'copy':>5} {'locked':>6} {'outside':>7} {'wait us':>7} {'load':>10}"
    )
    medians = {(s["transport"], s["workers"]): s["updates_per_second"]["median"] for s in summaries}
    for s in summaries:
        rate, shares = s["updates_per_second"], s["shares"]
        rates = f"{rate['min']:.0f}/{rate['median']:.0f}/{rate['max']:.0f}"
        fair = f"{s['fewest_share']:.2f}-{s['most_share']:.2f}"
        print(
            f"{s['transport']:>9} {s['workers']:>7} {rates:>22} {fair:>11} "
            f"{s['cpu_ms_per_update']:>10.3f} "
            f"{shares['step']:>5.1%} {shares['copy_out']:>5.1%} {shares['other_locked']:>6.1%} "
            f"{shares['outside_lock']:>7.1%} {s['lock_wait_us_per_update']:>7.0f} "
            f"{s['load'][0]:>4.2f}-{s['load'][1]:<4.2f}"
        )
    for (transport, workers), median in medians.items():
        if transport != TRANSPORTS[0] and (TRANSPORTS[0], workers) in medians:
            ratio = medians[(TRANSPORTS[0], workers)] / median
            print(f"{workers} workers: {TRANSPORTS[0]} / {transport} updates/s {ratio:.2f}x")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _worker_counts(text: str) -> tuple[int, ...]:
    counts = tuple(int(part) for part in text.split(","))
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"worker counts must be positive integers, got {text!r}")
    return counts


def _transports(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    unknown = [name for name in names if name not in TRANSPORTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"transports are {list(TRANSPORTS)}, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's argument parser."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 updates per worker, not 600")
    parser.add_argument(
        "--updates",
        type=_positive,
        default=None,
        help="timed updates per worker (overrides --quick)",
    )
    parser.add_argument("--runs", type=_positive, default=3, help="repetitions of every job")
    parser.add_argument(
        "--workers",
        type=_worker_counts,
        default=WORKER_COUNTS,
        help="comma-separated worker counts (default 1,2,4)",
    )
    parser.add_argument(
        "--transports",
        type=_transports,
        default=TRANSPORTS,
        help="comma-separated transports (default c10d,rpc)",
    )
    parser.add_argument("--json", action="store_true", help="also print the summaries as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its figures; returns the exit code.

    Args:
        argv: command-line arguments (``None`` reads ``sys.argv``).
    """
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
