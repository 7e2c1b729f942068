"""The SGD update, three ways.

The functional half of :class:`~asyncmomentum.core.optimizer.AsyncMomentumSGD`, as
``torch.optim.sgd`` has one: :func:`choose_update` picks a path for a parameter group as torch
would, and each path applies torch's heavy-ball update (optionally Nesterov, with dampening,
weight decay and ``maximize``) with any momentum, negative included: :func:`single_tensor_update`
(the per-tensor loop), :func:`multi_tensor_update` (``torch._foreach_*`` ops) and
:func:`fused_update` (torch's fused kernel). Each rounds as torch's path of the same name does;
in float16/bfloat16 the fused kernel computes in float32 and rounds once where the loops round
after every op, so the paths differ there by the same amounts torch's do. Measured timings of
the paths are in ``docs/performance.md``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any, cast

import torch
from torch import Tensor

__all__ = [
    "FUSED_DEVICES",
    "UpdateFn",
    "choose_update",
    "group_by_device_and_dtype",
    "fused_update",
    "multi_tensor_update",
    "single_tensor_update",
]

UpdateFn = Callable[..., None]

# The foreach path works on buckets of about this many bytes per tensor list, so that the few
# passes it makes over a bucket (buffer scale, buffer add, parameter add) stay in the CPU cache.
_FOREACH_BUCKET_BYTES = 2 << 20

try:  # Where torch ships a fused SGD kernel.
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())
except ImportError:  # pragma: no cover - older torch
    FUSED_DEVICES = frozenset({"cpu", "cuda"})

# Where this project substitutes torch's fused kernel for a path the user did not forbid it on
# (``fused=None``): on the CPU, for float32 and float64, where the kernel is correct and faster
# than the loop torch would pick (docs/performance.md). Not for float16/bfloat16: torch 2.13's
# CPU fused SGD kernel is wrong for them (0.26 absolute error after one step at lr 0.1).
_FUSED_FASTER_DTYPES = frozenset({torch.float32, torch.float64})
# Below this many elements the kernel's scalar tail handles float16/bfloat16 tensors correctly;
# from here on its vectorized blocks are wrong (pytorch/pytorch#191763).
_FUSED_LOW_PRECISION_SAFE = 16


def choose_update(group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> UpdateFn:
    """The update path for one parameter group, chosen as torch chooses it.

    ``fused=True`` runs torch's fused kernel; ``foreach=False`` or ``fused=False`` never do.
    Sparse gradients take the per-tensor loop. Otherwise torch's default applies (the
    per-tensor loop on the CPU, the multi-tensor path elsewhere), except that on the CPU the
    fused kernel replaces the loop or the multi-tensor ops for float32/float64 parameters when
    ``fused`` is left ``None``: the same update, measured faster.

    Args:
        group: the parameter group (its ``foreach`` and ``fused``).
        params: the group's parameters that have a gradient.
        grads: their gradients.
    """
    if any(map(_IS_SPARSE, grads)):
        return single_tensor_update
    if group["fused"]:
        return fused_update
    if group["foreach"] is False:
        return single_tensor_update
    on_cpu = all(map(_IS_CPU, params))
    if group["fused"] is None and on_cpu and _fused_kernel_is_faster_and_exact(params, grads):
        return fused_update
    if group["foreach"] or not on_cpu:
        return multi_tensor_update
    return single_tensor_update


# Attribute readers for scans over every tensor of a group: map() over them runs in C, which
# matters on models of hundreds of small tensors (docs/performance.md).
_IS_SPARSE = attrgetter("is_sparse")
_IS_CPU = attrgetter("is_cpu")  # cheaper than .device, which builds an object
_DTYPE = attrgetter("dtype")
_DEVICE_AND_DTYPE = attrgetter("device", "dtype")


def _all_contiguous(params: list[Tensor], grads: list[Tensor]) -> bool:
    return all(map(Tensor.is_contiguous, params)) and all(map(Tensor.is_contiguous, grads))


def _fused_kernel_is_faster_and_exact(params: list[Tensor], grads: list[Tensor]) -> bool:
    # The same conditions as _cpu_fused_kernel_error, scanned in C: float32/float64 only (no
    # low-precision hazard), contiguous parameters and gradients.
    return set(map(_DTYPE, params)) <= _FUSED_FASTER_DTYPES and _all_contiguous(params, grads)


def _cpu_fused_kernel_error(param: Tensor, grad: Tensor) -> str | None:
    """Why torch 2.13's CPU fused kernel would compute wrong values here, or ``None``.

    The one statement of the kernel's hazards: :func:`choose_update` never substitutes it there,
    :func:`check_fused_support` refuses an explicit ``fused=True`` there.
    """
    if param.dtype not in _FUSED_FASTER_DTYPES and param.numel() >= _FUSED_LOW_PRECISION_SAFE:
        return (
            f"fused=True on the CPU computes wrong updates for {param.dtype} tensors of "
            f"{_FUSED_LOW_PRECISION_SAFE} or more elements in torch 2.13 "
            "(pytorch/pytorch#191763); use foreach=True or leave fused unset"
        )
    # It walks its tensors as contiguous memory; momentum buffers take the gradient's layout,
    # so contiguous parameters and gradients suffice.
    if not (param.is_contiguous() and grad.is_contiguous()):
        return (
            "fused=True on the CPU needs contiguous parameters and gradients: torch 2.13's "
            "kernel walks them as contiguous memory and would write wrong values (and "
            "outside a strided view); use foreach=True or leave fused unset"
        )
    return None


def check_fused_support(params: list[Tensor], grads: list[Tensor]) -> None:
    """Raise if ``fused=True`` cannot run, or would compute wrong values, on these parameters.

    Where torch raises (a device or dtype without the kernel), the same error. Where torch
    2.13's CPU kernel silently computes wrong values (non-contiguous parameters or gradients,
    float16/bfloat16), a clear error instead: a step must never corrupt the parameters.

    Args:
        params: the parameters of a group with ``fused=True`` that have a gradient.
        grads: their gradients.
    """
    if (
        all(map(_IS_CPU, params))
        and set(map(_DTYPE, params)) <= _FUSED_FASTER_DTYPES
        and _all_contiguous(params, grads)
    ):
        return  # the common case, scanned in C; the loop below finds and names a problem
    for p, g in zip(params, grads, strict=True):
        if not (p.is_floating_point() and p.device.type in FUSED_DEVICES):
            raise RuntimeError(
                "`fused=True` requires all the params to be floating point Tensors of supported "
                f"devices: {sorted(FUSED_DEVICES)} but {p.dtype} and {p.device.type}"
            )
        error = _cpu_fused_kernel_error(p, g) if p.device.type == "cpu" else None
        if error is not None:
            raise RuntimeError(error)


def single_tensor_update(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    with_buffer: bool,
) -> None:
    """Apply the SGD update one tensor at a time (torch's single-tensor path).

    Args:
        params: the parameters to update, in place.
        grads: their gradients, one per parameter.
        buffers: their momentum buffers, one per parameter; a ``None`` entry is replaced by a
            new buffer set to the (weight-decayed) gradient, as torch's first step does, the
            others are updated in place.
        lr: the learning rate.
        momentum: the momentum factor, any real number (negative included).
        dampening: dampening of the gradient added to the buffer.
        weight_decay: L2 penalty added to the gradient.
        nesterov: apply Nesterov momentum.
        maximize: ascend the objective instead of descending it.
        with_buffer: keep momentum buffers; without, the update is plain SGD and ``buffers``
            is left alone.
    """
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if with_buffer:
            buf = buffers[i]
            if buf is None:
                buf = buffers[i] = torch.clone(grad).detach()
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(grad, alpha=-lr)


def _buckets(tensors: list[Tensor], indices: list[int]) -> Iterable[list[int]]:
    bucket: list[int] = []
    size = 0
    for i in indices:
        bucket.append(i)
        size += tensors[i].numel() * tensors[i].element_size()
        if size >= _FOREACH_BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def group_by_device_and_dtype(tensors: list[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by device and dtype, in order of first appearance.

    Args:
        tensors: parameters or gradients.
    """
    if len(set(map(_DTYPE, tensors))) == 1 and all(map(_IS_CPU, tensors)):
        return [list(range(len(tensors)))]  # one device and dtype: the common case, in C
    kinds = list(map(_DEVICE_AND_DTYPE, tensors))
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, kind in enumerate(kinds):
        groups[kind].append(i)
    return list(groups.values())


def multi_tensor_update(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    with_buffer: bool,
) -> None:
    """Apply the SGD update with multi-tensor (``torch._foreach_*``) ops, in cache-sized buckets.

    Args:
        params: the parameters to update, in place.
        grads: their gradients, one per parameter.
        buffers: their momentum buffers, one per parameter; a ``None`` entry is replaced by a
            new buffer set to the (weight-decayed) gradient, as torch's first step does, the
            others are updated in place.
        lr: the learning rate.
        momentum: the momentum factor, any real number (negative included).
        dampening: dampening of the gradient added to the buffer.
        weight_decay: L2 penalty added to the gradient.
        nesterov: apply Nesterov momentum.
        maximize: ascend the objective instead of descending it.
        with_buffer: keep momentum buffers; without, the update is plain SGD and ``buffers``
            is left alone.
    """
    for same_kind in group_by_device_and_dtype(params):
        for bucket in _buckets(params, same_kind):
            ps = [params[i] for i in bucket]
            gs: list[Tensor] | tuple[Tensor, ...] = [grads[i] for i in bucket]
            if maximize:
                gs = torch._foreach_neg(gs)
            if weight_decay != 0:
                gs = torch._foreach_add(gs, ps, alpha=weight_decay)
            if with_buffer:
                running: list[Tensor] = []
                running_grads: list[Tensor] = []
                for i, g in zip(bucket, gs, strict=True):
                    buf = buffers[i]
                    if buf is None:
                        buffers[i] = torch.clone(g).detach()
                    else:
                        running.append(buf)
                        running_grads.append(g)
                if running:
                    torch._foreach_mul_(running, momentum)
                    torch._foreach_add_(running, running_grads, alpha=1 - dampening)
                bufs = cast("list[Tensor]", [buffers[i] for i in bucket])  # all set above
                gs = torch._foreach_add(gs, bufs, alpha=momentum) if nesterov else bufs
            torch._foreach_add_(ps, gs, alpha=-lr)


def fused_update(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    with_buffer: bool,
    grad_scale: Tensor | None = None,
) -> None:
    """Apply the SGD update with torch's fused kernel (``torch._fused_sgd_``).

    Args:
        params: the parameters to update, in place.
        grads: their gradients, one per parameter.
        buffers: their momentum buffers, one per parameter; a ``None`` entry is replaced by a
            new buffer set to the (weight-decayed) gradient, as torch's first step does, the
            others are updated in place.
        lr: the learning rate.
        momentum: the momentum factor, any real number (negative included).
        dampening: dampening of the gradient added to the buffer.
        weight_decay: L2 penalty added to the gradient.
        nesterov: apply Nesterov momentum.
        maximize: ascend the objective instead of descending it.
        with_buffer: keep momentum buffers; without, the update is plain SGD and ``buffers``
            is left alone.
        grad_scale: the scale ``torch.amp.GradScaler`` set on the optimizer, if any: the kernel
            unscales the gradients by it.
    """
    kernel_args: dict[str, Any] = {
        "weight_decay": weight_decay,
        "momentum": momentum if with_buffer else 0.0,
        "lr": lr,
        "dampening": dampening,
        "nesterov": nesterov,
        "maximize": maximize,
        "grad_scale": grad_scale,  # set by torch.amp.GradScaler: the kernel unscales
    }
    for same_kind in group_by_device_and_dtype(params):
        if not with_buffer:
            torch._fused_sgd_(
                [params[i] for i in same_kind],
                [grads[i] for i in same_kind],
                [],
                is_first_step=False,
                **kernel_args,
            )
            continue
        # The kernel's first step sets buf = grad; later steps scale and add.
        fresh = [i for i in same_kind if buffers[i] is None]
        running = [i for i in same_kind if buffers[i] is not None]
        for i in fresh:
            buffers[i] = torch.empty_like(grads[i])
        for first, chosen in ((True, fresh), (False, running)):
            if chosen:
                torch._fused_sgd_(
                    [params[i] for i in chosen],
                    [grads[i] for i in chosen],
                    cast("list[Tensor]", [buffers[i] for i in chosen]),  # all set above
                    is_first_step=first,
                    **kernel_args,
                )
