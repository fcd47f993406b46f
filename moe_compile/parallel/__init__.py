"""Expert parallelism: experts sharded over ranks, tokens exchanged with all-to-all (issue 7, first increment).

`optimize(model, expert_parallel=N)` or `optimize(model, expert_parallel=ExpertParallelConfig(...))` inside a
torchrun job; see `apply.py` for the steps, `expert_parallel.py` for the block, `placement.py` for placement.
"""

from moe_compile.parallel.apply import ExpertParallelConfig, apply_expert_parallel
from moe_compile.parallel.calibrate import measure_expert_load
from moe_compile.parallel.distributed import DistributedInitError, init_distributed
from moe_compile.parallel.expert_parallel import OVERLAP_MIN_TOKENS, ExpertParallelMoEBlock
from moe_compile.parallel.gather import saved_placement, sharded_blocks
from moe_compile.parallel.placement import Placement, PlacementError, balanced_placement
from moe_compile.parallel.report import BlockPlacement, PlacementReport


def placement_report(model) -> PlacementReport:
    """The placement of every expert-parallel block of `model`, with rank loads before and after when known."""
    blocks = sharded_blocks(model)
    if not blocks:
        return PlacementReport(1, "none")
    report = PlacementReport(next(iter(blocks.values())).ep.size, "placed")
    for name, block in blocks.items():
        report.blocks.append(BlockPlacement(name, block.placement, getattr(block, "expert_load", None)))
    return report


__all__ = [
    "OVERLAP_MIN_TOKENS", "BlockPlacement", "DistributedInitError", "ExpertParallelConfig", "ExpertParallelMoEBlock",
    "Placement", "PlacementError", "PlacementReport", "apply_expert_parallel", "balanced_placement",
    "init_distributed", "measure_expert_load", "placement_report", "saved_placement",
]
