"""Why the auto rule cannot save charlm at its stable edge: the momentum is needed from the start.

In the sweep's charlm cells under round robin at ``M = 8`` (the oracle: -0.9) and the geometric
queue at ``M = 16`` (-0.6), every run of the auto rule diverges, and so does the additive rule's.
The fixed oracle momentum converges. This script asks whether *any* rule that starts where the
auto rule starts (the default's momentum, then what the run shows) could converge there, by
handing the oracle's momentum to the run at a chosen update:

- ``oracle from K``: the auto rule for the first ``K - 1`` updates, the oracle's momentum from
  update ``K`` on (a rule that detects the instability at update ``K`` and jumps straight to the
  right answer: the best a reactive rule can do);
- ``oracle until K``: the oracle's momentum for the first ``K - 1`` updates, the auto rule after
  (a cautious start that hands over once the run looks calm).

Each variant runs the sweep's own runs (same problem, learning rate, target, cap and seeds as
``asyncmomentum sweep``), in this process, one after another:

    python benchmarks/charlm_edge.py            # both cells, 3 seeds: about 4 min on 2 cores

The answer is in ``docs/auto-rule.md`` (section 0, "Fourth step").
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import ClassVar

from asyncmomentum.applications.problems import get_problem
from asyncmomentum.applications.sweep.runs import RunSpec, run_one, simulated_staleness
from asyncmomentum.core import formulas
from asyncmomentum.core.tuning.rules import register_rule
from asyncmomentum.core.tuning.rules.auto import AutoRule

#: (staleness model, M, the sweep's oracle momentum there) for charlm's cells that no tuned rule
#: of the sweep saves.
EDGE_CELLS = (("round_robin", 8, -0.9), ("geometric", 16, -0.6))


def handing_over(momentum: float, update: int, *, oracle_first: bool) -> str:
    """Register an auto rule that hands over to (or from) a fixed momentum at ``update``.

    Args:
        momentum: the fixed momentum.
        update: the first update (1-based) of the second phase.
        oracle_first: the fixed momentum first, then the auto rule; else the other way round.

    Returns:
        The registered rule's name, for ``RunSpec(method="rule:<name>")``.
    """
    label = f"edge_{'until' if oracle_first else 'from'}_{update}_{momentum:+.1f}"

    class HandOver(AutoRule):
        name: ClassVar[str] = label

        def algorithmic_momentum(
            self,
            target: float,
            implicit: float,
            *,
            lr: float | None = None,
            bounds: tuple[float, float] = formulas.DEFAULT_MOMENTUM_BOUNDS,
        ) -> float:
            rule = super().algorithmic_momentum(target, implicit, lr=lr, bounds=bounds)
            # The histogram counts the applied gradients: the update about to happen is the next.
            second_phase = self.histogram.count + 1 >= update
            return rule if second_phase == oracle_first else momentum

    register_rule(HandOver, replace=True)
    return label


def charlm_run(staleness: str, workers: int, method: str, momentum: float, seed: int) -> str:
    """One of the sweep's charlm runs; its status and steps, e.g. ``"converged 460"``."""
    problem = get_problem("charlm")
    spec = RunSpec(
        problem="charlm",
        staleness=simulated_staleness(staleness, workers),
        workers=workers,
        method=method,
        momentum=momentum,
        lr=problem.lr,
        seed=seed,
        target_loss=problem.target_loss,
        max_steps=problem.max_steps,
        eval_every=problem.eval_every,
    )
    result = run_one(spec)
    return f"{result.status} {result.steps}"


def main(argv: Sequence[str] | None = None) -> int:
    """Print, per cell and variant, each seed's outcome (steps to the target or to divergence)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--from-updates", default="4,8,12", help="K of 'oracle from K'")
    parser.add_argument("--until-updates", default="30,100", help="K of 'oracle until K'")
    args = parser.parse_args(argv)
    from_updates = [int(k) for k in args.from_updates.split(",") if k]
    until_updates = [int(k) for k in args.until_updates.split(",") if k]
    for staleness, workers, oracle in EDGE_CELLS:
        variants: list[tuple[str, tuple[str, float]]] = [
            ("fixed (the oracle)", ("fixed", oracle)),
            ("auto", ("rule:auto", 0.9)),
        ]
        for k in from_updates:
            name = handing_over(oracle, k, oracle_first=False)
            variants.append((f"oracle from update {k}", (f"rule:{name}", 0.9)))
        for k in until_updates:
            name = handing_over(oracle, k, oracle_first=True)
            variants.append((f"oracle until update {k}", (f"rule:{name}", 0.9)))
        print(f"charlm, {staleness} M={workers}, oracle momentum {oracle:+.1f}", flush=True)
        for label, (method, momentum) in variants:
            outcomes = [
                charlm_run(staleness, workers, method, momentum, seed) for seed in range(args.seeds)
            ]
            converged = sum(o.startswith("converged") for o in outcomes)
            print(f"  {label:<26} {converged}/{args.seeds} converge: {', '.join(outcomes)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
