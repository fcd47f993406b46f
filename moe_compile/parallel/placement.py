"""Expert placement: which rank hosts which experts, balanced on measured (or given) routing load.

`Placement.contiguous` is the default (rank r hosts experts [r*E/N, (r+1)*E/N), uneven shards when N does not
divide E). `balanced_placement` packs experts onto ranks by greedy longest-processing-time (LPT): experts sorted by
load, each to the least-loaded rank that still has a free slot. With `replicate=True` and spare slots under the
per-rank memory limit, the hottest experts get extra replicas first (each replica then serves an equal share of its
expert's tokens, split by token index), which LPT then packs like any other item.

Dimension legend: E = experts, N = expert-parallel ranks, L = expert slots on a rank, R = most replicas of an expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


class PlacementError(ValueError):
    """No placement satisfies the request (memory limit too small, malformed user placement, ...)."""


@dataclass(frozen=True)
class Placement:
    """`rank_experts[r]` lists the global expert ids rank r hosts, in its local slot order."""

    num_experts: int  # E
    rank_experts: tuple[tuple[int, ...], ...]  # N entries

    def __post_init__(self) -> None:
        hosted = {e for experts in self.rank_experts for e in experts}
        if hosted != set(range(self.num_experts)):
            missing = sorted(set(range(self.num_experts)) - hosted)
            raise PlacementError(f"placement must host every expert 0..{self.num_experts - 1}; missing {missing}")
        for rank, experts in enumerate(self.rank_experts):
            if len(set(experts)) != len(experts):
                raise PlacementError(f"rank {rank} hosts an expert twice: {list(experts)}")

    @property
    def world_size(self) -> int:
        return len(self.rank_experts)

    @property
    def slots_per_rank(self) -> int:  # L = the largest shard
        return max(len(experts) for experts in self.rank_experts)

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> "Placement":
        """Experts in order, the first E % N ranks one more: the placement without any statistics."""
        base, extra = divmod(num_experts, world_size)
        bounds = [0]
        for rank in range(world_size):
            bounds.append(bounds[-1] + base + (rank < extra))
        return cls(num_experts, tuple(tuple(range(bounds[r], bounds[r + 1])) for r in range(world_size)))

    def replicas(self, expert: int) -> list[tuple[int, int]]:
        """(rank, local slot) of every copy of `expert`, by rank."""
        return [(r, experts.index(expert)) for r, experts in enumerate(self.rank_experts) if expert in experts]

    def rank_loads(self, expert_load: Sequence[float]) -> list[float]:
        """Tokens each rank computes when expert e receives expert_load[e] (a replica takes an equal share)."""
        copies = [len(self.replicas(e)) for e in range(self.num_experts)]
        return [sum(float(expert_load[e]) / copies[e] for e in experts) for experts in self.rank_experts]

    def lookup_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Device-side routing tables: copies [E], replica rank [E, R] and replica slot [E, R] (padded by repeating
        the first copy, never read past `copies`)."""
        per_expert = [self.replicas(e) for e in range(self.num_experts)]
        width = max(len(r) for r in per_expert)
        ranks = [[r for r, _ in reps] + [reps[0][0]] * (width - len(reps)) for reps in per_expert]
        slots = [[s for _, s in reps] + [reps[0][1]] * (width - len(reps)) for reps in per_expert]
        copies = torch.tensor([len(r) for r in per_expert], dtype=torch.int64)  # [E]
        return copies, torch.tensor(ranks, dtype=torch.int64), torch.tensor(slots, dtype=torch.int64)

    def to_tensor(self) -> torch.Tensor:
        """[N, L] int64, -1 padded: the form a block keeps as a buffer (saved in its state_dict)."""
        table = torch.full((self.world_size, self.slots_per_rank), -1, dtype=torch.int64)
        for rank, experts in enumerate(self.rank_experts):
            table[rank, :len(experts)] = torch.tensor(experts, dtype=torch.int64)
        return table

    @classmethod
    def from_tensor(cls, table: torch.Tensor, num_experts: int) -> "Placement":
        return cls(num_experts, tuple(tuple(int(e) for e in row if e >= 0) for row in table.tolist()))

    def to_dict(self) -> dict:
        return {"num_experts": self.num_experts, "rank_experts": [list(r) for r in self.rank_experts]}

    @classmethod
    def from_dict(cls, data: dict) -> "Placement":
        return cls(int(data["num_experts"]), tuple(tuple(int(e) for e in r) for r in data["rank_experts"]))


def _replica_counts(load: list[float], world_size: int, capacity: int) -> list[int]:
    """Spend the spare slots (N*capacity - E) on the expert with the largest per-replica load, one at a time,
    while that lowers the hottest per-replica load (a replica on every rank is the most an expert can use)."""
    copies = [1] * len(load)
    spare = world_size * capacity - len(load)
    while spare > 0:
        hottest = max(range(len(load)), key=lambda e: (load[e] / copies[e], -e))
        if copies[hottest] >= world_size or load[hottest] == 0:
            break
        copies[hottest] += 1
        spare -= 1
    return copies


def balanced_placement(expert_load: Sequence[float], world_size: int, max_experts_per_rank: Optional[int] = None,
                       replicate: bool = False) -> Placement:
    """Greedy LPT packing of experts (and replicas) onto `world_size` ranks of at most `max_experts_per_rank` slots.

    Without a limit a rank gets at most ceil(E/N) slots: the same memory per rank as the contiguous placement.
    """
    load = [float(v) for v in expert_load]
    num_experts = len(load)
    capacity = max_experts_per_rank if max_experts_per_rank is not None else math.ceil(num_experts / world_size)
    if capacity * world_size < num_experts:
        raise PlacementError(f"{num_experts} experts do not fit on {world_size} ranks of {capacity} expert slots each "
                             f"(memory limit): raise the limit or use more ranks")
    copies = _replica_counts(load, world_size, capacity) if replicate else [1] * num_experts
    items = sorted(((load[e] / copies[e], e) for e in range(num_experts) for _ in range(copies[e])),
                   key=lambda item: (-item[0], item[1]))  # heaviest first, ties by expert id: deterministic
    rank_load = [0.0] * world_size
    hosted: list[list[int]] = [[] for _ in range(world_size)]
    for share, expert in items:
        free = [r for r in range(world_size) if len(hosted[r]) < capacity and expert not in hosted[r]]
        if not free:
            raise PlacementError(f"no rank has a free slot for a copy of expert {expert} "
                                 f"({capacity} slots per rank, {world_size} ranks)")
        rank = min(free, key=lambda r: (rank_load[r], len(hosted[r]), r))
        hosted[rank].append(expert)
        rank_load[rank] += share
    return Placement(num_experts, tuple(tuple(sorted(experts)) for experts in hosted))


def max_experts_for_bytes(memory_limit_bytes: int, expert_bytes: int) -> int:
    """Expert slots that fit in a per-rank budget for expert weights."""
    return int(memory_limit_bytes // max(1, expert_bytes))
