"""Compute groups: synchronous inside a group, asynchronous across groups (Omnivore's layout).

``N`` training processes are split into ``G`` groups of consecutive global ranks. Inside a group
the gradients are averaged with an all-reduce over a ``torch.distributed`` subgroup, and the
group's leader (its lowest rank) pushes one update to the parameter server and shares the reply
with the others by a broadcast. The groups do not wait for each other: ``G`` is the asynchrony
``M`` of the seed paper's experiments.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from asyncmomentum.core.validation import check_int

__all__ = ["ComputeGroups", "GroupReply", "assign_groups"]


def assign_groups(world_size: int, groups: int) -> list[list[int]]:
    """The global ranks of each group: ``groups`` blocks of consecutive ranks, as even as possible.

    Args:
        world_size: number of training processes.
        groups: number of groups, in ``1 .. world_size``.

    Raises:
        ValueError: ``groups`` is not an integer in ``1 .. world_size``.
    """
    world_size = check_int(world_size, "world_size", 1)
    groups = check_int(groups, "groups (number of compute groups)", 1, maximum=world_size)
    return [
        list(range(g * world_size // groups, (g + 1) * world_size // groups)) for g in range(groups)
    ]


@dataclass(frozen=True)
class GroupReply:
    """What a group's leader shares with its group after a push (or join).

    Attributes:
        params: the flat parameters to compute from next (empty when ``stop``).
        version: the server's version of ``params``.
        stop: the job has ended for this group.
    """

    params: Tensor
    version: int
    stop: bool


class ComputeGroups:
    """This process's place among the compute groups, and the collectives inside its group.

    Every process of the job must construct it at the same point, with the same arguments:
    ``torch.distributed.new_group`` is a collective over the default group.

    Args:
        rank: this process's global rank.
        world_size: number of training processes.
        groups: number of compute groups.
        backend: backend of the subgroups (``"gloo"`` on CPU, ``"nccl"`` on GPU).
        timeout: how long a collective inside a group may wait for a member (a dead member
            makes the others fail after it).
    """

    def __init__(
        self, rank: int, world_size: int, groups: int, backend: str, timeout: timedelta
    ) -> None:
        self.layout = assign_groups(world_size, groups)
        self.rank = check_int(rank, "rank", 0, maximum=world_size - 1)
        self.index = next(g for g, ranks in enumerate(self.layout) if rank in ranks)
        self.members = self.layout[self.index]
        self._group: Any = None
        # One process per group needs no subgroup; otherwise every process takes part in creating
        # every subgroup (torch's rule), in the same order.
        if len(self.layout) < world_size:
            for ranks in self.layout:
                created = dist.new_group(ranks, timeout=timeout, backend=backend)
                if ranks is self.members:
                    self._group = created

    @property
    def count(self) -> int:
        """Number of groups ``G``."""
        return len(self.layout)

    @property
    def size(self) -> int:
        """Number of processes in this process's group."""
        return len(self.members)

    @property
    def leader(self) -> int:
        """Global rank of this group's leader (its lowest rank)."""
        return self.members[0]

    @property
    def is_leader(self) -> bool:
        """Whether this process pushes its group's updates."""
        return self.rank == self.leader

    @property
    def server_rank(self) -> int:
        """This group's worker rank on the parameter server (``1 .. G``)."""
        return self.index + 1

    def average(self, flat: Tensor) -> Tensor:
        """The mean of ``flat`` over the group (in place; synchronous inside the group).

        Args:
            flat: this process's flat gradient.
        """
        if self._group is not None:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._group)
            flat.div_(self.size)
        return flat

    def share(self, reply: GroupReply | None, numel: int, like: Tensor) -> GroupReply:
        """The leader's reply, on every member of the group.

        Args:
            reply: the reply, on the leader; ignored elsewhere.
            numel: number of parameter elements (the size of a non-stop reply).
            like: a tensor whose dtype and device the parameters travel with.
        """
        if self._group is None:
            assert reply is not None
            return reply
        header = torch.zeros(2, dtype=torch.int64, device=like.device)
        if self.is_leader:
            assert reply is not None
            header[0], header[1] = reply.version, int(reply.stop)
        dist.broadcast(header, src=self.leader, group=self._group)
        version, stop = int(header[0]), bool(header[1])
        if stop:
            return GroupReply(like.new_empty(0), version, True)
        if self.is_leader:
            assert reply is not None
            params = reply.params.to(device=like.device, dtype=like.dtype)
        else:
            params = like.new_empty(numel)
        dist.broadcast(params, src=self.leader, group=self._group)
        return GroupReply(params, version, False)
