"""Benchmark problems for the sweep, the demo and the studies: small, seeded, quick on a CPU.

Each :class:`Problem` bundles a model factory, a loss on a batch, an endless seeded batch stream,
the full training loss (what "steps to target" is measured on), a target loss, a step cap and the
learning rates the sweep tunes over. The three problems of the paper's kind:

- ``quadratic``: a noisy, ill-conditioned quadratic (the setting the theory is exact for);
- ``softmax``: multinomial logistic regression on scikit-learn's digits (convex, real data);
- ``cnn``: :class:`~asyncmomentum.applications.digits.SmallCNN` on the digits (non-convex).

And two closer to what users train (:mod:`asyncmomentum.applications.deeper_problems`):

- ``resnet``: a residual CNN with batch normalization on the digits;
- ``charlm``: a one-layer transformer language model on the standard library's Python source.

And a new family that no rule's constants were chosen on
(:mod:`asyncmomentum.applications.recurrent_problems`):

- ``gru``: a GRU classifier that reads each digit row by row (a recurrence through time).

Calibration. ``target_loss``, ``max_steps`` and ``lr_grid`` were chosen so that, at ``M = 1`` and
momentum 0.9, the fastest learning rate of ``lr_grid`` lies inside the grid (both ends are slower
or fail) and reaches the target in 40 to 70 updates (median of 3 seeds: quadratic 40 at 0.5,
softmax 70 at 0.5, cnn 60 at 0.1), and the cap is 7 to 17 times what the baseline needs at the
learning rate the sweep then uses (60, 140 and 100 updates), so that slow settings are measured,
not just flagged. The two deeper problems were calibrated the same way (the quick sweep's tuning
picked 0.2 for resnet and 0.5 for charlm as the fastest; at half of that both reach their targets,
0.4 and 2.6, in a median of 50 updates; a step costs about 25 ms and 6 ms on one core). ``lr`` is
what ``asyncmomentum sweep --quick`` selected from ``lr_grid`` (the fastest of the grid at
``M = 1`` with momentum 0.9, times the sweep's safety factor 1/2), recorded here for callers that
want one good learning rate per problem without running the sweep; the sweep itself always
re-derives it (and writes the tuning runs to its CSV). Re-run ``asyncmomentum sweep --quick``
after changing a problem, check that the fastest rate is still inside the grid (``table.md``
names it), and bump :data:`PROBLEMS_VERSION`, which is part of the sweep's cache key.

``gru`` was calibrated the same way with a slower learning curve: at ``M = 1`` and momentum 0.9
(plain SGD, 2 seeds, 1200 updates) the rate 0.2 was the fastest of its grid (0.4 and 0.8 do not
settle: their loss jumps between 0.3 and 2), and at the sweep's half of it, 0.1, the full loss
reaches the target 0.05 in 300 to 500 updates (thousands at ``M = 16`` and 32); the cap is
4000 updates; a step costs about 1.7 ms on one core.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from asyncmomentum.applications.deeper_problems import (
    CharLM,
    ResidualCNN,
    charlm_batches,
    charlm_eval_batch,
    charlm_loss,
)
from asyncmomentum.applications.digits import SmallCNN, iterate_batches, load_digits_split
from asyncmomentum.applications.recurrent_problems import DigitRowGRU

__all__ = ["PROBLEMS", "PROBLEMS_VERSION", "Problem", "QuadraticModel", "get_problem"]

#: Bump when a problem's definition (model, data, loss, target, cap) changes: the sweep's cache
#: keys include it, so cached runs of the old definition are not reused.
PROBLEMS_VERSION = 3

Batch = Any


@dataclass(frozen=True)
class Problem:
    """A training problem for studies of asynchrony.

    Attributes:
        name: short name used on the command line.
        make_model: ``seed -> nn.Module`` with seeded initial weights.
        loss_fn: ``(model, batch) -> scalar loss`` whose gradient is the stochastic gradient.
        batches: ``seed -> endless iterator of batches``.
        full_loss: ``model -> float``, the training loss on all data (noise free).
        target_loss: the full training loss a run must reach to count as converged.
        lr: a good learning rate for the problem: what the sweep's tuning selects (see the
            module docstring).
        lr_grid: learning rates the sweep tunes over at ``M = 1`` with momentum 0.9.
        max_steps: step cap of a sweep run; a run that has not reached the target by then is
            counted at the cap and flagged.
        eval_every: the sweep evaluates the full training loss every this many updates (the
            resolution of steps-to-target, traded against the cost of a full evaluation).
        curvature_batch: ``seed -> batch`` for the curvature probe of ``rule="stability"``:
            larger than a training batch (a minibatch Hessian overstates ``lambda_max``), drawn
            independently of the training stream, fixed for the run.
    """

    name: str
    make_model: Callable[[int], nn.Module]
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor]
    batches: Callable[[int], Iterator[Batch]]
    full_loss: Callable[[nn.Module], float]
    target_loss: float
    lr: float
    lr_grid: tuple[float, ...]
    max_steps: int
    eval_every: int
    curvature_batch: Callable[[int], Batch]


# -- quadratic ------------------------------------------------------------------------------------

QUADRATIC_DIM = 20
QUADRATIC_CONDITION = 100.0
QUADRATIC_NOISE = 0.05


class QuadraticModel(nn.Module):
    """A noisy quadratic ``f(w) = 1/2 (w - w*)^T H (w - w*)`` with diagonal ``H``.

    The eigenvalues of ``H`` are log-spaced in ``[1 / condition, 1]``; a batch is a noise vector
    ``xi`` and the batch loss adds ``xi . w``, so the stochastic gradient is ``H (w - w*) + xi``.

    The initial point has coordinate ``i`` drawn from ``N(0, 1 / h_i)``, so every eigendirection
    starts with the same expected loss (1/2): the flat directions then carry as much of the
    loss as the steep ones, and the conditioning, not just the steepest direction, sets the pace.

    Args:
        dim: number of coordinates.
        condition: ratio of the largest to the smallest curvature.
        seed: seed of the initial point.
    """

    curvature: torch.Tensor  # buffers
    optimum: torch.Tensor

    def __init__(
        self, dim: int = QUADRATIC_DIM, condition: float = QUADRATIC_CONDITION, seed: int = 0
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        exponents = torch.linspace(0.0, -math.log10(condition), dim)
        curvature = 10.0**exponents
        self.register_buffer("curvature", curvature)
        self.register_buffer("optimum", torch.zeros(dim))
        self.w = nn.Parameter(torch.randn(dim, generator=gen) / curvature.sqrt())

    def objective(self) -> torch.Tensor:
        """The noise-free loss."""
        diff = self.w - self.optimum
        return 0.5 * (self.curvature * diff * diff).sum()


def _quadratic_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    assert isinstance(model, QuadraticModel)
    return model.objective() + (batch * model.w).sum()


def _quadratic_batches(seed: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(QUADRATIC_DIM, generator=gen) * QUADRATIC_NOISE


def _quadratic_curvature_batch(seed: int) -> torch.Tensor:
    # The Hessian does not depend on the noise: a zero batch probes the exact objective.
    return torch.zeros(QUADRATIC_DIM)


def _quadratic_full_loss(model: nn.Module) -> float:
    assert isinstance(model, QuadraticModel)
    with torch.no_grad():
        return float(model.objective())


# -- digits ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    split = load_digits_split()
    return split.x_train, split.y_train


def _classification_loss(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _digits_batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _digits()
    return iterate_batches(x, y, batch_size=32, seed=seed)


#: Samples in the curvature probe's batch (8 training batches).
CURVATURE_BATCH_SIZE = 256


def _digits_curvature_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _digits()
    # A stream of its own (the seed's complement), so the probe does not shift training batches.
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(~seed & 0xFFFF_FFFF))
    chosen = order[:CURVATURE_BATCH_SIZE]
    return x[chosen], y[chosen]


def _digits_full_loss(model: nn.Module) -> float:
    x, y = _digits()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _softmax_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(_Flatten(), nn.Linear(64, 10))


def _cnn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN()


def _quadratic_model(seed: int) -> nn.Module:
    return QuadraticModel(seed=seed)


def _resnet_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return ResidualCNN()


def _charlm_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return CharLM()


def _gru_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return DigitRowGRU()


def _charlm_full_loss(model: nn.Module) -> float:
    with torch.no_grad():
        return float(charlm_loss(model, charlm_eval_batch()))


PROBLEMS: dict[str, Problem] = {
    "quadratic": Problem(
        name="quadratic",
        make_model=_quadratic_model,
        loss_fn=_quadratic_loss,
        batches=_quadratic_batches,
        full_loss=_quadratic_full_loss,
        target_loss=0.1,
        lr=0.25,
        lr_grid=(0.125, 0.25, 0.5, 1.0, 2.0),
        max_steps=1000,
        eval_every=10,
        curvature_batch=_quadratic_curvature_batch,
    ),
    "softmax": Problem(
        name="softmax",
        make_model=_softmax_model,
        loss_fn=_classification_loss,
        batches=_digits_batches,
        full_loss=_digits_full_loss,
        target_loss=0.15,
        lr=0.25,
        lr_grid=(0.25, 0.5, 1.0, 2.0, 4.0),
        max_steps=1500,
        eval_every=10,
        curvature_batch=_digits_curvature_batch,
    ),
    "cnn": Problem(
        name="cnn",
        make_model=_cnn_model,
        loss_fn=_classification_loss,
        batches=_digits_batches,
        full_loss=_digits_full_loss,
        target_loss=0.5,
        lr=0.05,
        lr_grid=(0.025, 0.05, 0.1, 0.2, 0.4),
        max_steps=1000,
        eval_every=20,
        curvature_batch=_digits_curvature_batch,
    ),
    "resnet": Problem(
        name="resnet",
        make_model=_resnet_model,
        loss_fn=_classification_loss,
        batches=_digits_batches,
        full_loss=_digits_full_loss,
        target_loss=0.4,
        lr=0.1,
        lr_grid=(0.05, 0.1, 0.2, 0.4, 0.8),
        max_steps=600,
        eval_every=10,
        curvature_batch=_digits_curvature_batch,
    ),
    "charlm": Problem(
        name="charlm",
        make_model=_charlm_model,
        loss_fn=charlm_loss,
        batches=charlm_batches,
        full_loss=_charlm_full_loss,
        target_loss=2.6,
        lr=0.25,
        lr_grid=(0.0625, 0.125, 0.25, 0.5, 1.0),
        max_steps=600,
        eval_every=10,
        curvature_batch=charlm_eval_batch,
    ),
    "gru": Problem(
        name="gru",
        make_model=_gru_model,
        loss_fn=_classification_loss,
        batches=_digits_batches,
        full_loss=_digits_full_loss,
        target_loss=0.05,
        lr=0.1,
        lr_grid=(0.05, 0.1, 0.2, 0.4, 0.8),
        max_steps=4000,
        eval_every=20,
        curvature_batch=_digits_curvature_batch,
    ),
}


def get_problem(name: str) -> Problem:
    """The problem called ``name``; raises ``ValueError`` naming the choices otherwise.

    Args:
        name: one of :data:`PROBLEMS`.
    """
    if name not in PROBLEMS:
        raise ValueError(f"problem must be one of {sorted(PROBLEMS)}, got {name!r}")
    return PROBLEMS[name]
