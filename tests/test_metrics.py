"""StalenessMetric: exact mean/max of staleness, locally and across two real gloo processes."""

from __future__ import annotations

import os
import queue
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from asyncmomentum.core.measuring.metrics import StalenessMetric

# Rank r observes these: different counts per rank, so a mean of per-rank means (2.0 and 10.0,
# averaging to 6.0) differs from the mean of all observations (16 / 4 = 4.0).
RANK_OBSERVATIONS = {0: [1, 2, 3], 1: [10]}


def test_mean_max_count_over_ints_sequences_and_tensors() -> None:
    metric = StalenessMetric()
    metric.update(4)
    metric.update([0, 7])
    metric.update(torch.tensor([[1, 2], [3, 5]], dtype=torch.int32))
    metric.update(torch.tensor(6))
    observations = [4, 0, 7, 1, 2, 3, 5, 6]
    result = metric.compute()
    assert result["count"].item() == len(observations)
    assert result["mean"].item() == pytest.approx(sum(observations) / len(observations))
    assert result["max"].item() == max(observations)
    assert result["mean"].dtype == torch.float64


def test_reset_and_empty_window() -> None:
    metric = StalenessMetric()
    metric.update([5, 9])
    metric.reset()
    with pytest.warns(UserWarning, match="compute"):  # torchmetrics: compute before update
        result = metric.compute()
    assert result["count"].item() == 0
    assert torch.isnan(result["mean"])
    assert result["max"].item() == 0
    metric.update(torch.tensor([], dtype=torch.int64))  # no observation: still empty
    assert metric.count.item() == 0


def test_forward_returns_batch_value_and_accumulates() -> None:
    metric = StalenessMetric()
    batch = metric(torch.tensor([2, 4]))
    assert batch["mean"].item() == pytest.approx(3.0)
    metric(torch.tensor([10]))
    total = metric.compute()
    assert total["mean"].item() == pytest.approx(16 / 3)
    assert total["max"].item() == 10


def test_large_sums_stay_exact() -> None:
    metric = StalenessMetric()
    big = 2**53 + 1  # not representable in float64: a float sum would round it
    metric.update([big, 1])
    assert metric.total.item() == big + 1


@pytest.mark.parametrize(
    "bad",
    [-1, [3, -2], torch.tensor([1.0, 2.0]), torch.tensor([True]), 2.5, "3", torch.tensor([-4])],
)
def test_bad_staleness_is_refused_and_changes_nothing(bad: object) -> None:
    metric = StalenessMetric()
    metric.update(2)
    with pytest.raises(ValueError, match="staleness"):
        metric.update(bad)  # type: ignore[arg-type]
    result = metric.compute()
    assert (result["count"].item(), result["max"].item()) == (1, 2)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, results: mp.Queue) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=30),
    )
    try:
        metric = StalenessMetric()
        for tau in RANK_OBSERVATIONS[rank]:
            metric.update(tau)
        result = metric.compute()
        local = metric.count.item()  # after compute, the local state is restored (unsynced)
        results.put((rank, {k: v.item() for k, v in result.items()}, local))
    finally:
        dist.destroy_process_group()
    # The result is sent (the queue's thread flushed): skip the interpreter's teardown, where
    # Gloo's threads can abort a spawned process after its work (pytorch/pytorch#179291).
    results.close()
    results.join_thread()
    os._exit(0)


def test_two_gloo_ranks_get_the_exact_global_mean() -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, results)) for r in (0, 1)]
    try:
        for proc in procs:
            proc.start()
        got = {}
        for _ in procs:
            try:
                rank, result, local = results.get(timeout=90)
            except queue.Empty:
                pytest.fail(
                    f"a rank gave no result in time; exit codes {[p.exitcode for p in procs]}"
                )
            got[rank] = (result, local)
        for proc in procs:
            proc.join(timeout=30)
            assert proc.exitcode == 0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
    everything = [tau for taus in RANK_OBSERVATIONS.values() for tau in taus]
    expected = {"mean": sum(everything) / len(everything), "max": 10, "count": 4}
    assert got[0][0] == got[1][0]  # the same on both ranks
    assert got[0][0]["mean"] == pytest.approx(expected["mean"])
    assert (got[0][0]["max"], got[0][0]["count"]) == (expected["max"], expected["count"])
    # Not a mean of per-rank means.
    assert got[0][0]["mean"] != pytest.approx((2.0 + 10.0) / 2)
    assert (got[0][1], got[1][1]) == (3, 1)  # each rank's own state is its own afterwards
