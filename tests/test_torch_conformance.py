"""AsyncMomentumSGD is a drop-in for torch.optim.SGD, checked with torch's own SGD inputs.

torch ships the inputs of its optimizer test suite in
``torch.testing._internal.common_optimizers``: ``optim_inputs_func_sgd`` (the SGD configurations
torch tests: default, lr, tensor lr, weight decay, momentum, maximize, dampening, nesterov) and
``optim_error_inputs_func_sgd`` (arguments SGD must refuse, with the exception type and message).
This module feeds them to AsyncMomentumSGD and compares it with ``torch.optim.SGD`` run on the
same parameters, the same gradients and the same implementation flags.

Two variants are checked throughout: ``tuned`` (the default, ``tune=True``: ``momentum`` is the
total momentum and the optimizer subtracts the implicit momentum of the staleness it measures,
which is none when every step follows its own ``zero_grad``) and ``fixed`` (``tune=False``: the
momentum is applied as given). With no asynchrony both must step exactly like torch.optim.SGD.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.optim import SGD
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    optim_db,
    optim_error_inputs_func_sgd,
    optim_inputs_func_sgd,
)

from asyncmomentum import AsyncMomentumSGD

# -- what is compared ---------------------------------------------------------------------------

#: Extra constructor arguments of each variant (``tuned`` relies on the default).
VARIANTS: dict[str, dict[str, Any]] = {"tuned": {}, "fixed": {"tune": False}}

#: Implementation flags, passed identically to AsyncMomentumSGD and torch.optim.SGD.
IMPLS: dict[str, dict[str, Any]] = {
    "default": {},
    "forloop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}

SGD_INFO = next(info for info in optim_db if info.optim_cls is SGD)
FUSED_ON_CPU = "cpu" in getattr(SGD_INFO, "supports_fused_on", ())
if not FUSED_ON_CPU:  # pragma: no cover - an older torch, without a fused SGD on CPU
    IMPLS.pop("fused")

#: Steps of each parity run; a few, with one step where no parameter has a gradient.
STEPS = 6
#: The step at which no gradient is computed (all grads are None: the step must be a no-op).
NO_GRAD_STEP = 2
#: Steps past the tuner's default warmup (20), for the checks that need tuning to be live.
LONG_STEPS = 40


def _dtype_id(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``, for test ids."""
    return str(dtype).removeprefix("torch.")


def _desc_id(desc: str) -> str:
    """A torch input description as a test id.

    For example ``"weight_decay w/ momentum"`` -> ``"weight_decay_w_momentum"``.
    """
    return re.sub(r"\W+", "_", desc).strip("_")


def _sgd_inputs(dtype: torch.dtype = torch.float32) -> dict[str, dict[str, Any]]:
    """Torch's SGD optimizer inputs by description, fresh (a tensor lr is new at each call)."""
    return {inp.desc: dict(inp.kwargs) for inp in optim_inputs_func_sgd(device="cpu", dtype=dtype)}


def _is_negative_momentum(error: ErrorOptimizerInput) -> bool:
    """Whether ``error`` is torch's refusal of a negative momentum."""
    return "Invalid momentum value" in error.error_regex


def _sgd_error_inputs(dtype: torch.dtype = torch.float32) -> dict[str, ErrorOptimizerInput]:
    """Torch's SGD error inputs, fresh, by description, less the negative-momentum one.

    torch.optim.SGD refuses ``momentum=-0.5`` ("Invalid momentum value: -0.5"). AsyncMomentumSGD
    accepts negative momentum by design: under high asynchrony the algorithmic momentum that
    brings the total to its target is negative, and ``tune=False`` is a plain SGD that also takes
    it. That single input is an intentional difference (see
    :func:`test_negative_momentum_is_accepted_where_torch_refuses`).
    """
    return {
        error.optimizer_error_input.desc: error
        for error in optim_error_inputs_func_sgd(device="cpu", dtype=dtype)
        if not _is_negative_momentum(error)
    }


SGD_INPUT_DESCS = list(_sgd_inputs())
SGD_INPUT_PARAMS = [pytest.param(desc, id=_desc_id(desc)) for desc in SGD_INPUT_DESCS]
ERROR_INPUT_PARAMS = [pytest.param(desc, id=_desc_id(desc)) for desc in _sgd_error_inputs()]
VARIANT_PARAMS = [pytest.param(name, id=name) for name in VARIANTS]


def _parity_cases() -> list[Any]:
    """(impl, dtype) pairs: every impl in float32/float64; low precision on fused and forloop.

    In float16 and bfloat16, AsyncMomentumSGD's fused path is compared with torch's fused path
    and its per-tensor path with torch's per-tensor path. The model's parameters have at most
    12 elements, where torch's fused CPU kernel is right in low precision (it is wrong from 16
    elements on, see :data:`FUSED_HAZARDS`); the parity test checks that it is.
    """
    cases = [
        pytest.param(impl, dtype, id=f"{impl}-{_dtype_id(dtype)}")
        for impl in IMPLS
        for dtype in (torch.float32, torch.float64)
    ]
    low_impls = ("fused", "forloop") if FUSED_ON_CPU else ("forloop",)
    cases += [
        pytest.param(impl, dtype, id=f"{impl}-{_dtype_id(dtype)}")
        for impl in low_impls
        for dtype in (torch.float16, torch.bfloat16)
    ]
    return cases


# -- a small model, twice -----------------------------------------------------------------------


def _make_params(
    dtype: torch.dtype = torch.float32, seed: int = 0, *, strided: bool = True
) -> list[Tensor]:
    """Leaf parameters of a small model, the same for the same seed.

    A contiguous weight, a non-contiguous weight (a strided view; contiguous if not
    ``strided``), a bias, and a parameter the loss never uses (its gradient stays ``None``, so
    every step must skip it).
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    weight = torch.nn.Parameter(randn(4, 3))
    second = randn(4, 3, 2)[..., 0]
    second = torch.nn.Parameter(second if strided else second.contiguous())
    bias = torch.nn.Parameter(randn(3))
    unused = torch.nn.Parameter(randn(2, 2))
    assert second.is_contiguous() is not strided
    return [weight, second, bias, unused]


def _strided_ok(impl: str) -> bool:
    """Whether ``impl`` gets a strided parameter in the comparisons with torch.

    torch's fused CPU SGD kernel ignores the strides of a non-contiguous parameter (it updates
    the underlying storage as if contiguous: wrong values, and the view's neighbours written;
    see :func:`test_fused_matches_forloop_where_torch_kernel_errs`), so the fused comparisons use
    contiguous parameters, as torch's own fused tests do.
    """
    return impl != "fused"


def _make_input(dtype: torch.dtype = torch.float32, seed: int = 1) -> Tensor:
    """A fixed batch for :func:`_loss`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(5, 4, generator=gen, dtype=torch.float64).to(dtype)


def _loss(params: list[Tensor], x: Tensor) -> Tensor:
    """A smooth scalar loss of the first three of :func:`_make_params` (not of the fourth)."""
    weight, strided, bias = params[:3]
    out = torch.tanh(x @ weight) * (x @ strided) + bias
    return out.pow(2).mean()


def _clone_params(params: list[Tensor]) -> list[Tensor]:
    """Detached copies of ``params`` that require grad.

    New leaves with the same values and the same memory layout: the update path, and so its
    rounding, may depend on the layout.
    """
    return [
        torch.empty_strided(p.size(), p.stride(), dtype=p.dtype)
        .copy_(p.detach())
        .requires_grad_(p.requires_grad)
        for p in params
    ]


def _assert_params_equal(actual: list[Tensor], expected: list[Tensor], what: str = "") -> None:
    """Assert the parameters are equal to the default tolerance of their dtype.

    That tolerance is tight; the parameters are exact when both ran the same kernels.
    """
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a.detach(), e.detach(), msg=lambda m, i=i: f"{what} p{i}: {m}")


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    """Whether two parameter lists agree to rtol 1e-2, atol 1e-3.

    Loose enough for the rounding of a fused kernel against a per-tensor loop in low precision,
    tight enough for a kernel bug (which is off by the size of whole updates).
    """
    return all(
        torch.allclose(p.detach(), q.detach(), rtol=1e-2, atol=1e-3)
        for p, q in zip(a, b, strict=True)
    )


def _assert_same_tree(actual: Any, expected: Any, path: str = "state_dict") -> None:
    """Nested dicts/lists/tuples of tensors and plain values are equal, types included."""
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), f"{path}: {type(actual)} is not a Tensor"
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), path
        assert set(actual) == set(expected), path
        for key in expected:
            _assert_same_tree(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert type(actual) is type(expected), path
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_same_tree(a, e, f"{path}[{i}]")
    elif isinstance(expected, float) and expected != expected:  # NaN
        assert isinstance(actual, float), path
        assert actual != actual, path
    else:
        assert type(actual) is type(expected), f"{path}: {actual!r}"
        assert actual == expected, f"{path}: {actual!r}"


def _make_pair(
    variant: str,
    kwargs: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    *,
    strided: bool = True,
) -> tuple[AsyncMomentumSGD, list[Tensor], SGD, list[Tensor]]:
    """AsyncMomentumSGD and torch.optim.SGD with the same kwargs on twin parameters.

    A tensor lr is copied for torch, so that neither optimizer sees the other's tensor.
    """
    ours_params = _make_params(dtype, strided=strided)
    torch_params = _make_params(dtype, strided=strided)
    torch_kwargs = {k: v.clone() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
    ours = AsyncMomentumSGD(ours_params, **kwargs, **VARIANTS[variant])
    theirs = SGD(torch_params, **torch_kwargs)
    return ours, ours_params, theirs, torch_params


def _train_step(
    opt: torch.optim.Optimizer,
    params: list[Tensor],
    x: Tensor,
    step: int,
    *,
    use_closure: bool,
    **step_kwargs: Any,
) -> None:
    """One ``zero_grad``/backward/``step`` (through a closure or not).

    No backward on :data:`NO_GRAD_STEP`, so all gradients are ``None`` there. A closure's loss
    must come back.
    """

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _loss(params, x)
        if step != NO_GRAD_STEP:
            loss.backward()
        return loss

    if use_closure:
        returned = opt.step(closure, **step_kwargs)
        assert isinstance(returned, Tensor)
        assert returned.ndim == 0
    else:
        closure()
        assert opt.step(**step_kwargs) is None


def _momentum_buffers(opt: torch.optim.Optimizer, params: list[Tensor]) -> list[Tensor | None]:
    """Each parameter's ``momentum_buffer`` (``None`` where there is none)."""
    return [opt.state[p].get("momentum_buffer") if p in opt.state else None for p in params]


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dtype_id)
@pytest.mark.parametrize("desc", ERROR_INPUT_PARAMS)
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_error_inputs_raise_like_torch(variant: str, desc: str, dtype: torch.dtype) -> None:
    """Each of torch's SGD error inputs raises (or warns) the same type with torch's message."""
    error = _sgd_error_inputs(dtype)[desc]
    optim_input = error.optimizer_error_input
    kwargs = {**optim_input.kwargs, **VARIANTS[variant]}

    def expect() -> AbstractContextManager[Any]:
        if issubclass(error.error_type, Warning):
            return pytest.warns(error.error_type, match=error.error_regex)
        return pytest.raises(error.error_type, match=error.error_regex)

    if error.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with expect():
            AsyncMomentumSGD(optim_input.params, **kwargs)
    else:
        opt = AsyncMomentumSGD(optim_input.params, **kwargs)
        with expect():
            opt.step()


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_negative_momentum_is_accepted_where_torch_refuses(variant: str) -> None:
    """The one intentional difference: momentum=-0.5 is valid.

    It steps like torch's update rule with -0.5 (torch's SGD only refuses it in its
    constructor).
    """
    with pytest.raises(ValueError, match=r"Invalid momentum value: -0\.5"):
        SGD(_make_params(), lr=1e-2, momentum=-0.5)
    ours_params, torch_params = _make_params(), _make_params()
    ours = AsyncMomentumSGD(ours_params, lr=1e-2, momentum=-0.5, **VARIANTS[variant])
    theirs = SGD(torch_params, lr=1e-2, momentum=0.5)
    theirs.param_groups[0]["momentum"] = -0.5  # torch's update rule, past its constructor check
    x = _make_input()
    for step in range(STEPS):
        _train_step(ours, ours_params, x, step, use_closure=False)
        _train_step(theirs, torch_params, x, step, use_closure=False)
        _assert_params_equal(ours_params, torch_params, f"step {step}")


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_differentiable_raises_value_error(variant: str) -> None:
    """Torch's differentiable implementation is not supported, and says so clearly."""
    with pytest.raises(ValueError, match="differentiable"):
        AsyncMomentumSGD(_make_params(), lr=0.1, differentiable=True, **VARIANTS[variant])
    opt = AsyncMomentumSGD(_make_params(), lr=0.1, differentiable=False, **VARIANTS[variant])
    assert opt.param_groups[0]["differentiable"] is False


def test_loading_a_torch_sgd_state_dict_raises_value_error() -> None:
    """A state dict not written by AsyncMomentumSGD is refused, not half-loaded."""
    params = _make_params()
    theirs = SGD(params, lr=0.1, momentum=0.9)
    _train_step(theirs, params, _make_input(), 0, use_closure=False)
    ours = AsyncMomentumSGD(_clone_params(params), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="no 'async_momentum' entry"):
        ours.load_state_dict(theirs.state_dict())


# -- stepping like torch.optim.SGD -----------------------------------------------------------


def _skip_unless_torch_fused_is_right(desc: str, dtype: torch.dtype, x: Tensor) -> None:
    """Skip a low-precision fused comparison where torch's own fused run strays.

    It strays from torch's per-tensor run: then matching torch would mean matching a torch bug.
    """
    runs = []
    for flags in ({"fused": True}, {"foreach": False}):
        params = _make_params(dtype, strided=False)
        opt = SGD(params, **_sgd_inputs(dtype)[desc], **flags)
        for step in range(STEPS):
            _train_step(opt, params, x, step, use_closure=False)
        runs.append(params)
    if not _same(*runs):
        pytest.skip(f"torch's fused SGD is wrong in {_dtype_id(dtype)} here (pytorch#191763)")


@pytest.mark.parametrize("use_closure", [False, True], ids=["no_closure", "closure"])
@pytest.mark.parametrize("desc", SGD_INPUT_PARAMS)
@pytest.mark.parametrize(("impl", "dtype"), _parity_cases())
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_steps_match_torch_sgd(
    variant: str, impl: str, dtype: torch.dtype, desc: str, use_closure: bool
) -> None:
    """Step for step equal to torch.optim.SGD with the same kwargs and implementation flags.

    Contiguous and strided parameters, one without a gradient, one step with no gradients at
    all; momentum buffers must equal torch's wherever torch keeps one.
    """
    kwargs = {**_sgd_inputs(dtype)[desc], **IMPLS[impl]}
    ours, ours_params, theirs, torch_params = _make_pair(
        variant, kwargs, dtype, strided=_strided_ok(impl)
    )
    x = _make_input(dtype)
    if impl == "fused" and dtype in (torch.float16, torch.bfloat16):
        _skip_unless_torch_fused_is_right(desc, dtype, x)
    for step in range(STEPS):
        _train_step(ours, ours_params, x, step, use_closure=use_closure)
        _train_step(theirs, torch_params, x, step, use_closure=use_closure)
        _assert_params_equal(ours_params, torch_params, f"step {step}")
    expected = _momentum_buffers(theirs, torch_params)
    actual = _momentum_buffers(ours, ours_params)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if e is not None:
            assert a is not None, f"p{i} has no momentum_buffer where torch has one"
            torch.testing.assert_close(a, e)


@pytest.mark.parametrize("desc", SGD_INPUT_PARAMS)
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_state_has_no_empty_entries(variant: str, desc: str) -> None:
    """After a step no per-parameter state entry is empty.

    Torch's SGD creates none where it has nothing to store (torch's own suite checks this,
    ``test_non_empty_state``).
    """
    ours, ours_params, theirs, torch_params = _make_pair(variant, _sgd_inputs()[desc])
    x = _make_input()
    _train_step(ours, ours_params, x, 0, use_closure=False)
    _train_step(theirs, torch_params, x, 0, use_closure=False)
    empty = [i for i, p in enumerate(ours_params) if p in ours.state and not ours.state[p]]
    assert not empty, f"empty state entries for parameters {empty} (torch keeps none)"


@pytest.mark.parametrize("impl", [i for i in ("forloop", "fused") if i in IMPLS])
@pytest.mark.parametrize("desc", SGD_INPUT_PARAMS)
def test_tuned_without_asynchrony_matches_torch_past_warmup(desc: str, impl: str) -> None:
    """Without staleness the tuned optimizer stays torch's SGD well past the tuner's warmup.

    With each step after its own zero_grad (staleness 0) it steps like torch's SGD, and reports
    the target as its applied momentum.
    """
    kwargs = {**_sgd_inputs()[desc], **IMPLS[impl]}
    ours, ours_params, theirs, torch_params = _make_pair("tuned", kwargs, strided=_strided_ok(impl))
    x = _make_input()
    for step in range(LONG_STEPS):
        _train_step(ours, ours_params, x, step, use_closure=False)
        _train_step(theirs, torch_params, x, step, use_closure=False)
    _assert_params_equal(ours_params, torch_params)
    assert ours.algorithmic_momentum == pytest.approx(kwargs.get("momentum", 0.0), abs=1e-12)


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_positional_arguments_follow_torch_order(variant: str) -> None:
    """``(params, lr, momentum, dampening, weight_decay, nesterov)`` mean what they do in torch."""
    args = (0.05, 0.9, 0.0, 0.1, True)
    ours_params, torch_params = _make_params(), _make_params()
    ours = AsyncMomentumSGD(ours_params, *args, **VARIANTS[variant])
    theirs = SGD(torch_params, *args)
    for key in ("lr", "momentum", "dampening", "weight_decay", "nesterov"):
        assert ours.param_groups[0][key] == theirs.param_groups[0][key], key
    x = _make_input()
    for step in range(STEPS):
        _train_step(ours, ours_params, x, step, use_closure=False)
        _train_step(theirs, torch_params, x, step, use_closure=False)
    _assert_params_equal(ours_params, torch_params)


@pytest.mark.parametrize("desc", SGD_INPUT_PARAMS)
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_param_groups_carry_torch_keys_and_tune(variant: str, desc: str) -> None:
    """A group has every key of torch's SGD group, with torch's values, plus ``tune``."""
    kwargs = _sgd_inputs()[desc]
    ours, _, theirs, _ = _make_pair(variant, kwargs)
    ours_group, torch_group = ours.param_groups[0], theirs.param_groups[0]
    for key, value in torch_group.items():
        if key == "params":
            continue
        assert key in ours_group, f"group lacks torch's key {key!r}"
        if isinstance(value, Tensor):
            assert isinstance(ours_group[key], Tensor), key
            torch.testing.assert_close(ours_group[key], value)
        else:
            assert ours_group[key] == value, key
    assert ours_group["tune"] is (variant == "tuned")


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_tensor_lr_matches_float_lr(variant: str, impl: str) -> None:
    """A 1-element tensor lr steps like the same float lr, and stays a tensor in the group."""
    runs = []
    for lr in (0.01, torch.tensor(0.01)):
        params = _make_params(strided=_strided_ok(impl))
        opt = AsyncMomentumSGD(
            params, lr=lr, momentum=0.9, weight_decay=0.1, **IMPLS[impl], **VARIANTS[variant]
        )
        x = _make_input()
        for step in range(STEPS):
            _train_step(opt, params, x, step, use_closure=False)
        assert isinstance(opt.param_groups[0]["lr"], type(lr))
        runs.append(params)
    _assert_params_equal(runs[1], runs[0])


@pytest.mark.parametrize("impl", [i for i in ("default", "forloop", "foreach") if i in IMPLS])
@pytest.mark.parametrize("momentum", [None, 0.9], ids=["sparse_metadata", "with_momentum"])
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_sparse_gradients_match_torch(variant: str, momentum: float | None, impl: str) -> None:
    """Uncoalesced sparse gradients (torch's ``metadata_for_sparse`` kwargs) step like torch."""
    kwargs, _ = copy.deepcopy(SGD_INFO.metadata_for_sparse)
    if momentum is not None:
        kwargs["momentum"] = momentum
    kwargs.update(IMPLS[impl])
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    ours_param = torch.nn.Parameter(start.clone())
    torch_param = torch.nn.Parameter(start.clone())
    ours = AsyncMomentumSGD([ours_param], **kwargs, **VARIANTS[variant])
    theirs = SGD([torch_param], **kwargs)
    for step in range(STEPS):
        rows = torch.tensor([[step % 6, (step + 3) % 6, step % 6]])  # a duplicated row
        values = torch.randn(3, 2, generator=gen, dtype=torch.float64)
        for param, opt in ((ours_param, ours), (torch_param, theirs)):
            opt.zero_grad()
            param.grad = torch.sparse_coo_tensor(rows, values, (6, 2), check_invariants=True)
            opt.step()
        _assert_params_equal([ours_param], [torch_param], f"step {step}")


@pytest.mark.parametrize("desc", SGD_INPUT_PARAMS)
@pytest.mark.parametrize("impl", [i for i in ("default", "forloop", "foreach") if i in IMPLS])
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_complex_params_match_view_as_real(variant: str, impl: str, desc: str) -> None:
    """Complex parameters step exactly like their ``view_as_real`` twins (a real one mixed in)."""
    gen = torch.Generator().manual_seed(4)
    complex_params = [
        torch.randn(5, 3, generator=gen, dtype=torch.complex64).requires_grad_(),
        torch.randn(4, generator=gen, dtype=torch.complex64).requires_grad_(),
        torch.randn(3, 2, generator=gen, dtype=torch.float32).requires_grad_(),
    ]
    real_params = [
        (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
        for p in complex_params
    ]
    flags = {**IMPLS[impl], **VARIANTS[variant]}
    # Each optimizer gets its own inputs: a tensor lr is then not shared.
    complex_opt = AsyncMomentumSGD(complex_params, **_sgd_inputs()[desc], **flags)
    real_opt = AsyncMomentumSGD(real_params, **_sgd_inputs()[desc], **flags)
    for step in range(STEPS):
        complex_opt.zero_grad()
        real_opt.zero_grad()
        for c, r in zip(complex_params, real_params, strict=True):
            grad = torch.randn(r.shape, generator=gen, dtype=r.dtype)
            r.grad = grad
            c.grad = torch.view_as_complex(grad.clone()) if c.is_complex() else grad.clone()
        complex_opt.step()
        real_opt.step()
        as_real = [torch.view_as_real(p) if p.is_complex() else p for p in complex_params]
        _assert_params_equal(as_real, real_params, f"step {step}")


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_mixed_dtypes_in_one_group_match_torch(variant: str, impl: str) -> None:
    """One group holding float64, float32, float16 and bfloat16 parameters steps like torch."""
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

    def make() -> list[Tensor]:
        gen = torch.Generator().manual_seed(5)
        return [
            torch.randn(3, 2, generator=gen, dtype=torch.float64).to(d).requires_grad_()
            for d in dtypes
        ]

    ours_params, torch_params = make(), make()
    kwargs = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1, **IMPLS[impl]}
    ours = AsyncMomentumSGD(ours_params, **kwargs, **VARIANTS[variant])
    theirs = SGD(torch_params, **kwargs)
    gen = torch.Generator().manual_seed(6)
    for step in range(STEPS):
        for a, b in zip(ours_params, torch_params, strict=True):
            grad = torch.randn(a.shape, generator=gen, dtype=torch.float64).to(a.dtype)
            a.grad, b.grad = grad, grad.clone()
        ours.step()
        theirs.step()
        _assert_params_equal(ours_params, torch_params, f"step {step}")


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_param_groups_with_own_lr_and_weight_decay_match_torch(variant: str, impl: str) -> None:
    """Groups overriding lr, weight_decay, momentum and nesterov step like torch's groups."""

    def groups(params: list[Tensor]) -> list[dict[str, Any]]:
        return [
            {"params": [params[0]], "lr": 0.1, "weight_decay": 0.01},
            {"params": [params[1]], "momentum": 0.5, "nesterov": True},
            {"params": params[2:]},
        ]

    ours_params = _make_params(strided=_strided_ok(impl))
    torch_params = _make_params(strided=_strided_ok(impl))
    kwargs = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.1, **IMPLS[impl]}
    ours = AsyncMomentumSGD(groups(ours_params), **kwargs, **VARIANTS[variant])
    theirs = SGD(groups(torch_params), **kwargs)
    x = _make_input()
    for step in range(STEPS):
        _train_step(ours, ours_params, x, step, use_closure=True)
        _train_step(theirs, torch_params, x, step, use_closure=True)
        _assert_params_equal(ours_params, torch_params, f"step {step}")


@pytest.mark.parametrize("set_to_none", [False, True], ids=["set_to_zero", "set_to_none"])
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_zero_grad_matches_torch(variant: str, set_to_none: bool) -> None:
    """``zero_grad(set_to_none=...)`` leaves gradients as torch does.

    The next step then moves (zero gradients, momentum carries on) or not (no gradients) as
    torch's does.
    """
    ours, ours_params, theirs, torch_params = _make_pair(variant, {"lr": 0.1, "momentum": 0.9})
    x = _make_input()
    for opt, params in ((ours, ours_params), (theirs, torch_params)):
        _train_step(opt, params, x, 0, use_closure=False)
    grads_before = [p.grad for p in ours_params]
    ours.zero_grad(set_to_none=set_to_none)
    theirs.zero_grad(set_to_none=set_to_none)
    for p, q, before in zip(ours_params, torch_params, grads_before, strict=True):
        if set_to_none or q.grad is None:
            assert p.grad is None
        else:
            assert p.grad is before, "set_to_none=False must zero the gradient in place"
            assert not p.grad.any()
    ours.step()
    theirs.step()
    _assert_params_equal(ours_params, torch_params)


@pytest.mark.skipif(not FUSED_ON_CPU, reason="torch has no fused SGD on CPU here")
@pytest.mark.parametrize("grad_scale", [None, 1.0, 4.0], ids=["no_scale", "scale1", "scale4"])
@pytest.mark.parametrize("found_inf", [0.0, 1.0], ids=["finite", "found_inf"])
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_fused_honours_grad_scaler_attributes(
    variant: str, found_inf: float, grad_scale: float | None
) -> None:
    """On the fused path, GradScaler's attributes act as in torch's fused SGD.

    ``grad_scale`` unscales and a set ``found_inf`` skips the step.
    """
    for desc, kwargs in _sgd_inputs().items():
        ours_params = [torch.ones(3, requires_grad=True) for _ in range(4)]
        torch_params = [torch.ones(3, requires_grad=True) for _ in range(4)]
        ours = AsyncMomentumSGD(ours_params, fused=True, **kwargs, **VARIANTS[variant])
        theirs = SGD(torch_params, fused=True, **_sgd_inputs()[desc])
        for opt, params in ((ours, ours_params), (theirs, torch_params)):
            for i, p in enumerate(params):
                p.grad = torch.full_like(p, float(i + 1))
            opt.grad_scale = None if grad_scale is None else torch.tensor(grad_scale)
            opt.found_inf = torch.tensor(found_inf)
            opt.step()
        _assert_params_equal(ours_params, torch_params, desc)
        if found_inf:
            assert all(bool((p == 1).all()) for p in ours_params), f"{desc}: step not skipped"


def _layout_params(case: str) -> list[Tensor]:
    """Parameters for one of :data:`LAYOUTS` or :data:`FUSED_HAZARDS`, the same at every call."""
    gen = torch.Generator().manual_seed(7)
    if case.endswith("-64"):  # low precision, 64 elements
        dtype = {"float16-64": torch.float16, "bfloat16-64": torch.bfloat16}[case]
        return [torch.randn(64, generator=gen).to(dtype).requires_grad_() for _ in range(2)]
    make = {
        "strided-float32": lambda: torch.randn(4, 3, 2, generator=gen)[..., 0],
        "transposed-float32": lambda: torch.randn(3, 4, generator=gen).t(),
        "transposed-grad-float32": lambda: torch.randn(4, 3, generator=gen),
    }[case]
    return [make().requires_grad_() for _ in range(2)]


def _layout_grad(case: str, param: Tensor, gen: torch.Generator) -> Tensor:
    """A gradient for ``param``: contiguous, or transposed for ``"transposed-grad-float32"``."""
    if case == "transposed-grad-float32":
        return torch.randn(param.shape[::-1], generator=gen).t()
    return torch.randn(param.shape, generator=gen).to(param.dtype)


#: Memory layouts every path must handle: a non-dense (strided) parameter, a transposed
#: parameter with a contiguous gradient, a contiguous parameter with a transposed gradient.
LAYOUTS = ["strided-float32", "transposed-float32", "transposed-grad-float32"]

#: Inputs on which torch 2.13's fused CPU SGD kernel is wrong: parameters and gradients of
#: different memory layouts (it walks all of them as contiguous memory), and float16/bfloat16
#: parameters of 16 or more elements (their vectorized blocks are skipped, pytorch#191763).
FUSED_HAZARDS = [*LAYOUTS, "float16-64", "bfloat16-64"]


def _run_on_layout(
    opt_cls: Callable[..., torch.optim.Optimizer], case: str, **flags: Any
) -> list[Tensor]:
    """Parameters of ``case`` after a few steps of ``opt_cls(params, ..., **flags)``."""
    params = _layout_params(case)
    opt = opt_cls(params, lr=0.1, momentum=0.9, weight_decay=0.1, **flags)
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        for p in params:
            p.grad = _layout_grad(case, p, gen)
        opt.step()
    return params


@pytest.mark.parametrize("case", LAYOUTS)
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "fused"])
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_memory_layouts_match_torch(variant: str, impl: str, case: str) -> None:
    """Strided and transposed parameters or gradients step like torch on the non-fused paths.

    A path that hands them to torch's fused kernel would not, see :data:`FUSED_HAZARDS`.
    """

    def ours(params: list[Tensor], **kwargs: Any) -> AsyncMomentumSGD:
        return AsyncMomentumSGD(params, **kwargs, **VARIANTS[variant])

    _assert_params_equal(
        _run_on_layout(ours, case, **IMPLS[impl]), _run_on_layout(SGD, case, **IMPLS[impl])
    )


@pytest.mark.skipif(not FUSED_ON_CPU, reason="torch has no fused SGD on CPU here")
@pytest.mark.parametrize("case", FUSED_HAZARDS)
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_fused_matches_forloop_where_torch_kernel_errs(variant: str, case: str) -> None:
    """``fused=True`` steps like the per-tensor loop, or refuses the step.

    On inputs torch's CPU kernel gets wrong (torch.optim.SGD(fused=True) computes wrong values
    there) it refuses the step and changes nothing: a step must never corrupt the parameters.
    """

    def ours(params: list[Tensor], **kwargs: Any) -> AsyncMomentumSGD:
        return AsyncMomentumSGD(params, **kwargs, **VARIANTS[variant])

    torch_is_wrong = not _same(_run_on_layout(SGD, case, fused=True), _run_on_layout(SGD, case))
    if torch_is_wrong:
        params = _layout_params(case)
        before = [p.detach().clone() for p in params]
        opt = ours(params, lr=0.1, momentum=0.9, fused=True)
        gen = torch.Generator().manual_seed(8)
        for p in params:
            p.grad = _layout_grad(case, p, gen)
        with pytest.raises(RuntimeError, match="fused=True on the CPU"):
            opt.step()
        assert _same(params, before)
        assert opt.tracker.clock.value == 0
        return
    fused = _run_on_layout(ours, case, fused=True)
    forloop = _run_on_layout(ours, case, foreach=False)
    assert _same(fused, forloop), f"fused=True strays from the per-tensor loop on {case}"


# -- state ---------------------------------------------------------------------------------------


def _run_stale(
    opt: AsyncMomentumSGD, params: list[Tensor], steps: range, staleness: int = 1
) -> None:
    """The training steps numbered ``steps``, each reported ``staleness`` updates stale."""
    x = _make_input()
    for step in steps:
        _train_step(opt, params, x, step, use_closure=False, staleness=staleness)


#: Keyword arguments that make the tuner act within a few steps (see :func:`_run_stale`).
FAST_TUNING = {"warmup": 2}


@pytest.mark.parametrize("desc", SGD_INPUT_PARAMS)
@pytest.mark.parametrize("impl", [i for i in ("forloop", "foreach", "fused") if i in IMPLS])
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_state_dict_round_trip_continues_like_uninterrupted(
    variant: str, impl: str, desc: str
) -> None:
    """Training goes on after a save and load exactly as without the interruption.

    Save after some stale steps, load into a fresh optimizer on copied parameters: training goes
    on exactly as without the interruption (tuner state included).
    """
    kwargs = {**_sgd_inputs()[desc], **IMPLS[impl], **VARIANTS[variant], **FAST_TUNING}
    straight_params = _make_params(strided=_strided_ok(impl))
    straight = AsyncMomentumSGD(straight_params, **copy.deepcopy(kwargs))
    _run_stale(straight, straight_params, range(8))

    first_params = _make_params(strided=_strided_ok(impl))
    first = AsyncMomentumSGD(first_params, **copy.deepcopy(kwargs))
    _run_stale(first, first_params, range(4))
    saved = copy.deepcopy(first.state_dict())
    resumed_params = _clone_params(first_params)
    resumed = AsyncMomentumSGD(resumed_params, **copy.deepcopy(kwargs))
    resumed.load_state_dict(saved)
    _run_stale(resumed, resumed_params, range(4, 8))

    _assert_params_equal(resumed_params, straight_params)
    assert resumed.algorithmic_momentum == straight.algorithmic_momentum
    _assert_same_tree(resumed.state_dict(), straight.state_dict())


@pytest.mark.parametrize("desc", SGD_INPUT_PARAMS)
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_state_dict_survives_weights_only_load(variant: str, desc: str) -> None:
    """``torch.save`` then ``torch.load(weights_only=True)`` gives back an equal state dict.

    It loads and steps.
    """
    kwargs = {**_sgd_inputs()[desc], **VARIANTS[variant], **FAST_TUNING}
    params = _make_params()
    opt = AsyncMomentumSGD(params, **kwargs)
    _run_stale(opt, params, range(5), staleness=2)
    state = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    _assert_same_tree(loaded, state)
    fresh_params = _clone_params(params)
    fresh = AsyncMomentumSGD(
        fresh_params, **{**_sgd_inputs()[desc], **VARIANTS[variant], **FAST_TUNING}
    )
    fresh.load_state_dict(loaded)
    _run_stale(fresh, fresh_params, range(5, 7), staleness=2)
    _run_stale(opt, params, range(5, 7), staleness=2)
    _assert_params_equal(fresh_params, params)


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_state_dict_layout_extends_torch(variant: str) -> None:
    """The state dict has torch's layout plus one ``"async_momentum"`` entry.

    Torch's layout: ``state`` with the same per-parameter entries, and ``param_groups``.
    """
    ours, ours_params, theirs, torch_params = _make_pair(variant, {"lr": 0.1, "momentum": 0.9})
    x = _make_input()
    for step in range(3):
        _train_step(ours, ours_params, x, step, use_closure=False)
        _train_step(theirs, torch_params, x, step, use_closure=False)
    ours_state, torch_state = ours.state_dict(), theirs.state_dict()
    assert set(ours_state) == set(torch_state) | {"async_momentum"}
    assert set(ours_state["state"]) == set(torch_state["state"])
    for index, entry in torch_state["state"].items():
        assert set(ours_state["state"][index]) == set(entry)
        _assert_same_tree(ours_state["state"][index], entry, f"state[{index}]")
    for ours_group, torch_group in zip(
        ours_state["param_groups"], torch_state["param_groups"], strict=True
    ):
        assert set(torch_group) | {"tune"} <= set(ours_group)
        assert ours_group["params"] == torch_group["params"]


OLD_GROUP_KEYS = (
    "maximize",
    "foreach",
    "fused",
    "differentiable",
    "nesterov",
    "dampening",
    "weight_decay",
)


@pytest.mark.parametrize("missing", [*OLD_GROUP_KEYS, "all"])
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_older_state_dicts_load_and_step(variant: str, missing: str) -> None:
    """A state dict whose groups predate a key loads with the key's default.

    It then steps on as the original (which used the defaults) does.
    """
    kwargs = {"lr": 0.05, "momentum": 0.9, **VARIANTS[variant]}
    params = _make_params()
    opt = AsyncMomentumSGD(params, **kwargs)
    x = _make_input()
    for step in range(3):
        _train_step(opt, params, x, step, use_closure=False)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for key in OLD_GROUP_KEYS if missing == "all" else (missing,):
            del group[key]
    resumed_params = _clone_params(params)
    resumed = AsyncMomentumSGD(resumed_params, **kwargs)
    resumed.load_state_dict(old)
    for key in OLD_GROUP_KEYS:
        assert key in resumed.param_groups[0], f"{key!r} not restored"
        restored = resumed.param_groups[0][key]
        assert not restored, f"{key!r} restored as {restored!r}, not its default"
    for step in range(3, 6):
        _train_step(opt, params, x, step, use_closure=False)
        _train_step(resumed, resumed_params, x, step, use_closure=False)
    _assert_params_equal(resumed_params, params)


def _public_attributes(opt: torch.optim.Optimizer) -> set[str]:
    """Names of an optimizer's public instance attributes."""
    return {name for name in vars(opt) if not name.startswith("_")}


COPIERS: dict[str, Callable[[AsyncMomentumSGD], AsyncMomentumSGD]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda opt: pickle.loads(pickle.dumps(opt)),
}


@pytest.mark.parametrize("copier", list(COPIERS))
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_copies_keep_public_attributes_and_continue_equal(variant: str, copier: str) -> None:
    """A deepcopy or pickle round trip keeps every public attribute and trains on identically."""
    params = _make_params()
    opt = AsyncMomentumSGD(params, lr=0.05, momentum=0.9, **VARIANTS[variant], **FAST_TUNING)
    _run_stale(opt, params, range(4))
    clone = COPIERS[copier](opt)
    assert type(clone) is type(opt)
    assert _public_attributes(clone) == _public_attributes(opt)
    assert clone.defaults == opt.defaults
    assert clone.algorithmic_momentum == opt.algorithmic_momentum
    clone_params = [p for group in clone.param_groups for p in group["params"]]
    assert all(c is not p for c, p in zip(clone_params, params, strict=True))
    _assert_params_equal(clone_params, params)
    _run_stale(opt, params, range(4, 7))
    _run_stale(clone, clone_params, range(4, 7))
    _assert_params_equal(clone_params, params)
    assert clone.algorithmic_momentum == opt.algorithmic_momentum


# -- hooks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_step_hooks_fire_in_order_and_see_staleness(variant: str) -> None:
    """Global and per-optimizer step pre/post hooks fire in torch's order.

    They receive ``step``'s keyword arguments, and stop firing once removed.
    """
    fired: list[tuple[str, dict[str, Any]]] = []

    def recorder(name: str) -> Callable[..., None]:
        def hook(opt: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            fired.append((name, dict(kwargs)))

        return hook

    params = _make_params()
    opt = AsyncMomentumSGD(params, lr=0.1, momentum=0.9, **VARIANTS[variant])
    handles = [
        register_optimizer_step_pre_hook(recorder("global_pre")),
        register_optimizer_step_post_hook(recorder("global_post")),
        opt.register_step_pre_hook(recorder("pre")),
        opt.register_step_post_hook(recorder("post")),
    ]
    try:
        _train_step(opt, params, _make_input(), 0, use_closure=False, staleness=0)
    finally:
        for handle in handles:
            handle.remove()
    assert [name for name, _ in fired] == ["global_pre", "pre", "post", "global_post"]
    assert all(kwargs == {"staleness": 0} for _, kwargs in fired)
    _train_step(opt, params, _make_input(), 1, use_closure=False)
    assert len(fired) == 4


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_state_dict_hooks_fire(variant: str) -> None:
    """state_dict pre and post hooks fire; the post hook sees (and may extend) the full dict."""
    opt = AsyncMomentumSGD(_make_params(), lr=0.1, momentum=0.9, **VARIANTS[variant])
    calls: list[str] = []

    def post_hook(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        calls.append("post")
        return {**state_dict, "seen_by_post_hook": True}

    opt.register_state_dict_pre_hook(lambda optimizer: calls.append("pre"))
    opt.register_state_dict_post_hook(post_hook)
    state = opt.state_dict()
    assert calls == ["pre", "post"]
    assert state["seen_by_post_hook"] is True
    assert "async_momentum" in state


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_state_dict_post_hook_sees_the_whole_state_dict(variant: str) -> None:
    """A state_dict post hook gets the finished dict, ``"async_momentum"`` included.

    So hooks that filter, move or record a checkpoint see all of it (as they would with torch).
    """
    opt = AsyncMomentumSGD(_make_params(), lr=0.1, momentum=0.9, **VARIANTS[variant])
    seen: list[set[str]] = []
    opt.register_state_dict_post_hook(lambda optimizer, state_dict: seen.append(set(state_dict)))
    opt.state_dict()
    assert seen == [{"state", "param_groups", "async_momentum"}]


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_load_state_dict_hooks_fire(variant: str) -> None:
    """load_state_dict pre hooks may edit or replace the incoming dict; post hooks fire after."""
    opt = AsyncMomentumSGD(_make_params(), lr=0.1, momentum=0.9, **VARIANTS[variant])
    state = copy.deepcopy(opt.state_dict())
    calls: list[str] = []

    def edit_in_place(optimizer: Any, state_dict: dict[str, Any]) -> None:
        calls.append("edit")
        state_dict["param_groups"][0]["lr"] = 0.002

    def replace(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        calls.append("replace")
        replaced = copy.deepcopy(state_dict)
        replaced["param_groups"][0]["lr"] = 0.003
        return replaced

    def post(optimizer: Any) -> None:
        calls.append(f"post lr={optimizer.param_groups[0]['lr']}")

    opt.register_load_state_dict_pre_hook(edit_in_place)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(copy.deepcopy(state))
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(replace)
    opt.load_state_dict(copy.deepcopy(state))
    assert opt.param_groups[0]["lr"] == 0.003
    assert calls == ["edit", "post lr=0.002", "edit", "replace", "post lr=0.003"]


# -- the literal swap ------------------------------------------------------------------------


#: Staleness reported at every step of the literal-swap checks (as from ~8 async workers).
STALENESS = 7

CONSTRUCTORS: dict[str, Callable[..., AsyncMomentumSGD]] = {
    "positional": lambda params, **extra: AsyncMomentumSGD(params, 0.1, 0.9, **extra),
    "keyword": lambda params, **extra: AsyncMomentumSGD(params, lr=0.1, momentum=0.9, **extra),
}


def _stale_and_torch_runs(form: str, **extra: Any) -> tuple[AsyncMomentumSGD, list[float]]:
    """Run the literal swap ``AsyncMomentumSGD(params, 0.1, 0.9)`` beside torch's SGD.

    The swap (in ``form``) has every step reported :data:`STALENESS` stale; torch's run is
    ``SGD(params, 0.1, 0.9)``. Return the optimizer and the per-parameter differences from
    torch.
    """
    ours_params, torch_params = _make_params(), _make_params()
    ours = CONSTRUCTORS[form](ours_params, **extra)
    theirs = SGD(torch_params, 0.1, 0.9)
    x = _make_input()
    for step in range(LONG_STEPS):
        _train_step(ours, ours_params, x, step, use_closure=False, staleness=STALENESS)
        _train_step(theirs, torch_params, x, step, use_closure=False)
    return ours, [
        float((p.detach() - q.detach()).abs().max())
        for p, q in zip(ours_params, torch_params, strict=True)
    ]


@pytest.mark.parametrize("form", list(CONSTRUCTORS))
def test_literal_swap_tunes_momentum_down_under_staleness(form: str) -> None:
    """``AsyncMomentumSGD(params, 0.1, 0.9)`` fed stale gradients applies less than 0.9.

    And the update really uses it (it leaves torch's trajectory).
    """
    ours, differences = _stale_and_torch_runs(form)
    assert ours.param_groups[0]["tune"] is True
    assert -1.0 < ours.algorithmic_momentum < 0.9
    assert max(differences) > 1e-3


@pytest.mark.parametrize("form", list(CONSTRUCTORS))
def test_literal_swap_with_tune_false_keeps_momentum(form: str) -> None:
    """With ``tune=False`` the same stale run applies 0.9 and stays on torch's trajectory."""
    ours, differences = _stale_and_torch_runs(form, tune=False)
    assert ours.algorithmic_momentum == 0.9
    assert max(differences) <= 1e-6


def test_tune_is_a_per_group_key() -> None:
    """A group with ``tune=False`` keeps torch's momentum under staleness; a tuned one does not.

    The tuned group is in the same optimizer. (The groups' losses are separate, so their
    gradients are too.)
    """
    tuned_params, fixed_params = _make_params(seed=0), _make_params(seed=1)
    twins = {"tuned": _make_params(seed=0), "fixed": _make_params(seed=1)}
    ours = AsyncMomentumSGD(
        [{"params": tuned_params}, {"params": fixed_params, "tune": False}], lr=0.1, momentum=0.9
    )
    torch_opts = {name: SGD(params, lr=0.1, momentum=0.9) for name, params in twins.items()}
    x = _make_input()
    for _ in range(LONG_STEPS):
        ours.zero_grad()
        (_loss(tuned_params, x) + _loss(fixed_params, x)).backward()
        ours.step(staleness=STALENESS)
        for name, opt in torch_opts.items():
            opt.zero_grad()
            _loss(twins[name], x).backward()
            opt.step()
    assert ours.param_groups[1]["tune"] is False
    _assert_params_equal(fixed_params, twins["fixed"], "fixed group")
    difference = max(
        float((p.detach() - q.detach()).abs().max())
        for p, q in zip(tuned_params, twins["tuned"], strict=True)
    )
    assert difference > 1e-3, "the tuned group did not tune"


# -- torch's test_fused_matches_forloop ---------------------------------------------------------


def _derived_run(
    opt_cls: Callable[..., torch.optim.Optimizer], kwargs: dict[str, Any], dtype: torch.dtype
) -> list[Tensor]:
    """Parameters and momentum buffers after torch's ``_compare_between`` protocol.

    The model, input and steps of torch's ``TestOptimRenewed._test_derived_optimizers`` (which
    ``test_fused_matches_forloop`` runs): seven steps, none on the third (no gradients), the
    second linear layer frozen on steps 3 and 4, a 0-dim parameter last (zeros here: torch's
    ``torch.empty`` holds whatever memory it gets).
    """
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
    ).to(dtype)
    scalar = torch.zeros((), dtype=dtype, requires_grad=True)
    scalar.grad = torch.rand_like(scalar)
    params = [*model.parameters(), scalar]
    opt = opt_cls(params, **kwargs)
    for i in range(7):
        opt.zero_grad()
        if i in (3, 5):
            model[2].requires_grad_(i == 5)
        if i != 2:
            model(x).sum().backward()
        opt.step()
    buffers = [b for b in _momentum_buffers(opt, params) if b is not None]
    return [p.detach().clone() for p in params] + [b.clone() for b in buffers]


def _target_inputs(dtype: torch.dtype) -> dict[str, dict[str, Any]]:
    """Torch's SGD inputs with momentum 0.9 where they set none: a tuned user's target."""
    return {desc: {"momentum": 0.9, **kw} for desc, kw in _sgd_inputs(dtype).items()}


@pytest.mark.skipif(not FUSED_ON_CPU, reason="torch has no fused SGD on CPU here")
@pytest.mark.parametrize("inputs", ["torch", "momentum_0.9"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=_dtype_id
)
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_fused_matches_forloop_as_torch_does(variant: str, dtype: torch.dtype, inputs: str) -> None:
    """Torch's ``test_fused_matches_forloop``, run over AsyncMomentumSGD.

    Fused and for-loop agree to the dtype's default tolerance wherever torch.optim.SGD's do,
    and each of our paths equals torch's exactly. In float16/bfloat16 the two paths round
    differently (the kernel computes in float32 and rounds once, the loop rounds to the dtype
    after every op), so on some inputs they differ beyond the tolerance for torch's SGD too:
    with torch's inputs, ``weight_decay w/ momentum`` in float16 (0.18%, tolerance 0.1%); with
    momentum 0.9 added to torch's ``maximize`` input (weight_decay 0.1, what a tuned user with
    target 0.9 passes), one momentum-buffer element in bfloat16 (2.1%, tolerance 1.6%).
    """
    table = _sgd_inputs(dtype) if inputs == "torch" else _target_inputs(dtype)
    for desc, kwargs in table.items():
        runs = {}
        for name, cls in (("ours", AsyncMomentumSGD), ("torch", SGD)):
            extra = VARIANTS[variant] if cls is AsyncMomentumSGD else {}
            for fused in (False, True):
                kw = {k: v.clone() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
                runs[name, fused] = _derived_run(cls, {**kw, **extra, "fused": fused}, dtype)
        for fused in (False, True):
            for i, (a, e) in enumerate(zip(runs["ours", fused], runs["torch", fused], strict=True)):
                torch.testing.assert_close(a, e, rtol=0, atol=0, msg=f"{desc} fused={fused} [{i}]")
        if _close(runs["torch", True], runs["torch", False]):
            for i, (a, b) in enumerate(zip(runs["ours", True], runs["ours", False], strict=True)):
                torch.testing.assert_close(a, b, msg=lambda m, d=desc, i=i: f"{d} [{i}]: {m}")


def _close(actual: list[Tensor], expected: list[Tensor]) -> bool:
    """Whether ``assert_close`` (the dtype's default tolerance, as torch's test) passes."""
    try:
        for a, e in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, e)
    except AssertionError:
        return False
    return True
