"""A refused checkpoint changes nothing (issue 13): optimizer loads and load_checkpoint."""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from asyncmomentum.core.optimizer import AsyncMomentumSGD
from asyncmomentum.runtimes.server import CHECKPOINT_FORMAT, load_checkpoint

PATHS = {
    "foreach=False": {"foreach": False},
    "foreach=True": {"foreach": True},
    "fused=True": {"fused": True},
}
Fault = Callable[[dict[str, Any]], None]


def make_model(width: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 2))


def make_opt(model: nn.Module, path: str, tune: bool) -> AsyncMomentumSGD:
    extra: dict[str, Any] = {"warmup": 0} if tune else {"tune": False}
    return AsyncMomentumSGD(
        model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, **PATHS[path], **extra
    )


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for index in range(steps):
        x = torch.randn(8, 4, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if isinstance(opt, AsyncMomentumSGD):
            opt.step(staleness=index % 3)
        else:
            opt.step()


def same(a: Any, b: Any) -> bool:
    """Deep equality: tensors by dtype and torch.equal, floats NaN-aware, containers by content."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.isnan(), b.isnan())  # NaN where a meter has no reading yet
            and torch.equal(a.masked_fill(a.isnan(), 0), b.masked_fill(b.isnan(), 0))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(same(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    shot = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(opt.state_dict()),
        "groups": copy.deepcopy(groups),
        "params": [[id(p) for p in g["params"]] for g in opt.param_groups],
    }
    if isinstance(opt, AsyncMomentumSGD):
        shot["clock"] = opt.tracker.clock.value
        shot["estimator"] = copy.deepcopy(opt.tracker.estimator.state_dict())
        shot["counters"] = (opt.last_staleness, opt.skipped_steps, opt.tracker.version_read)
    return shot


def older_state(
    path: str, tune: bool
) -> tuple[nn.Module, AsyncMomentumSGD, dict[str, Any], dict[str, Any]]:
    """A trained optimizer, and a valid but older state of it (so a partial load would show)."""
    model = make_model()
    opt = make_opt(model, path, tune)
    train(model, opt, 4)
    old = copy.deepcopy(opt.state_dict())
    old_model = copy.deepcopy(model.state_dict())
    train(model, opt, 3, seed=2)
    return model, opt, old, old_model


def _group(key: str, value: Any) -> Fault:
    def fault(state: dict[str, Any]) -> None:
        state["param_groups"][0][key] = value

    return fault


def _buffer(change: Callable[[torch.Tensor], Any]) -> Fault:
    def fault(state: dict[str, Any]) -> None:
        entry = state["state"][0]
        entry["momentum_buffer"] = change(entry["momentum_buffer"])

    return fault


def _extra(key: str, value: Any = None, *, drop: bool = False, within: str = "") -> Fault:
    def fault(state: dict[str, Any]) -> None:
        entry = state["async_momentum"]
        if within:
            entry = entry[within]
        if drop:
            del entry[key]
        else:
            entry[key] = value

    return fault


def _tracker(key: str, value: Any = None, *, drop: bool = False) -> Fault:
    return _extra(key, value, drop=drop, within="tracker")


def _set(keys: tuple[Any, ...], value: Any) -> Fault:
    def fault(state: dict[str, Any]) -> None:
        target = state
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return fault


def _nan_buffer(buf: torch.Tensor) -> torch.Tensor:
    buf = buf.clone()
    buf.view(-1)[0] = float("nan")
    return buf


def _extra_group(state: dict[str, Any]) -> None:
    state["param_groups"].append(copy.deepcopy(state["param_groups"][0]))


def _drop_param(state: dict[str, Any]) -> None:
    state["param_groups"][0]["params"].pop()


def _duplicate_param(state: dict[str, Any]) -> None:
    params = state["param_groups"][0]["params"]
    params[1] = params[0]


OPTIMIZER_FAULTS: dict[str, Fault] = {
    "lr=-1": _group("lr", -1.0),
    "lr=nan": _group("lr", float("nan")),
    "lr=inf": _group("lr", float("inf")),
    "lr=string": _group("lr", "0.1"),
    "lr=bool": _group("lr", True),
    "momentum=5": _group("momentum", 5.0),
    "momentum=nan": _group("momentum", float("nan")),
    "momentum=bool": _group("momentum", True),
    "weight_decay=-1": _group("weight_decay", -1.0),
    "nesterov=string": _group("nesterov", "yes"),
    "group not a dict": _set(("param_groups", 0), [1, 2]),
    "extra group": _extra_group,
    "group lacks a param": _drop_param,
    "param listed twice": _duplicate_param,
    "buffer transposed": _buffer(lambda b: b.t().contiguous()),
    "buffer too long": _buffer(lambda b: torch.zeros(b.numel() + 1)),
    "buffer nan": _buffer(_nan_buffer),
    "buffer inf": _buffer(lambda b: b.new_full(b.shape, float("inf"))),
    "buffer int64": _buffer(lambda b: b.to(torch.int64)),
    "buffer bool": _buffer(lambda b: b > 0),
    "buffer complex": _buffer(lambda b: b.to(torch.complex64)),
    "buffer a list": _buffer(lambda b: b.tolist()),
    "state of param 99": _set(("state", 99), {"momentum_buffer": torch.zeros(3)}),
    "state entry a tensor": _set(("state", 0), torch.zeros(8, 4)),
    "state not a dict": _set(("state",), [1]),
    "version_read missing": _tracker("version_read", drop=True),
    "version_read=-1": _tracker("version_read", -1),
    "version_read=float": _tracker("version_read", 2.5),
    "last_staleness missing": _tracker("last_staleness", drop=True),
    "last_staleness=string": _tracker("last_staleness", "3"),
    "skipped_steps missing": _extra("skipped_steps", drop=True),
    "skipped_steps=bool": _extra("skipped_steps", True),
    "components missing": _extra("components", drop=True),
    "components a list": _extra("components", []),
    "clock missing": _tracker("clock", drop=True),
    "clock=-5": _set(("async_momentum", "tracker", "clock", "value"), -5),
    "clock a list": _tracker("clock", [3]),
    "estimator missing": _tracker("estimator", drop=True),
    "tracker missing": _extra("tracker", drop=True),
    "tracker a string": _extra("tracker", "tracker"),
    "estimator ema nan": _set(
        ("async_momentum", "tracker", "estimator", "ema"), torch.tensor([math.nan, 1.0])
    ),
    "format 99": _set(("async_momentum", "format"), 99),
    "async entry missing": lambda state: state.pop("async_momentum"),
}


@pytest.mark.parametrize("tune", [True, False], ids=["tuned", "tune=False"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fault", list(OPTIMIZER_FAULTS))
def test_a_refused_load_changes_nothing(fault: str, path: str, tune: bool) -> None:
    model, opt, old, _ = older_state(path, tune)
    bad = copy.deepcopy(old)
    OPTIMIZER_FAULTS[fault](bad)
    before = snapshot(model, opt)
    with pytest.raises(ValueError):  # noqa: PT011 - each fault has its own message
        opt.load_state_dict(bad)
    assert same(snapshot(model, opt), before)
    # The valid older state still loads, so the faults above are what was refused.
    opt.load_state_dict(old)
    assert same(opt.state_dict(), old)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_floating_buffer_of_another_dtype_is_cast_as_torch_does(path: str) -> None:
    model, opt, old, _ = older_state(path, tune=True)
    old["state"][0]["momentum_buffer"] = old["state"][0]["momentum_buffer"].double()
    opt.load_state_dict(old)
    assert opt.state[next(model.parameters())]["momentum_buffer"].dtype == torch.float32
    train(model, opt, 2)  # and steps on, on every path


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(("saved", "loading"), [((8,), (16,)), ((4, 3), (3, 4))])
def test_state_of_another_model_is_refused_and_step_still_works(
    path: str, saved: tuple[int, ...], loading: tuple[int, ...]
) -> None:
    def build(shape: tuple[int, ...]) -> nn.Module:
        torch.manual_seed(0)
        return make_model(shape[0]) if len(shape) == 1 else nn.Linear(*shape)

    source = build(saved)
    source_opt = make_opt(source, path, tune=True)
    (train if len(saved) == 1 else _train_linear)(source, source_opt, 3)
    model, twin = build(loading), build(loading)
    opt, twin_opt = make_opt(model, path, tune=True), make_opt(twin, path, tune=True)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(source_opt.state_dict())
    assert same(snapshot(model, opt), before)
    # The next step runs (the fused kernel never saw a wrong buffer) and equals an untouched twin.
    step = train if len(loading) == 1 else _train_linear
    step(model, opt, 3)
    step(twin, twin_opt, 3)
    assert same(model.state_dict(), twin.state_dict())
    assert not same(model.state_dict(), before["model"])


def _train_linear(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, model.in_features, generator=gen)).pow(2).mean().backward()
        opt.step()


# -- load_checkpoint -----------------------------------------------------------------------------


def make_bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def checkpoint_of(model: nn.Module, opt: torch.optim.Optimizer, updates: int) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(opt.state_dict()),
        "optimizer_class": type(opt).__name__,
        "updates": updates,
    }


def _model_tensor(name: str, change: Callable[[torch.Tensor], Any]) -> Fault:
    def fault(state: dict[str, Any]) -> None:
        state["model"][name] = change(state["model"][name])

    return fault


def _drop(*keys: str) -> Fault:
    def fault(state: dict[str, Any]) -> None:
        target = state
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return fault


CHECKPOINT_FAULTS: dict[str, Fault] = {
    "weight transposed": _model_tensor("0.weight", lambda t: t.t().contiguous()),
    "weight nan": _model_tensor("0.weight", _nan_buffer),
    "weight int": _model_tensor("0.weight", lambda t: t.to(torch.int32)),
    "weight complex": _model_tensor("0.weight", lambda t: t.to(torch.complex64)),
    "weight a list": _model_tensor("0.weight", lambda t: t.tolist()),
    "counter float": _model_tensor("1.num_batches_tracked", lambda t: t.float()),
    "running_var inf": _model_tensor("1.running_var", lambda t: t.new_full(t.shape, math.inf)),
    "model key missing": _drop("model", "2.bias"),
    "model key extra": _set(("model", "3.weight"), torch.zeros(2)),
    "model not a dict": _set(("model",), [1]),
    "updates=-1": _set(("updates",), -1),
    "updates string": _set(("updates",), "5"),
    "updates missing": _drop("updates"),
    "optimizer_class other": _set(("optimizer_class",), "Adam"),
    "optimizer missing": _drop("optimizer"),
    "optimizer buffer shape": _set(("optimizer", "state", 0, "momentum_buffer"), torch.zeros(4)),
    "optimizer buffer nan": _set(
        ("optimizer", "state", 0, "momentum_buffer"), torch.full((8, 4), math.nan)
    ),
    "optimizer state of param 99": _set(("optimizer", "state", 99), {}),
    "optimizer lr nan": _set(("optimizer", "param_groups", 0, "lr"), math.nan),
    "optimizer momentum string": _set(("optimizer", "param_groups", 0, "momentum"), "0.9"),
    "optimizer group short": lambda state: state["optimizer"]["param_groups"][0]["params"].pop(),
    "format 2": _set(("format",), 2),
}
ASYNC_ONLY = {"async tracker missing": _drop("optimizer", "async_momentum", "tracker")}


def _sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _async(model: nn.Module, path: str, tune: bool) -> AsyncMomentumSGD:
    return make_opt(model, path, tune)


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "SGD": _sgd,
    **{
        f"AsyncMomentumSGD {path} {'tuned' if tune else 'tune=False'}": (
            lambda model, path=path, tune=tune: _async(model, path, tune)
        )
        for path in PATHS
        for tune in (True, False)
    },
}


def _trained_checkpoint(
    kind: str, tmp_path: Path, fault: Fault | None
) -> tuple[nn.Module, torch.optim.Optimizer, Path]:
    """A model and optimizer trained on, and an older checkpoint of them with ``fault``."""
    model = make_bn_model()
    opt = OPTIMIZERS[kind](model)
    train(model, opt, 4)
    state = checkpoint_of(model, opt, 4)
    if fault is not None:
        fault(state)
    train(model, opt, 3, seed=2)
    path = tmp_path / "ps.pt"
    torch.save(state, path)
    return model, opt, path


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("fault", list(CHECKPOINT_FAULTS))
def test_a_refused_checkpoint_changes_nothing(fault: str, kind: str, tmp_path: Path) -> None:
    model, opt, path = _trained_checkpoint(kind, tmp_path, CHECKPOINT_FAULTS[fault])
    before = snapshot(model, opt)
    with pytest.raises(ValueError):  # noqa: PT011 - each fault has its own message
        load_checkpoint(path, model, opt)
    assert same(snapshot(model, opt), before)


@pytest.mark.parametrize("kind", [k for k in OPTIMIZERS if k != "SGD"])
@pytest.mark.parametrize("fault", list(ASYNC_ONLY))
def test_a_refused_async_state_leaves_the_model_alone(
    fault: str, kind: str, tmp_path: Path
) -> None:
    model, opt, path = _trained_checkpoint(kind, tmp_path, ASYNC_ONLY[fault])
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="async_momentum"):
        load_checkpoint(path, model, opt)
    assert same(snapshot(model, opt), before)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_a_valid_checkpoint_loads(kind: str, tmp_path: Path) -> None:
    model, opt, path = _trained_checkpoint(kind, tmp_path, None)
    saved = torch.load(path, weights_only=True)
    info = load_checkpoint(path, model, opt)
    assert info.updates == 4
    assert same(model.state_dict(), saved["model"])
    assert same(opt.state_dict(), saved["optimizer"])


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _truncated(path: Path, good: bytes) -> None:
    path.write_bytes(good[: len(good) // 2])


def _random_bytes(path: Path, good: bytes) -> None:
    path.write_bytes(bytes(range(256)) * 4)


def _foreign(path: Path, good: bytes) -> None:
    torch.save([torch.zeros(3)], path)


def _lacking_keys(path: Path, good: bytes) -> None:
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}}, path)


def _plain_pickle(path: Path, good: bytes) -> None:
    path.write_bytes(pickle.dumps({"format": CHECKPOINT_FORMAT}, protocol=2))


def _empty(path: Path, good: bytes) -> None:
    path.write_bytes(b"")


FILE_FAULTS = {
    "truncated": (_truncated, "cannot be read"),
    "random bytes": (_random_bytes, "cannot be read"),
    "empty": (_empty, "cannot be read"),
    "foreign": (_foreign, "not a parameter-server checkpoint"),
    "lacking keys": (_lacking_keys, "lacks"),
    "plain pickle": (_plain_pickle, "cannot be read"),
}


@pytest.mark.parametrize("kind", ["SGD", "AsyncMomentumSGD foreach=False tuned"])
@pytest.mark.parametrize("fault", list(FILE_FAULTS))
def test_an_unreadable_file_changes_nothing(fault: str, kind: str, tmp_path: Path) -> None:
    model, opt, path = _trained_checkpoint(kind, tmp_path, None)
    write, message = FILE_FAULTS[fault]
    write(path, path.read_bytes())
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path, model, opt)
    assert same(snapshot(model, opt), before)


def test_a_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    model, opt, path = _trained_checkpoint("SGD", tmp_path, None)
    marker = tmp_path / "ran"
    state = torch.load(path, weights_only=True)
    state["updates"] = _Payload(marker)
    torch.save(state, path)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"cannot be read.*Unsupported global"):
        load_checkpoint(path, model, opt)
    assert not marker.exists()
    assert same(snapshot(model, opt), before)


def test_a_missing_file_raises_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt", make_bn_model())


METER_FAULTS: dict[str, Fault] = {
    "grads_ring shape": _set(
        ("async_momentum", "components", "meter", "grads_ring"), torch.zeros(2, 2)
    ),
    "params_ring nan": lambda state: state["async_momentum"]["components"]["meter"][
        "params_ring"
    ].fill_(math.nan),
    "lrs a string": _set(("async_momentum", "components", "meter", "lrs"), "0.1"),
    "records=-1": _set(("async_momentum", "components", "meter", "records"), -1),
    "meter a list": _set(("async_momentum", "components", "meter"), [1]),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fault", list(METER_FAULTS))
def test_a_refused_meter_state_changes_nothing(fault: str, path: str) -> None:
    model = make_model()
    opt = AsyncMomentumSGD(
        model.parameters(), lr=0.05, momentum=0.9, warmup=0, measure_momentum=True, **PATHS[path]
    )
    train(model, opt, 4)
    bad = copy.deepcopy(opt.state_dict())
    METER_FAULTS[fault](bad)
    train(model, opt, 3, seed=2)
    before = snapshot(model, opt)
    before["meter"] = copy.deepcopy(opt.meter.state_dict())
    with pytest.raises(ValueError, match=r"MomentumMeter|meter"):
        opt.load_state_dict(bad)
    after = snapshot(model, opt)
    after["meter"] = opt.meter.state_dict()
    assert same(after, before)


TORCH_OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "Adam amsgrad": lambda params: torch.optim.Adam(params, amsgrad=True),
    "Adafactor": torch.optim.Adafactor,
    "LBFGS": torch.optim.LBFGS,
    "RMSprop": lambda params: torch.optim.RMSprop(params, momentum=0.5),
}


@pytest.mark.parametrize("kind", list(TORCH_OPTIMIZERS))
def test_other_torch_optimizers_load_their_own_state_and_refuse_nan(
    kind: str, tmp_path: Path
) -> None:
    model = make_bn_model()
    opt = TORCH_OPTIMIZERS[kind](model.parameters())
    gen = torch.Generator().manual_seed(0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(torch.randn(8, 4, generator=gen)).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    state = checkpoint_of(model, opt, 2)
    torch.save(state, tmp_path / "good.pt")
    assert load_checkpoint(tmp_path / "good.pt", model, opt).updates == 2
    entry = state["optimizer"]["state"][0]
    name = next(k for k, v in entry.items() if isinstance(v, torch.Tensor) and v.numel() > 1)
    entry[name] = torch.full_like(entry[name], math.nan)
    torch.save(state, tmp_path / "bad.pt")
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="NaN"):
        load_checkpoint(tmp_path / "bad.pt", model, opt)
    assert same(snapshot(model, opt), before)
