"""Whether gradients hold NaN or inf, checked where it costs least.

A step must change nothing when a gradient is not finite, so every gradient is checked before
the update. Read at ``step()``, the check streams every gradient from memory a second time (the
update is the first): on ResNet-18 shapes that was 1.5 to 5 ms, a fifth of a fused step. So the
check runs earlier, where the gradient is still in the cache: :class:`GradientWatch` hooks each
parameter (``register_post_accumulate_grad_hook``) and takes the sum of its gradient the moment
backward has accumulated it. At ``step()`` one small reduction over those sums answers for every
gradient that is still the one summed; any other (set by hand, changed in place afterwards by
clipping or unscaling, sparse) is checked then, the old way. A sum is non-finite whenever a
value is, and may overflow on finite values: a suspect answer is always confirmed value by
value, so the verdict is exact.

The sums are sums of *squares* (:func:`squared_sum`): as cheap as a plain sum (one read of the
values), as good a check, and they are the squared norms of the gradients. A step that needs
the gradients' norm (the auto rule's feed) reads it from the check (:class:`GradientCheck`)
instead of reading the gradients a third time; for such a step the small gradients are summed
flattened together, in place of torch's fused check (one kernel either way).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors

from asyncmomentum.core.update import group_by_device_and_dtype

__all__ = [
    "WATCH_MIN_ELEMENTS",
    "GradientCheck",
    "GradientWatch",
    "NonFiniteGradientError",
    "check_gradients",
    "first_nonfinite",
    "nonfinite_error",
    "squared_sum",
]

# Below this many elements per device and dtype, unchecked gradients are checked with torch's
# fused AMP check (one kernel); above it, a sum per tensor only reads the data and wins. The
# crossover was measured (docs/performance.md).
_FUSED_CHECK_MAX_ELEMENTS = 1 << 20
_LOW = (torch.float16, torch.bfloat16)
_VERSION = attrgetter("_version")

#: Parameters with fewer elements get no hook (see :class:`GradientWatch`).
WATCH_MIN_ELEMENTS = 1 << 14
# The attribute in which a hooked gradient keeps the version counter its sum was taken at.
_MARK = "_asyncmomentum_checked_version"
# ... and the sum itself (its squared norm), read by the step that applies it.
_SQUARED_SUM = "_asyncmomentum_squared_sum"
_TOKENS = itertools.count()
# Pending sums per device beyond which they are folded into one.
_MAX_PENDING = 4096
_IS_SPARSE = attrgetter("is_sparse")


class NonFiniteGradientError(RuntimeError):
    """A gradient held NaN or inf; the step was refused and nothing was changed."""


def squared_sum(values: Tensor) -> Tensor:
    """``sum |x|^2`` over a tensor, in one read: its squared norm, and the NaN check's sum.

    Non-finite whenever a value is (and, rarely, on finite values past ``1e19``: callers that
    check finiteness confirm a suspect answer value by value). Low-precision tensors are summed
    in float32, whose range a scaled gradient cannot pass.

    Args:
        values: a dense tensor.
    """
    if values.dtype in (torch.float32, torch.float64) and values.is_contiguous():
        flat = values.view(-1)
        return torch.dot(flat, flat)  # as fast as a sum, and no temporary of squares
    dtype = torch.float32 if values.dtype in _LOW else None
    return torch.linalg.vector_norm(values, dtype=dtype).square()


@dataclass(frozen=True)
class GradientCheck:
    """What the NaN/inf check of a step found, and the squared norms it read on the way.

    Attributes:
        nonfinite: ``(group index, index in the group, the parameter's shape)`` of the first
            non-finite gradient, or ``None``.
        grads: every gradient of the step, group after group.
        read: for each of ``grads``, whether its squared norm is in ``squared_norm_parts``
            (a hooked gradient, one read at the step beyond the fused check's size, and, when
            the check was asked for norms, every other dense one).
        squared_norm_parts: 0-dim tensors whose sum is the squared norm of the gradients
            ``read`` marks (one per gradient, or one for several read together).
    """

    nonfinite: tuple[int, int, torch.Size] | None
    grads: list[Tensor]
    read: list[bool]
    squared_norm_parts: list[Tensor]


def nonfinite_error(found: tuple[int, int, torch.Size], advice: str) -> NonFiniteGradientError:
    """The error for the non-finite gradient :func:`first_nonfinite` found.

    Args:
        found: ``(group index, parameter index, shape)``.
        advice: what is unchanged and what the user can do, appended to the message.
    """
    group_index, index, shape = found
    return NonFiniteGradientError(
        f"the gradient of parameter {index} (shape {tuple(shape)}) in param group "
        f"{group_index} holds NaN or inf; {advice}"
    )


class GradientWatch:
    """Sums each large gradient as backward produces it, so that ``step()`` need not read it.

    Only parameters of at least ``min_elements`` are hooked: a hook costs autograd a few
    microseconds per parameter and call, more than reading a small gradient again at the step
    (the crossover was measured: docs/performance.md). The hook marks the gradient with its
    version counter (torch bumps it on every in-place change); the mark answers for the
    gradient only while it still matches, so a gradient changed afterwards (clipped, set by
    hand, replaced) is checked at the step as before. Pending sums are kept per device and
    folded into one when they pile up (backward without steps), which keeps any NaN or inf.

    Limits (docs/performance.md): writes through ``grad.data`` and torch's AMP unscale kernel
    do not bump the version counter, so the watch cannot see them (``GradScaler`` checks the
    gradients itself before it lets the step run).

    Args:
        min_elements: the smallest parameter that gets a hook.
    """

    def __init__(self, min_elements: int = WATCH_MIN_ELEMENTS) -> None:
        self.min_elements = min_elements
        self._pending: dict[torch.device, list[Tensor]] = {}
        self._watched: set[int] = set()
        self._handles: list[Any] = []
        # Marks name their watch: a gradient copied with its mark (deepcopy keeps a tensor's
        # attributes) must not pass for checked by another watch, whose sums never saw it.
        self._token = next(_TOKENS)

    def __getstate__(self) -> dict[str, Any]:
        # Hooks do not travel with tensors: a copy starts with nothing watched.
        return {"min_elements": self.min_elements}

    def __setstate__(self, state: dict[str, Any]) -> None:
        type(self).__init__(self, state.get("min_elements", WATCH_MIN_ELEMENTS))

    def watch(self, params: Iterable[Tensor]) -> None:
        """Hook every large parameter that autograd can give a gradient (idempotent).

        Args:
            params: the parameters; the others are checked at the step.
        """
        for param in params:
            if (
                param.requires_grad
                and param.is_leaf
                and param.numel() >= self.min_elements
                and id(param) not in self._watched
            ):
                self._handles.append(param.register_post_accumulate_grad_hook(_hook(self)))
                self._watched.add(id(param))

    def __del__(self) -> None:
        # An optimizer that is gone must not leave a hook summing every gradient: models
        # outlive optimizers (a new one per trial or per phase), and hooks would pile up.
        for handle in getattr(self, "_handles", ()):
            handle.remove()

    def _record(self, param: Tensor) -> None:
        grad = param.grad
        if grad is None or grad.is_sparse:
            return
        with torch.no_grad():
            total = squared_sum(grad)
        pending = self._pending.setdefault(total.device, [])
        pending.append(total)
        if len(pending) > _MAX_PENDING:
            pending[:] = [torch.stack(pending).sum()]  # a NaN or inf stays one
        setattr(grad, _MARK, (self._token, grad._version))
        setattr(grad, _SQUARED_SUM, total)

    def unverified(self, grads: list[Tensor]) -> list[Tensor]:
        """The gradients whose values the pending sums do not answer for.

        Args:
            grads: gradients about to be applied.
        """
        if not self._watched:
            return grads
        marks = list(map(getattr, grads, repeat(_MARK), repeat(None)))
        expected = list(zip(repeat(self._token), map(_VERSION, grads)))
        if marks == expected:
            return []
        return [g for g, mark, exp in zip(grads, marks, expected, strict=True) if mark != exp]

    def pending_finite(self) -> bool:
        """Whether every sum taken since the last :meth:`settle` is finite."""
        return all(bool(torch.isfinite(torch.stack(sums)).all()) for sums in self._pending.values())

    def settle(self) -> None:
        """Forget the pending sums: the gradients they answer for were just found finite."""
        self._pending.clear()

    @staticmethod
    def squared_sum_of(grad: Tensor) -> Tensor:
        """The squared norm taken of a gradient :meth:`unverified` does not return.

        Args:
            grad: a gradient whose mark is current.
        """
        return grad.__dict__[_SQUARED_SUM]

    @staticmethod
    def forget(grads: Iterable[Tensor]) -> None:
        """Drop the marks of these gradients: they are checked value by value from now on.

        Args:
            grads: gradients of a refused step (a non-finite one among them).
        """
        for grad in grads:
            grad.__dict__.pop(_MARK, None)
            grad.__dict__.pop(_SQUARED_SUM, None)


def _hook(watch: GradientWatch) -> Callable[[Tensor], None]:
    """The hook a parameter holds: a weak reference, so that it keeps no watch alive."""
    ref = weakref.ref(watch)

    def record(param: Tensor) -> None:
        alive = ref()
        if alive is not None:
            alive._record(param)

    return record


_ONES: dict[torch.device, Tensor] = {}


def _one(device: torch.device) -> Tensor:
    """A cached ``tensor([1.0])`` on ``device`` (read only: the check's unscale factor)."""
    one = _ONES.get(device)
    if one is None:
        one = _ONES[device] = torch.ones(1, device=device)
    return one


def _all_finite(
    grads: list[Tensor], read: list[bool] | None = None, parts: list[Tensor] | None = None
) -> bool:
    """Whether no gradient holds NaN or inf (cheap; a ``False`` is confirmed by the caller).

    Args:
        grads: the gradients to check.
        read: where given with ``parts``, set (at the same positions) for each dense gradient
            whose squared norm this check added to ``parts``.
        parts: where given, gets the squared norms of the dense gradients: the small ones
            flattened into one tensor and summed (a copy and one kernel, where torch's fused
            check takes one kernel and no norm: about 2.5x its time on ResNet-18's 43 small
            tensors, 68 us against 28 us warm), the large ones one by one.
    """
    kinds = group_by_device_and_dtype(grads)
    for indices in kinds:
        same = grads if len(kinds) == 1 else [grads[i] for i in indices]
        sparse = any(map(_IS_SPARSE, same))
        if sparse:
            same = [g._values() if g.is_sparse else g for g in same]
        # A sparse gradient's values may repeat an index: their sum is not its norm.
        summing = parts if read is not None and not sparse else None
        small = sum(map(Tensor.numel, same)) <= _FUSED_CHECK_MAX_ELEMENTS
        finite, summed = (_small_finite if small else _summed_finite)(same, summing)
        if not finite:
            return False
        if summed and summing is not None and read is not None:
            for index in indices:
                read[index] = True
    return True


def _small_finite(same: list[Tensor], parts: list[Tensor] | None) -> tuple[bool, bool]:
    """Whether small gradients of one device and dtype are finite, and whether it summed them.

    Args:
        same: the gradients (dense, or a sparse one's values).
        parts: where given, gets their squared norm, read flattened in one sum; else torch's
            fused check reads them (no norm).
    """
    if parts is not None:
        total = squared_sum(_flatten_dense_tensors(same))
        if not bool(torch.isfinite(total)):
            return False, False
        parts.append(total)
        return True, True
    device = same[0].device
    found = torch.zeros(1, device=device)
    try:
        # Multiplies by exactly 1 (a no-op on every value) and flags any non-finite one.
        torch._amp_foreach_non_finite_check_and_unscale_(same, found, _one(device))
    except (RuntimeError, NotImplementedError):  # a dtype or layout it lacks
        return _summed_finite(same, None)
    return found.item() == 0, False


def _summed_finite(same: list[Tensor], parts: list[Tensor] | None) -> tuple[bool, bool]:
    """Whether gradients of one device and dtype are finite, from a squared sum of each.

    Args:
        same: the gradients (dense, or a sparse one's values).
        parts: where given, gets the sums (their squared norms).
    """
    sums = [squared_sum(g) for g in same]
    if not bool(torch.isfinite(torch.stack(sums)).all()):
        return False, False
    if parts is not None:
        parts.extend(sums)
    return True, True


def check_gradients(
    gathered: Sequence[tuple[list[Tensor], list[Tensor], list[Any]]],
    watch: GradientWatch | None = None,
    *,
    norms: bool = False,
) -> GradientCheck:
    """Whether a step's gradients are finite, and their squared norms where that read them.

    One cheap pass (the sums a watch took during backward, then the gradients it does not
    answer for), then, only if that is suspect, an exact one value by value.

    Args:
        gathered: ``(params, grads, buffers)`` per parameter group, every param with its grad.
        watch: sums taken during backward, which answer for the gradients still as summed;
            settled when every gradient is found finite.
        norms: collect the squared norms (:attr:`GradientCheck.squared_norm_parts`): those the
            watch took and those the check reads, and read the small gradients' norm too.
    """
    grads = [g for _, group_grads, _ in gathered for g in group_grads]
    rest = grads if watch is None else watch.unverified(grads)
    rest_read = [False] * len(rest)
    parts: list[Tensor] | None = [] if norms else None
    # Unwatched (no watch, or no gradient it answers for), or every pending sum finite.
    if (watch is None or len(rest) == len(grads) or watch.pending_finite()) and (
        not rest or _all_finite(rest, rest_read, parts)
    ):
        if watch is not None:
            watch.settle()
        if parts is None:  # nobody reads the norms: nothing to collect
            return GradientCheck(None, grads, [False] * len(grads), [])
        if watch is not None and len(rest) < len(grads):
            rest_read = _with_watched(grads, rest, rest_read, watch, parts)
        return GradientCheck(None, grads, rest_read, parts)
    # A non-finite sum may come from finite values that overflow, or from a gradient since
    # discarded: confirm value by value.
    unread = [False] * len(grads)
    for group_index, (params, group_grads, _) in enumerate(gathered):
        for index, g in enumerate(group_grads):
            values = g._values() if g.is_sparse else g
            if not bool(torch.isfinite(values).all()):
                if watch is not None:
                    watch.forget(grads)
                return GradientCheck((group_index, index, params[index].shape), grads, unread, [])
    if watch is not None:
        watch.settle()
    return GradientCheck(None, grads, unread, [])


def _with_watched(
    grads: list[Tensor],
    rest: list[Tensor],
    rest_read: list[bool],
    watch: GradientWatch,
    parts: list[Tensor],
) -> list[bool]:
    """Which of ``grads`` were read: ``rest_read`` for ``rest`` (in order), all the others.

    The others are the watch's; their squared norms go to ``parts``.
    """
    read: list[bool] = []
    position = 0
    for grad in grads:
        if position < len(rest) and grad is rest[position]:
            read.append(rest_read[position])
            position += 1
        else:
            read.append(True)
            parts.append(watch.squared_sum_of(grad))
    return read


def first_nonfinite(
    gathered: Sequence[tuple[list[Tensor], list[Tensor], list[Any]]],
    watch: GradientWatch | None = None,
) -> tuple[int, int, torch.Size] | None:
    """Where the first NaN/inf gradient is, or ``None``: :func:`check_gradients`' answer.

    Args:
        gathered: ``(params, grads, buffers)`` per parameter group, every param with its grad.
        watch: sums taken during backward (see :func:`check_gradients`).

    Returns:
        ``(group index, index in the group's list, the parameter's shape)`` of the first
        non-finite gradient, or ``None`` when every gradient is finite.
    """
    return check_gradients(gathered, watch).nonfinite
