"""What a sweep runs: problems, staleness models, worker counts, the momentum grid, seeds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from asyncmomentum.applications.problems import PROBLEMS
from asyncmomentum.core.tuning.rules import rule_names
from asyncmomentum.core.validation import check_int, check_momentum, check_positive, check_real
from asyncmomentum.runtimes.simulate import STALENESS_MODELS

__all__ = ["FULL", "FULL_MOMENTA", "QUICK", "QUICK_MOMENTA", "CellLimit", "SweepConfig"]

#: The full grid of algorithmic momenta, negative included: denser where the optima lie.
FULL_MOMENTA: tuple[float, ...] = (-0.9, -0.6, -0.3, 0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
#: The ``--quick`` grid: the same range, coarser.
QUICK_MOMENTA: tuple[float, ...] = (-0.5, 0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
#: Worker counts of the paper's kind of figure.
WORKERS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class CellLimit:
    """A per-problem restriction of the cells, to budget an expensive problem.

    Attributes:
        staleness_models: the staleness models run for the problem (a subset of the sweep's).
        workers: the worker counts run for the problem (a subset of the sweep's).
    """

    staleness_models: tuple[str, ...]
    workers: tuple[int, ...]


@dataclass(frozen=True)
class SweepConfig:
    """The parameters of a sweep.

    Attributes:
        problems: names in :data:`asyncmomentum.applications.problems.PROBLEMS`.
        staleness_models: names in :data:`asyncmomentum.runtimes.simulate.STALENESS_MODELS`.
        workers: worker counts ``M`` (integers >= 1; kept sorted, each once).
        momenta: the grid of fixed algorithmic momenta, in (-1, 1), searched for the oracle
            (kept sorted, each once).
        seeds: runs per setting, with seeds ``0 .. seeds - 1``.
        rules: tuning rules to run; ``None`` means every rule of
            :func:`asyncmomentum.core.tuning.rules.rule_names` at run time, so new rules join
            automatically.
        target_momentum: the baseline's fixed momentum and the rules' target total momentum.
        lr_safety: the sweep's learning rate is this times the fastest rate of the problem's
            ``lr_grid`` at ``M = 1`` with momentum ``target_momentum``.
        max_steps: overrides every problem's step cap (for small test sweeps); ``None`` keeps
            them.
        limits: per-problem restrictions of the cells (see :class:`CellLimit`).
        meter_problems: problems on which the momentum meter is checked (those the sweep runs).
        meter_workers: worker counts of the meter check; empty for none.
        meter_steps: updates per run of the meter check.
    """

    problems: tuple[str, ...] = tuple(PROBLEMS)
    staleness_models: tuple[str, ...] = STALENESS_MODELS
    workers: tuple[int, ...] = WORKERS
    momenta: tuple[float, ...] = FULL_MOMENTA
    seeds: int = 5
    rules: tuple[str, ...] | None = None
    target_momentum: float = 0.9
    lr_safety: float = 0.5
    max_steps: int | None = None
    limits: Mapping[str, CellLimit] = field(default_factory=dict)
    meter_problems: tuple[str, ...] = ("quadratic", "softmax")
    meter_workers: tuple[int, ...] = (1, 2, 4, 8, 16)
    meter_steps: int = 800

    def __post_init__(self) -> None:
        self._check_names(self.problems, PROBLEMS, "problems")
        self._check_names(self.staleness_models, STALENESS_MODELS, "staleness_models")
        if self.rules is not None:
            self._check_names(self.rules, rule_names(), "rules")
        if not self.workers:
            raise ValueError("workers must hold at least one worker count")
        _check_counts(self.workers, "workers")
        if not self.momenta:
            raise ValueError("momenta must hold at least one momentum of the grid")
        momenta = [check_momentum(m, "each momentum of the grid") for m in self.momenta]
        # Normalized (sorted, each once) so that cells, tables and cache keys do not repeat.
        object.__setattr__(self, "momenta", tuple(sorted(set(momenta))))
        object.__setattr__(self, "workers", tuple(sorted(set(self.workers))))
        check_momentum(self.target_momentum)
        check_int(self.seeds, "seeds", 1)
        check_real(self.lr_safety, "lr_safety", minimum=0.0, maximum=1.0, min_inclusive=False)
        check_positive(self.max_steps, "max_steps", integer=True, optional=True)
        unknown = [p for p in self.meter_problems if p not in PROBLEMS]
        if unknown:
            raise ValueError(f"meter_problems: unknown {unknown}; choose from {sorted(PROBLEMS)}")
        _check_counts(self.meter_workers, "meter_workers")
        object.__setattr__(self, "meter_workers", tuple(sorted(set(self.meter_workers))))
        check_int(self.meter_steps, "meter_steps", 1)
        for name, limit in self.limits.items():
            self._check_names((name,), PROBLEMS, "limits")
            self._check_names(limit.staleness_models, STALENESS_MODELS, f"limits[{name!r}]")
            _check_counts(limit.workers, f"limits[{name!r}].workers")
        for problem in self.problems:
            if not self.cells(problem):
                limit = self.limits[problem]
                raise ValueError(
                    f"problem {problem!r} has no cell to run: this sweep budgets it to the "
                    f"staleness models {list(limit.staleness_models)} and M in "
                    f"{list(limit.workers)}, and none of those was asked for; ask for one of "
                    "them, or leave the problem out"
                )

    @staticmethod
    def _check_names(
        names: tuple[str, ...], known: Mapping[str, Any] | tuple[str, ...], what: str
    ) -> None:
        if not names:
            raise ValueError(f"{what} must name at least one of {sorted(known)}")
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"{what}: unknown {unknown}; choose from {sorted(known)}")

    @property
    def rule_names(self) -> tuple[str, ...]:
        """The rules this sweep runs."""
        return rule_names() if self.rules is None else self.rules

    @property
    def fixed_momenta(self) -> tuple[float, ...]:
        """Every fixed momentum run: the grid and the baseline, sorted."""
        return tuple(sorted({*map(float, self.momenta), float(self.target_momentum)}))

    def cells(self, problem: str) -> list[tuple[str, int]]:
        """The ``(staleness model, M)`` cells of ``problem``, after its :attr:`limits`.

        Args:
            problem: a name in :attr:`problems`.
        """
        limit = self.limits.get(problem)
        models = [m for m in self.staleness_models if limit is None or m in limit.staleness_models]
        counts = [m for m in self.workers if limit is None or m in limit.workers]
        return [(model, count) for model in models for count in counts]

    def with_changes(self, **changes: Any) -> SweepConfig:
        """A copy with some fields replaced (validated again).

        Args:
            **changes: field names and their new values.
        """
        return replace(self, **changes)


def _check_counts(values: tuple[int, ...], name: str) -> None:
    """Raise unless every one of ``values`` is an integer >= 1 (a worker count).

    Args:
        values: the worker counts.
        name: the field's name, for the message (which shows the whole tuple).
    """
    try:
        for value in values:
            check_int(value, name, 1)
    except ValueError:
        raise ValueError(f"{name} must be integers >= 1, got {values!r}") from None


#: The deeper problems (resnet, charlm) in the full sweep: the exponential queue gives the same
#: staleness distribution as the geometric model (see the tables), so it is left out for them.
_DEEP_FULL = CellLimit(staleness_models=("geometric", "round_robin"), workers=WORKERS)
#: The expensive problems in ``--quick``: the geometric model at ``M`` in {1, 4, 16}.
_QUICK_CELLS = CellLimit(staleness_models=("geometric",), workers=(1, 4, 16))

#: The full experiment: every problem, staleness model and worker count (the deeper problems
#: without the exponential queue), 11 momenta, 5 seeds.
FULL = SweepConfig(limits={"resnet": _DEEP_FULL, "charlm": _DEEP_FULL})

#: ``--quick``: 8 momenta, 3 seeds, and the CNN, the deeper problems and the GRU (the expensive
#: ones) on the geometric model at ``M`` in {1, 4, 16} only.
QUICK = SweepConfig(
    momenta=QUICK_MOMENTA,
    seeds=3,
    limits={
        "cnn": _QUICK_CELLS,
        "resnet": _QUICK_CELLS,
        "charlm": _QUICK_CELLS,
        "gru": _QUICK_CELLS,
    },
)
