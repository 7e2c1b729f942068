"""Step time of AsyncMomentumSGD against torch.optim.SGD, measured side by side in one run.

A parameter list shaped like ResNet-18 (62 tensors, 11.7M parameters; ``--shapes`` also has
500 tensors of 100 and the digits CNN); both optimizers use momentum 0.9 (ours: target 0.9 with
tuning on, fed geometric staleness of M = 4 workers). Before every step each optimizer's
gradients come out of a backward pass (``loss = sum(c * p)`` with fixed random ``c``), as in
training, so that our backward-time NaN/inf check runs where it would (``--grads manual`` sets
them by hand instead, and the check runs at the step). Steps alternate between the two
optimizers so that both see the same machine state. The figure is the ratio of median step
times (below 1: ours is faster), taken over ``--repeats`` runs: the median run's, with the
fastest and slowest beside it. Beside them: the backward pass's median ms (ours / torch's:
what the check costs there) and the ratio of backward + step, the whole iteration. The load of
the machine is printed with the figures.

    python benchmarks/step_overhead.py            # every path: foreach (the headline), ...
    python benchmarks/step_overhead.py --steps 200 --paths foreach
    python benchmarks/step_overhead.py --shapes small-many --paths fused single
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
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.core.tuning.rules import rule_class, rule_names

PATHS: dict[str, dict[str, Any]] = {
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


def digits_cnn_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of the bundled digits CNN (6 tensors, 6.2K parameters)."""
    from asyncmomentum.applications.digits import SmallCNN

    return [tuple(p.shape) for p in SmallCNN().parameters()]


SHAPES: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet18": resnet18_shapes,
    "small-many": lambda: [(100,)] * 500,
    "digits-cnn": digits_cnn_shapes,
}


def _parameters(shapes: list[tuple[int, ...]], seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.01) for shape in shapes]


def _gradient_source(
    params: list[torch.nn.Parameter], coefficients: list[torch.Tensor], grads: str
) -> Callable[[], None]:
    """Gives every parameter a fresh gradient, the same at every call: ``coefficients``."""
    if grads == "manual":

        def set_by_hand() -> None:
            for p, c in zip(params, coefficients, strict=True):
                p.grad = c.clone()

        return set_by_hand

    def backward() -> None:
        for p in params:
            p.grad = None
        loss = sum((p * c).sum() for p, c in zip(params, coefficients, strict=True))
        cast(torch.Tensor, loss).backward()  # a sum of tensors: never the start value 0

    return backward


def _quadratic_probe(params: list[torch.nn.Parameter], seed: int) -> Callable[[], torch.Tensor]:
    """A loss ``1/2 sum h p^2`` with random positive curvatures ``h``: a probe with a Hessian."""
    gen = torch.Generator().manual_seed(seed + 1)
    curvatures = [torch.rand(p.shape, generator=gen) for p in params]

    def probe() -> torch.Tensor:
        total = sum((h * p * p).sum() for h, p in zip(curvatures, params, strict=True))
        return 0.5 * cast(torch.Tensor, total)  # a sum of tensors: never the start value 0

    return probe


def measure(
    path: str,
    steps: int,
    warmup: int = 5,
    seed: int = 0,
    meter: bool = False,
    rule: str = "additive",
    curvature_every: int = 100,
    shapes: str = "resnet18",
    grads: str = "backward",
) -> dict[str, Any]:
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
        shapes: a key of :data:`SHAPES`.
        grads: ``"backward"`` (gradients from a backward pass before each step) or
            ``"manual"`` (set by hand).
    """
    param_shapes = SHAPES[shapes]()
    params = _parameters(param_shapes, seed)
    torch_params = _parameters(param_shapes, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    coefficients = [torch.randn(shape, generator=gen) * 1e-3 for shape in param_shapes]
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
    torch_sgd = torch.optim.SGD(torch_params, lr=1e-3, momentum=0.9, **PATHS[path])
    staleness = iter(np.random.default_rng(seed).geometric(0.25, size=steps + warmup) - 1)

    def ours_step() -> None:
        # A loss, as a training loop would hand it (the auto rule watches it; others ignore it).
        ours.step(staleness=int(next(staleness)), loss=1.0)

    timings: dict[str, list[float]] = {"ours": [], "torch": []}
    backward: dict[str, list[float]] = {"ours": [], "torch": []}
    runners = [
        ("ours", _gradient_source(params, coefficients, grads), ours_step),
        ("torch", _gradient_source(torch_params, coefficients, grads), torch_sgd.step),
    ]
    for i in range(warmup + steps):
        # Alternate who goes first, so neither always runs on a cache the other just warmed.
        for name, make_grads, step in runners if i % 2 == 0 else runners[::-1]:
            start = time.perf_counter()
            make_grads()
            middle = time.perf_counter()
            step()
            if i >= warmup:
                backward[name].append(middle - start)
                timings[name].append(time.perf_counter() - middle)
    ours_ms = statistics.median(timings["ours"]) * 1e3
    torch_ms = statistics.median(timings["torch"]) * 1e3
    ours_mean_ms = statistics.fmean(timings["ours"]) * 1e3
    torch_mean_ms = statistics.fmean(timings["torch"]) * 1e3
    return {
        "path": path,
        "shapes": shapes,
        "grads": grads,
        "rule": rule,
        "meter": meter,
        "ours_ms": ours_ms,
        "torch_ms": torch_ms,
        "ratio": ours_ms / torch_ms,
        "ours_mean_ms": ours_mean_ms,
        "torch_mean_ms": torch_mean_ms,
        "mean_ratio": ours_mean_ms / torch_mean_ms,
        "ours_backward_ms": statistics.median(backward["ours"]) * 1e3,
        "torch_backward_ms": statistics.median(backward["torch"]) * 1e3,
        "backward_ratio": statistics.median(backward["ours"])
        / statistics.median(backward["torch"]),
        # The whole iteration: what moving the NaN/inf check into backward saves, or costs.
        "total_ratio": (statistics.median(backward["ours"]) + statistics.median(timings["ours"]))
        / (statistics.median(backward["torch"]) + statistics.median(timings["torch"])),
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
    parser.add_argument(
        "--shapes", choices=list(SHAPES), default="resnet18", help="the parameter list"
    )
    parser.add_argument(
        "--grads",
        choices=["backward", "manual"],
        default="backward",
        help="gradients from a backward pass before each step (as in training), or set by hand",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per path; the median run is reported"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median ratio, with the fastest and slowest ratios of all runs beside it."""
    ordered = sorted(runs, key=lambda r: r["ratio"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["ratio_min"], chosen["ratio_max"] = ordered[0]["ratio"], ordered[-1]["ratio"]
    chosen["runs"] = len(runs)
    return chosen


def run(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark and print one line per path; returns the measurements.

    Args:
        argv: command-line arguments (``None`` reads ``sys.argv``).
    """
    args = build_parser().parse_args(argv)
    shapes = SHAPES[args.shapes]()
    numel = sum(int(np.prod(s)) for s in shapes)
    load_before = os.getloadavg()[0]
    results = [
        _median_run(
            [
                measure(
                    path,
                    args.steps,
                    seed=repeat,
                    meter=args.meter,
                    rule=args.rule,
                    curvature_every=args.curvature_every,
                    shapes=args.shapes,
                    grads=args.grads,
                )
                for repeat in range(max(args.repeats, 1))
            ]
        )
        for path in args.paths
    ]
    load = max(load_before, os.getloadavg()[0])
    for r in results:
        r["load"] = load
    if args.json:
        print(json.dumps(results, indent=2))
        return results
    print(
        f"{args.shapes} parameters: {len(shapes)} tensors, {numel / 1e6:.2f}M elements; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, "
        f"median of {max(args.repeats, 1)} runs; gradients: {args.grads}; ours: rule "
        f"{args.rule!r}{', meter on' if args.meter else ''}; load average {load:.2f} on "
        f"{os.cpu_count()} cores"
    )
    print(
        f"{'path':<8} {'AsyncMomentumSGD ms':>20} {'torch.optim.SGD ms':>19} {'ratio':>7} "
        f"{'min..max':>12} {'mean ratio':>11} {'backward ms':>15} {'backward+step':>14}"
    )
    for r in results:
        print(
            f"{r['path']:<8} {r['ours_ms']:>20.3f} {r['torch_ms']:>19.3f} {r['ratio']:>7.3f} "
            f"{r['ratio_min']:>5.2f}..{r['ratio_max']:<5.2f} {r['mean_ratio']:>11.3f} "
            f"{r['ours_backward_ms']:>7.2f}/{r['torch_backward_ms']:<7.2f} "
            f"{r['total_ratio']:>14.3f}"
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
