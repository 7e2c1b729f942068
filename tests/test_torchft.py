"""torchft's DiLoCo takes AsyncMomentumSGD as its outer optimizer (state dict, checkpoint).

Set up as torchft's own ``test_diloco_healthy``: two replicas in threads of this process, each
with its own store, a gloo process group and a ``Manager``, and an in-process
``LighthouseServer``. Skipped where torchft is not installed (``pip install -e .[torchft]``).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
import torch
from torch import nn

from asyncmomentum import AsyncMomentumSGD

torchft = pytest.importorskip("torchft")
from torchft._torchft import LighthouseServer  # noqa: E402
from torchft.local_sgd import DiLoCo  # noqa: E402
from torchft.manager import Manager  # noqa: E402
from torchft.process_group import ProcessGroupGloo  # noqa: E402

REPLICAS, SYNC_EVERY, OUTER_STEPS = 2, 2, 4


def outer_optimizer(params: Any) -> AsyncMomentumSGD:
    return AsyncMomentumSGD(params, lr=0.7, momentum=0.9, nesterov=True)


def _replica(replica_id: int, lighthouse: str, initial: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(replica_id)  # different data per replica
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    model.load_state_dict(initial)
    inner = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    outer = outer_optimizer(model.parameters())
    store = torch.distributed.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)

    def state_dict() -> dict[str, Any]:
        return {"model": model.state_dict(), "inner_optim": inner.state_dict()}

    def load_state_dict(state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["inner_optim"])

    manager = Manager(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=10)),
        min_replica_size=REPLICAS,
        use_async_quorum=False,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        replica_id=str(replica_id),
        store_addr="localhost",
        store_port=store.port,
        rank=0,
        world_size=1,
        lighthouse_addr=lighthouse,
        port=0,
        connect_timeout=timedelta(seconds=10),
        quorum_timeout=timedelta(seconds=10),
        timeout=timedelta(seconds=10),
    )
    try:
        with DiLoCo(manager, [model], inner, [outer], sync_every=SYNC_EVERY):
            while manager.current_step() < OUTER_STEPS:
                x = torch.rand(4, 2)
                loss = nn.functional.cross_entropy(model(x), torch.randint(2, (4,)))
                inner.zero_grad()
                loss.backward()
                inner.step()
            saved = manager._manager_state_dict()
    finally:
        manager.shutdown(wait=False)
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "outer": outer,
        "manager_state": saved,
    }


@pytest.mark.timeout(120)
def test_diloco_steps_and_checkpoints_async_momentum_sgd_as_its_outer_optimizer() -> None:
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=REPLICAS)
    torch.manual_seed(42)
    initial = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).state_dict()
    try:
        with ThreadPoolExecutor(max_workers=REPLICAS) as pool:
            futures = [
                pool.submit(_replica, i, lighthouse.address(), initial) for i in range(REPLICAS)
            ]
            results = [f.result(timeout=100) for f in futures]
    finally:
        lighthouse.shutdown()
    a, b = results
    # The replicas agree after the outer steps (one all-reduced pseudo-gradient each time).
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name])
    outer: AsyncMomentumSGD = a["outer"]
    # DiLoCo steps the outer optimizer synchronously, without a staleness: the tracker counts
    # the outer steps and sees no asynchrony, so the momentum is the target, as torch's SGD.
    assert outer.tracker.clock.value == OUTER_STEPS
    assert outer.summary().estimated_workers == pytest.approx(1.0)
    assert outer.param_groups[0]["momentum"] == pytest.approx(0.9)
    assert all("momentum_buffer" in s for s in outer.state.values())

    # The manager's checkpoint holds the outer optimizer's state dict (tracker included); it
    # survives a save and load into a fresh optimizer.
    (key,) = [k for k in a["manager_state"]["user"] if k.startswith("StreamingDiLoCoFragment")]
    fragment = a["manager_state"]["user"][key]
    buffer = io.BytesIO()
    torch.save(fragment, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    fresh = outer_optimizer(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).parameters())
    fresh.load_state_dict(loaded["outer_optimizer"])
    assert fresh.tracker.clock.value == OUTER_STEPS
    for before, after in zip(outer.state.values(), fresh.state.values(), strict=True):
        torch.testing.assert_close(before["momentum_buffer"], after["momentum_buffer"])
