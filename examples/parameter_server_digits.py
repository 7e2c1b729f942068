"""Train a small CNN on the digits with an asynchronous parameter server on torch.distributed.

Rank 0 is the server: it owns the model and an AsyncMomentumSGD, and applies every gradient as it
arrives, tagged with the staleness it measured. The other ranks are workers, each on its shard of
the data. As it trains it prints the staleness, the estimated number of workers M, the implicit
momentum ``1 - 1/M`` the asynchrony adds and the algorithmic momentum the optimizer applies so
that the total stays at the target. At the end it prints the held-out accuracy.

One machine, spawned processes on 127.0.0.1::

    python examples/parameter_server_digits.py --workers 3

With torchrun (rank 0 is the server; the same script runs across machines with --nnodes)::

    torchrun --nproc-per-node 4 examples/parameter_server_digits.py

or with the environment variables alone, one command per process (RANK=0 is the server)::

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 WORLD_SIZE=4 RANK=0 \
        python examples/parameter_server_digits.py

torchrun ends the whole group when one worker dies; started without it, the server drops a dead
worker and trains on with the others.

Compare with torch's SGD (fixed momentum 0.9) under the same asynchrony: ``--optimizer sgd``.
Choose the tuning rule with ``--rule``: ``stability`` probes the curvature of the server's model
on 256 training images every 50 updates; ``closed_loop`` corrects the momentum from what the
momentum meter measures.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from asyncmomentum.applications.digits import SmallCNN, accuracy, iterate_batches, load_digits_split
from asyncmomentum.core.optimizer import AsyncMomentumSGD
from asyncmomentum.core.tuning.rules import rule_class, rule_names
from asyncmomentum.runtimes.server import (
    ParameterServerJob,
    ServerConfig,
    ServerResult,
    TracePoint,
    launch_local,
    load_checkpoint,
    run_from_env,
)


def make_model() -> SmallCNN:
    """The model every rank builds; the server's initial weights are these (seeded)."""
    torch.manual_seed(0)
    return SmallCNN()


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    *,
    kind: str,
    lr: float,
    momentum: float,
    horizon: int,
    rule: str = "additive",
) -> torch.optim.Optimizer:
    """The server's optimizer.

    Args:
        params: the model's parameters.
        kind: ``"async"`` for AsyncMomentumSGD aiming at a total ``momentum``, ``"sgd"`` for
            torch's SGD with that momentum on top of whatever the asynchrony adds.
        lr: learning rate.
        momentum: target total momentum (async) or fixed momentum (sgd).
        horizon: updates over which AsyncMomentumSGD averages the staleness.
        rule: AsyncMomentumSGD's tuning rule.
    """
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return AsyncMomentumSGD(
        params,
        lr=lr,
        momentum=momentum,
        horizon=horizon,
        warmup=20,
        rule=rule,
        curvature_every=50,
    )


def curvature_probe(model: torch.nn.Module, *, seed: int, size: int = 256) -> functools.partial:
    """The stability rule's probe on the server's model: its loss on ``size`` training images.

    Args:
        model: the server's model.
        seed: seed of the digits split.
        size: images in the probe batch.
    """
    split = load_digits_split(seed=seed)
    return functools.partial(probe_loss, model, split.x_train[:size], split.y_train[:size])


def probe_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``model`` on one fixed batch, with its graph."""
    return F.cross_entropy(model(x), y)


def worker_batches(
    worker_index: int, num_workers: int, *, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches from this worker's shard (every ``num_workers``-th image).

    Args:
        worker_index: 0-based index of the worker.
        num_workers: number of workers.
        batch_size: images per batch.
        seed: seed of the split and of the shuffling.
    """
    split = load_digits_split(seed=seed)
    shard = slice(worker_index, None, num_workers)
    return iterate_batches(
        split.x_train[shard], split.y_train[shard], batch_size, seed=seed + worker_index
    )


def print_progress(point: TracePoint) -> None:
    """One line per ``--log-every`` updates (runs in the server process)."""
    print(
        f"update {point.update:5d} | worker {point.worker} | loss {point.loss:6.3f} | "
        f"staleness {point.staleness:2d} | M_hat {point.estimated_workers:5.2f} | "
        f"implicit {point.implicit_momentum:+.3f} | algorithmic {point.algorithmic_momentum:+.3f}",
        flush=True,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3, help="local job only (default 3)")
    parser.add_argument("--updates", type=int, default=1500, help="updates the server applies")
    parser.add_argument("--optimizer", choices=["async", "sgd"], default="async")
    parser.add_argument(
        "--rule", choices=rule_names(), default="additive", help="AsyncMomentumSGD's rule"
    )
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9, help="target (async) or fixed")
    parser.add_argument("--horizon", type=int, default=100, help="staleness averaging span")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument(
        "--worker-timeout", type=float, default=10.0, help="seconds of silence that drop a worker"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint",
        default=os.path.join("asyncmomentum-server", "digits.pt"),
        help="where the server saves model and optimizer at the end (its folder is created; "
        "default: ./asyncmomentum-server/digits.pt)",
    )
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[ParameterServerJob, ServerConfig]:
    """The job every rank runs and the server's configuration, from the command line.

    Args:
        args: the parsed command line.

    Returns:
        The job (model, optimizer, worker batches, curvature probe) and the server's config.
    """
    job = ParameterServerJob(
        model_fn=make_model,
        optimizer_fn=functools.partial(
            make_optimizer,
            kind=args.optimizer,
            lr=args.lr,
            momentum=args.momentum,
            horizon=args.horizon,
            rule=args.rule,
        ),
        batches_fn=functools.partial(worker_batches, batch_size=args.batch_size, seed=args.seed),
        seed=args.seed,
        probe_fn=(
            functools.partial(curvature_probe, seed=args.seed)
            if args.optimizer == "async" and rule_class(args.rule).uses_curvature
            else None
        ),
    )
    config = ServerConfig(
        total_updates=args.updates,
        checkpoint_path=args.checkpoint,
        progress_every=args.log_every,
        on_progress=print_progress,
        horizon=args.horizon,
        worker_timeout=args.worker_timeout,
    )
    return job, config


def report(result: ServerResult, args: argparse.Namespace, seconds: float) -> None:
    """Summary and held-out accuracy of the checkpoint the server saved."""
    model = make_model()
    load_checkpoint(result.checkpoint_path, model)
    split = load_digits_split(seed=args.seed)
    print(
        f"\n{args.optimizer} ({args.rule} rule): {result.updates} updates in "
        f"{result.wall_time:.2f} s of training "
        f"({result.updates_per_second:.0f} updates/s; {seconds:.1f} s with start-up)\n"
        f"updates per worker {result.updates_per_worker}, dropped {list(result.dropped_workers)}\n"
        f"mean staleness {result.mean_staleness:.2f} -> M_hat {result.estimated_workers:.2f}, "
        f"implicit momentum {result.implicit_momentum:+.3f}, "
        f"algorithmic momentum {result.algorithmic_momentum:+.3f}\n"
        f"optimizer.step: {100 * result.optimizer_share:.0f}% of the locked section, "
        f"{100 * result.wall_shares()['step']:.0f}% of the server's wall time; server CPU "
        f"{1e3 * result.cpu_seconds_per_update:.2f} ms per update\n"
        f"held-out accuracy {accuracy(model, split.x_test, split.y_test):.3f}\n"
        f"checkpoint: {result.checkpoint_path}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run one rank of a torchrun job, or a local job of spawned processes, then report.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv``.
    """
    args = parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.checkpoint)), exist_ok=True)
    job, config = build(args)
    began = time.monotonic()
    if "RANK" in os.environ:  # started by torchrun (or by hand with the env variables)
        result = run_from_env(job, config)
        if isinstance(result, ServerResult):
            report(result, args, time.monotonic() - began)
    else:
        print(f"local job: 1 server + {args.workers} workers on 127.0.0.1", flush=True)
        local = launch_local(job, workers=args.workers, config=config)
        report(local.server, args, time.monotonic() - began)


if __name__ == "__main__":
    main()
