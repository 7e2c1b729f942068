"""Step time of AsyncMomentumSGD against torch.optim.SGD, measured side by side in one run.

A ResNet-18-shaped parameter list (62 tensors, 11.7M parameters) with fixed random gradients;
both optimizers use momentum 0.9 (ours: target 0.9 with tuning on, fed geometric staleness of
M = 4 workers). Steps alternate between the two optimizers so that both see the same machine
state; the figure is the ratio of median step times (below 1: ours is faster).

    python benchmarks/step_overhead.py            # every path: foreach (the headline), ...
    python benchmarks/step_overhead.py --steps 200 --paths foreach
    python benchmarks/step_overhead.py --meter --rule stability   # issue 6's overhead check

The same runs as ``python -m asyncmomentum.applications.benchmarks.step_overhead`` (what
``asyncmomentum bench step_overhead`` does), from an installed wheel too.

With ``--rule stability`` the optimizer also estimates the curvature every ``--curvature-every``
updates (Hessian-vector products on a quadratic loss of the parameters: the probe a user would
supply). The median step shows the per-step cost; the mean, also printed, spreads the periodic
costs (curvature estimates, the meter's fits) over the steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.core.tuning.rules import rule_class, rule_names

PATHS: dict[str, dict[str, bool]] = {
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "single": {"foreach": False},
    # Each optimizer's own choice: ours runs the fused kernel on CPU float32, torch the loop.
    "default": {},
}


def resnet18_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's ResNet-18 (1000 classes), without needing torchvision."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    stages = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
    for c_in, c_out, stride in stages:
        for block in range(2):
            first_in = c_in if block == 0 else c_out
            shapes += [(c_out, first_in, 3, 3), (c_out,), (c_out,)]
            shapes += [(c_out, c_out, 3, 3), (c_out,), (c_out,)]
            if block == 0 and (stride != 1 or c_in != c_out):
                shapes += [(c_out, c_in, 1, 1), (c_out,), (c_out,)]
    return [*shapes, (1000, 512), (1000,)]


def _parameters(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in resnet18_shapes():
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.01)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    return params


def _quadratic_probe(params: list[torch.nn.Parameter], seed: int) -> Callable[[], torch.Tensor]:
    """A loss ``1/2 sum h p^2`` with random positive curvatures ``h``: a probe with a Hessian."""
    gen = torch.Generator().manual_seed(seed + 1)
    curvatures = [torch.rand(p.shape, generator=gen) for p in params]

    def probe() -> torch.Tensor:
        return 0.5 * sum((h * p * p).sum() for h, p in zip(curvatures, params, strict=True))

    return probe


def measure(
    path: str,
    steps: int,
    warmup: int = 5,
    seed: int = 0,
    meter: bool = False,
    rule: str = "additive",
    curvature_every: int = 100,
) -> dict[str, float]:
    """Median step times (ms) of both optimizers on one path, interleaved step by step.

    Args:
        path: a key of :data:`PATHS`: ``"foreach"``, ``"fused"``, ``"single"`` or ``"default"``
            (each optimizer's own choice).
        steps: timed steps per optimizer.
        warmup: untimed steps per optimizer first.
        seed: seed of parameters, gradients and staleness.
        meter: also run the momentum meter (``measure_momentum=True``).
        rule: our tuning rule.
        curvature_every: updates between curvature estimates (``rule="stability"``).
    """
    params = _parameters(seed)
    ours = AsyncMomentumSGD(
        params,
        lr=1e-3,
        momentum=0.9,
        measure_momentum=meter,
        rule=rule,
        curvature_probe=(
            _quadratic_probe(params, seed) if rule_class(rule).uses_curvature else None
        ),
        curvature_every=curvature_every,
        **PATHS[path],
    )
    torch_sgd = torch.optim.SGD(_parameters(seed), lr=1e-3, momentum=0.9, **PATHS[path])
    staleness = iter(np.random.default_rng(seed).geometric(0.25, size=steps + warmup) - 1)

    def ours_step() -> None:
        ours.step(staleness=int(next(staleness)))

    timings: dict[str, list[float]] = {"ours": [], "torch": []}
    runners: list[tuple[str, Callable[[], None]]] = [("ours", ours_step), ("torch", torch_sgd.step)]
    for i in range(warmup + steps):
        # Alternate who goes first, so neither always runs on a cache the other just warmed.
        for name, run in runners if i % 2 == 0 else runners[::-1]:
            start = time.perf_counter()
            run()
            if i >= warmup:
                timings[name].append(time.perf_counter() - start)
    ours_ms = statistics.median(timings["ours"]) * 1e3
    torch_ms = statistics.median(timings["torch"]) * 1e3
    ours_mean_ms = statistics.fmean(timings["ours"]) * 1e3
    torch_mean_ms = statistics.fmean(timings["torch"]) * 1e3
    return {
        "path": path,
        "rule": rule,
        "meter": meter,
        "ours_ms": ours_ms,
        "torch_ms": torch_ms,
        "ratio": ours_ms / torch_ms,
        "ours_mean_ms": ours_mean_ms,
        "torch_mean_ms": torch_mean_ms,
        "mean_ratio": ours_mean_ms / torch_mean_ms,
        "estimated_workers": ours.estimated_workers,
        "algorithmic_momentum": ours.algorithmic_momentum,
        "curvature": ours.curvature,
    }


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's argument parser."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per optimizer")
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=list(PATHS),
        default=list(PATHS),
        help="update paths to time (default: all; 'default' is each optimizer's own choice)",
    )
    parser.add_argument("--meter", action="store_true", help="ours with measure_momentum=True")
    parser.add_argument("--rule", choices=rule_names(), default="additive", help="our tuning rule")
    parser.add_argument(
        "--curvature-every",
        type=int,
        default=100,
        help="updates between curvature estimates (--rule stability)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def run(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    """Run the benchmark and print one line per path; returns the measurements.

    Args:
        argv: command-line arguments (``None`` reads ``sys.argv``).
    """
    args = build_parser().parse_args(argv)
    params = resnet18_shapes()
    numel = sum(int(np.prod(s)) for s in params)
    results = [
        measure(
            path,
            args.steps,
            meter=args.meter,
            rule=args.rule,
            curvature_every=args.curvature_every,
        )
        for path in args.paths
    ]
    if args.json:
        print(json.dumps(results, indent=2))
        return results
    print(
        f"ResNet-18-shaped parameters: {len(params)} tensors, {numel / 1e6:.2f}M elements; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps; "
        f"ours: rule {args.rule!r}{', meter on' if args.meter else ''}"
    )
    print(
        f"{'path':<8} {'AsyncMomentumSGD ms':>20} {'torch.optim.SGD ms':>19} {'ratio':>7} "
        f"{'mean ratio':>11}"
    )
    for r in results:
        print(
            f"{r['path']:<8} {r['ours_ms']:>20.2f} {r['torch_ms']:>19.2f} {r['ratio']:>7.3f} "
            f"{r['mean_ratio']:>11.3f}"
        )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print one line per path; returns the exit code.

    Args:
        argv: command-line arguments (``None`` reads ``sys.argv``).
    """
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
