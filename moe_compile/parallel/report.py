"""The placement report: load per rank before (contiguous) and after (chosen) placement, per block, as a table."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from moe_compile.parallel.placement import Placement


@dataclass
class BlockPlacement:
    name: str
    placement: Placement
    expert_load: Optional[list[float]] = None  # tokens per expert used to place (None: no statistics)

    def loads(self, placement: Placement) -> Optional[list[float]]:
        return None if self.expert_load is None else placement.rank_loads(self.expert_load)

    @property
    def contiguous(self) -> Placement:
        return Placement.contiguous(self.placement.num_experts, self.placement.world_size)

    def to_dict(self) -> dict[str, Any]:
        return {"placement": self.placement.to_dict(), "expert_load": self.expert_load,
                "rank_load_contiguous": self.loads(self.contiguous), "rank_load": self.loads(self.placement)}


def imbalance(loads: Optional[list[float]]) -> Optional[float]:
    """Max over mean rank load: 1.0 is perfect balance; what the slowest rank costs the whole group."""
    if not loads or sum(loads) == 0:
        return None
    return max(loads) / (sum(loads) / len(loads))


def _fmt(loads: Optional[list[float]]) -> str:
    if loads is None:
        return "-"
    ratio = imbalance(loads)
    return " ".join(f"{v:g}" for v in loads) + ("" if ratio is None else f"  (max/mean {ratio:.2f})")


@dataclass
class PlacementReport:
    world_size: int
    strategy: str
    blocks: list[BlockPlacement] = field(default_factory=list)

    def table(self) -> Table:
        table = Table(title=f"expert placement on {self.world_size} ranks ({self.strategy})")
        for column in ("block", "experts per rank", "load per rank: contiguous", "load per rank: placed"):
            table.add_column(column, overflow="fold")
        for b in self.blocks:
            hosted = " | ".join(",".join(map(str, r)) for r in b.placement.rank_experts)
            table.add_row(b.name, hosted, _fmt(b.loads(b.contiguous)), _fmt(b.loads(b.placement)))
        return table

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=160, force_terminal=False, color_system=None).print(self.table())
        return buffer.getvalue()

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "strategy": self.strategy,
                "blocks": {b.name: b.to_dict() for b in self.blocks}}
