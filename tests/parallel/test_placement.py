"""Placement without any process group: LPT balance, memory limits, replicas, uneven shards, round trips."""

from __future__ import annotations

import pytest
import torch

from moe_compile.parallel import Placement, PlacementError, PlacementReport, balanced_placement
from moe_compile.parallel.report import BlockPlacement

SKEWED = [400, 300, 40, 30, 20, 10, 5, 5]  # two hot experts that contiguous placement puts on the same rank


def test_balanced_beats_contiguous_on_skewed_load():
    contiguous = max(Placement.contiguous(8, 2).rank_loads(SKEWED))
    balanced = max(balanced_placement(SKEWED, 2).rank_loads(SKEWED))
    assert balanced < contiguous
    assert contiguous == 770 and balanced == 420  # 400+10+5+5 vs 300+40+30+20 (LPT)


def test_memory_limit_is_respected_and_impossible_limits_fail():
    placement = balanced_placement(SKEWED, 4, max_experts_per_rank=2)
    assert placement.slots_per_rank <= 2
    with pytest.raises(PlacementError, match="do not fit"):
        balanced_placement(SKEWED, 2, max_experts_per_rank=3)  # 6 slots for 8 experts


def test_replicas_split_the_hottest_expert():
    one_hot = [1000, 10, 10, 10, 10, 10, 10, 10]
    plain = balanced_placement(one_hot, 4)
    replicated = balanced_placement(one_hot, 4, max_experts_per_rank=3, replicate=True)
    assert len(replicated.replicas(0)) > 1 and replicated.slots_per_rank <= 3
    assert max(replicated.rank_loads(one_hot)) < max(plain.rank_loads(one_hot))
    copies, ranks, slots = replicated.lookup_tables()  # [E], [E, R], [E, R]
    for expert in range(8):
        for c in range(int(copies[expert])):
            assert replicated.rank_experts[int(ranks[expert, c])][int(slots[expert, c])] == expert


def test_uneven_shards_and_round_trips():
    placement = Placement.contiguous(8, 3)  # E not divisible by N: 3, 3, 2
    assert [len(r) for r in placement.rank_experts] == [3, 3, 2]
    assert Placement.from_tensor(placement.to_tensor(), 8) == placement
    assert Placement.from_dict(placement.to_dict()) == placement


def test_malformed_placements_are_rejected():
    with pytest.raises(PlacementError, match="missing"):
        Placement(4, ((0, 1), (2,)))
    with pytest.raises(PlacementError, match="twice"):
        Placement(2, ((0, 0), (1,)))


def test_report_shows_load_before_and_after():
    report = PlacementReport(2, "balanced", [BlockPlacement("layers.0.mlp", balanced_placement(SKEWED, 2), SKEWED)])
    text = str(report)
    assert "770" in text and "420" in text and "layers.0.mlp" in text
    assert report.to_dict()["blocks"]["layers.0.mlp"]["rank_load"] == [420.0, 390.0]
    assert torch.equal(balanced_placement(SKEWED, 2).to_tensor(), balanced_placement(SKEWED, 2).to_tensor())
