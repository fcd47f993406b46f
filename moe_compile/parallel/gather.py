"""Un-sharding for export: rebuild each expert-parallel block's full expert weights from all ranks.

`export` of a sharded model is a collective: every rank of the expert-parallel group calls it. Inside `unsharded`,
each `ExpertParallelMoEBlock` is swapped, one block at a time, for a `FusedMoEBlock` with all E experts (gathered
with `all_gather` over the group, moved to the CPU so a model that needs several GPUs is never whole on one), the
checkpoint is written from that view, and the shards come back on exit. The manifest then holds a plain fused model
plus the placement (in its `optimize.expert_parallel` entry), which `saved_placement` reads back so that a loaded
model can be sharded again the same way.

Dimension legend: E = experts, N = ranks, L = expert slots per rank, H = hidden, I = expert intermediate.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_compile.detect.candidate import CanonicalWeights
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.parallel.expert_parallel import ExpertParallelMoEBlock
from moe_compile.parallel.placement import Placement
from moe_compile.rewrite import BlockSwap, _parent_and_attr


def sharded_blocks(model: nn.Module) -> dict[str, ExpertParallelMoEBlock]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelMoEBlock)}


def _gather_stacked(local: Optional[Tensor], block: ExpertParallelMoEBlock) -> Optional[Tensor]:
    """This rank's slots [L_r, ...] -> every expert [E, ...] on the CPU (first replica of each), via all_gather."""
    if local is None:
        return None
    placement, slots = block.placement, block.placement.slots_per_rank
    padded = local.new_zeros((slots, *local.shape[1:]))  # [L, ...]: ranks may host fewer than L experts
    padded[: local.shape[0]] = local.detach()
    gathered = [torch.empty_like(padded) for _ in range(block.ep.size)]  # N x [L, ...]
    dist.all_gather(gathered, padded, group=block.ep.group)
    first = [placement.replicas(e)[0] for e in range(placement.num_experts)]  # (rank, slot) per expert
    return torch.stack([gathered[rank][slot].cpu() for rank, slot in first])  # [E, ...]


def gather_block(block: ExpertParallelMoEBlock) -> FusedMoEBlock:
    """The fused block `block` was sharded from, with all experts on the CPU (a collective over the EP group)."""
    weights = CanonicalWeights(*(_gather_stacked(t, block) for t in (block.w13, block.w2, block.b13, block.b2)))
    fused = FusedMoEBlock(block.spec, block.router_weight, block.router_bias, block.correction_bias, weights,
                          block.shared_expert, block.shared_expert_gate, block.source_class)
    return fused


@contextmanager
def unsharded(model: nn.Module) -> Iterator[int]:
    """Swap every expert-parallel block for its gathered fused block; yields this rank's index in the EP group
    (0 when the model is not sharded). Every rank of the group must enter, in the same order."""
    blocks = sharded_blocks(model)
    swaps = []
    try:
        for name, block in blocks.items():
            parent, attr = _parent_and_attr(model, name)
            swaps.append(BlockSwap(parent, attr, block, gather_block(block)))
            swaps[-1].apply()
        yield next(iter(blocks.values())).ep.rank if blocks else 0
    finally:
        for swap in reversed(swaps):
            swap.undo()


def agree(ok: bool, device: torch.device, group=None) -> bool:
    """True on every rank only if `ok` on every rank (so a failure on the writing rank fails them all alike)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item() > 0)


def saved_placement(model: nn.Module) -> dict[str, Placement]:
    """{block name: Placement} recorded when the model was exported sharded (empty if it never was); pass it as
    `ExpertParallelConfig(size, placement=saved_placement(model))` to shard a loaded model the same way."""
    record = getattr(getattr(model, "moe_compile", None), "expert_parallel", None) or {}
    blocks = (record.get("placement") or {}).get("blocks", {})
    return {name: Placement.from_dict(entry["placement"]) for name, entry in blocks.items()}


def export_sharded(write, model: nn.Module, out_dir, **options):
    """`write(model, out_dir, **options)` (checkpoint.export) on global rank 0 with every block gathered; a
    collective over the whole job, so every rank calls it and every rank raises if the write failed."""
    from pathlib import Path

    from moe_compile.errors import CheckpointError

    if options.get("format", "safetensors") != "safetensors":
        raise CheckpointError("an expert-parallel model exports as safetensors only; for ONNX, export the model "
                              "from one process before sharding it")
    device = next(iter(sharded_blocks(model).values())).router_weight.device
    error: Optional[BaseException] = None
    with unsharded(model):
        if dist.get_rank() == 0:
            try:
                write(model, out_dir, **options)
            except Exception as exc:  # noqa: BLE001  (re-raised below, after the other ranks learn of it)
                error = exc
        ok = agree(error is None, device)
    if error is not None:
        raise error
    if not ok:
        raise CheckpointError(f"export to {out_dir} failed on rank 0 (its error says why); nothing was written")
    return Path(out_dir).absolute()
