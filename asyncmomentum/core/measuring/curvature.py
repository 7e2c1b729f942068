"""Largest curvature of a loss: power iteration with Hessian-vector products.

:class:`CurvatureEstimator` measures ``lambda_max``, the largest eigenvalue of the Hessian of a
loss at the current parameters, for the stability rule
(:class:`~asyncmomentum.core.tuning.rules.stability.StabilityRule`), which needs
``lr * lambda_max``. See ``docs/stability-rule.md`` for why Hessian-vector products.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from asyncmomentum.core.validation import check_int, check_real

__all__ = ["CurvatureEstimator"]


def _dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> float:
    return float(sum(torch.dot(x.flatten(), y.flatten()) for x, y in zip(xs, ys, strict=True)))


def _normalized(xs: Sequence[Tensor]) -> list[Tensor] | None:
    norm = math.sqrt(_dot(xs, xs))
    if not (norm > 0 and math.isfinite(norm)):
        return None
    return [x / norm for x in xs]


class CurvatureEstimator:
    """Largest Hessian eigenvalue by power iteration with Hessian-vector products.

    Each :meth:`estimate` evaluates ``loss_fn()`` once (a mini-batch loss at the current
    parameters, with its graph), takes its gradient with ``create_graph=True`` and runs power
    iteration with double-backward Hessian-vector products. The vector is kept between calls,
    so after the first call (``iterations`` products) a few products (``warm_iterations``) track
    the top eigenvector as training moves. If the dominant eigenvalue is negative (a saddle),
    a shifted iteration finds the largest positive one, which is what limits stability.

    The forward runs attention on its math path (``SDPBackend.MATH``): the fused kernels
    have no double backward.

    Cost: one forward, one backward with graph, and ``k`` Hessian-vector products (about two
    backwards each), every time it is called. Memory between calls: the warm-start vector in
    ``warm_start_dtype``, 2 bytes per parameter by default (bfloat16: a starting direction
    needs no more; a float32 copy would add half again to SGD's momentum buffers), or nothing
    with ``warm_start_dtype=None`` (every call then starts cold, ``iterations`` products).
    During a call, full-precision vectors and the graph of the loss exist as long as it runs.
    Call it every few hundred steps (``StabilityRule`` takes the maximum of the last
    ``history`` values).

    Args:
        params: the parameters the Hessian is taken with respect to.
        iterations: products of the first call (>= 1).
        warm_iterations: products of later, warm-started calls (>= 1).
        tolerance: relative change of the eigenvalue at which an iteration stops early.
        history: number of recent estimates :attr:`value` takes the maximum of (>= 1).
        seed: seed of the first vector.
        warm_start_dtype: dtype in which the vector is kept between calls, or ``None`` to keep
            none.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        iterations: int = 20,
        warm_iterations: int = 4,
        tolerance: float = 1e-3,
        history: int = 4,
        seed: int = 0,
        warm_start_dtype: torch.dtype | None = torch.bfloat16,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("CurvatureEstimator needs at least one parameter with requires_grad")
        self.iterations = check_int(iterations, "iterations", 1)
        self.warm_iterations = check_int(warm_iterations, "warm_iterations", 1)
        self.tolerance = check_real(tolerance, "tolerance", minimum=0.0)
        self.history = check_int(history, "history", 1)
        self._generator = torch.Generator().manual_seed(check_int(seed, "seed", 0))
        if warm_start_dtype is not None and not (
            isinstance(warm_start_dtype, torch.dtype) and warm_start_dtype.is_floating_point
        ):
            raise ValueError(
                f"warm_start_dtype must be a floating torch.dtype or None, got {warm_start_dtype!r}"
            )
        self.warm_start_dtype = warm_start_dtype
        self._vector: list[Tensor] | None = None
        self._estimates: list[float] = []
        self.products = 0

    @property
    def value(self) -> float | None:
        """The largest of the last ``history`` estimates, ``None`` before the first.

        The largest, because curvature can rise quickly; being late to see it is what makes a
        run diverge.
        """
        return max(self._estimates) if self._estimates else None

    def _random_vector(self) -> list[Tensor]:
        vector = [
            torch.randn(p.shape, generator=self._generator, dtype=p.dtype).to(p.device)
            for p in self.params
        ]
        return _normalized(vector) or vector

    def estimate(self, loss_fn: Callable[[], Tensor]) -> float:
        """Run power iteration at the current parameters; record and return the eigenvalue.

        Parameters and their ``.grad`` are left untouched.

        Args:
            loss_fn: computes a scalar loss of the parameters (e.g. one mini-batch), with grad.
        """
        # Hessian-vector products differentiate the loss twice. The fused attention kernels
        # (flash, efficient, CPU flash) have no double backward, so the probe's forward runs
        # scaled_dot_product_attention on the math path, which does (a transformer's probe
        # would otherwise fail in the first product).
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            loss = loss_fn()
            if not (isinstance(loss, Tensor) and loss.numel() == 1 and loss.requires_grad):
                raise ValueError(
                    "loss_fn must return a scalar tensor that depends on the parameters "
                    f"(requires_grad), got {type(loss).__name__}"
                )
            if not torch.isfinite(loss.detach()).all():
                raise ValueError(f"loss_fn returned a non-finite loss ({loss.item()}); no estimate")
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            grads = tuple(
                torch.zeros_like(p) if g is None else g
                for p, g in zip(self.params, grads, strict=True)
            )
            if not any(g.requires_grad for g in grads):
                eigenvalue = 0.0  # the loss is linear in the parameters: no curvature
            else:
                eigenvalue = self._power_iteration(grads)
        self._estimates = [*self._estimates, eigenvalue][-self.history :]
        return eigenvalue

    def _product(self, grads: Sequence[Tensor], vector: Sequence[Tensor]) -> list[Tensor]:
        self.products += 1
        out = torch.autograd.grad(
            grads, self.params, grad_outputs=list(vector), retain_graph=True, allow_unused=True
        )
        return [
            torch.zeros_like(p) if h is None else h.detach()
            for p, h in zip(self.params, out, strict=True)
        ]

    def _power_iteration(self, grads: Sequence[Tensor]) -> float:
        steps = self.iterations if self._vector is None else self.warm_iterations
        vector = self._warm_vector() or self._random_vector()
        eigenvalue, vector = self._iterate(grads, vector, steps, shift=0.0)
        if eigenvalue < 0:
            # The dominant eigenvalue is negative: iterate on H - eigenvalue * I, whose dominant
            # eigenvalue is (largest positive - eigenvalue).
            shifted, vector = self._iterate(
                grads, self._random_vector(), self.iterations, eigenvalue
            )
            eigenvalue = max(shifted + eigenvalue, 0.0)
        if self.warm_start_dtype is not None:
            self._vector = [v.detach().to(self.warm_start_dtype) for v in vector]
        return eigenvalue

    def _warm_vector(self) -> list[Tensor] | None:
        """The kept vector at the parameters' precision, normalized again; ``None`` if none."""
        if self._vector is None:
            return None
        return _normalized([v.to(p.dtype) for v, p in zip(self._vector, self.params, strict=True)])

    def _iterate(
        self, grads: Sequence[Tensor], vector: list[Tensor], steps: int, shift: float
    ) -> tuple[float, list[Tensor]]:
        eigenvalue = math.nan
        for _ in range(steps):
            product = self._product(grads, vector)
            if shift:
                product = [h - shift * v for h, v in zip(product, vector, strict=True)]
            previous, eigenvalue = eigenvalue, _dot(vector, product)
            following = _normalized(product)
            if following is None:  # H v = 0: v is in the kernel
                return 0.0, vector
            vector = following
            if abs(eigenvalue - previous) <= self.tolerance * abs(eigenvalue):
                break
        return eigenvalue, vector

    def __repr__(self) -> str:
        return f"CurvatureEstimator(value={self.value}, products={self.products})"
