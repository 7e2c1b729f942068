"""Batch sizes: read from any batch, and handed to a rule that reads them by the simulator."""

from __future__ import annotations

import torch
from torch import nn

from asyncmomentum import AsyncMomentumSGD
from asyncmomentum.runtimes.batch_size import batch_size_of
from asyncmomentum.runtimes.simulate import round_robin, simulate


def test_the_batch_size_is_the_leading_dimension_of_the_first_tensor():
    x, y = torch.zeros(5, 3), torch.zeros(5, dtype=torch.long)
    assert batch_size_of(x) == 5
    assert batch_size_of((x, y)) == 5
    assert batch_size_of([torch.zeros(7, 2)]) == 7
    assert batch_size_of({"input_ids": torch.zeros(3, 9), "labels": torch.zeros(3)}) == 3
    assert batch_size_of(("a label", [torch.tensor(1.0), (x,)])) == 5  # nested; scalars skipped
    for none in (None, "text", 3, torch.tensor(2.0), (), {}, [torch.tensor(1.0)]):
        assert batch_size_of(none) is None


def test_the_simulator_hands_the_rule_each_batchs_size():
    torch.manual_seed(0)
    inputs, targets = torch.randn(36, 4), torch.randint(0, 3, (36,))
    # 36 rows in batches of 16: each epoch ends with a batch of 4.
    batches = [(inputs[i : i + 16], targets[i : i + 16]) for i in range(0, 36, 16)]
    model = nn.Linear(4, 3)
    optimizer = AsyncMomentumSGD(model.parameters(), lr=0.1, momentum=0.9, rule="auto")
    seen = []
    observe = optimizer.rule.observe_batch_size
    optimizer.rule.observe_batch_size = lambda size: (seen.append(size), observe(size))[1]

    def loss_fn(module, batch):
        return nn.functional.cross_entropy(module(batch[0]), batch[1])

    simulate(model, loss_fn, batches, optimizer, round_robin(2), steps=6, seed=0)
    assert seen == [16, 16, 4, 16, 16, 4]
    assert optimizer.rule.detector.count == 4  # the two short batches' norms were not read
