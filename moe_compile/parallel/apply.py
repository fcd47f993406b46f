"""`optimize(model, expert_parallel=N | ExpertParallelConfig(...))`: shard every fused block's experts over an
expert-parallel group, after fusion and before emit.

Steps: join torch.distributed (from the torchrun environment if nobody did), lower N to what the job has (with a
warning), measure or take routing statistics, place experts per block, swap each `FusedMoEBlock` for an
`ExpertParallelMoEBlock` (undoable like every other swap), verify on probe inputs (a collective: the group agrees
on the largest error, so every rank keeps or rolls back together), and record it in `model.moe_compile`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from moe_compile.fused_block import FusedMoEBlock, block_output_tensor, fused_blocks
from moe_compile.parallel.calibrate import measure_expert_load
from moe_compile.parallel.distributed import EPGroup, adjust_world_size, init_distributed, make_ep_group
from moe_compile.parallel.expert_parallel import OVERLAP_MIN_TOKENS, ExpertParallelMoEBlock
from moe_compile.parallel.placement import Placement, PlacementError, balanced_placement, max_experts_for_bytes
from moe_compile.parallel.report import BlockPlacement, PlacementReport
from moe_compile.report import OptimizeResult
from moe_compile.rewrite import VERIFY_RTOL, BlockSwap, _parent_and_attr

log = logging.getLogger("moe_compile")
STRATEGIES = ("contiguous", "balanced")
EMIT_OFF_REASON = ("expert parallelism: the all-to-all split sizes are host integers, so blocks sync once per call "
                   "and cannot be captured or compiled whole")


@dataclass(frozen=True)
class ExpertParallelConfig:
    size: int  # N: ranks sharing one copy of the experts (lowered with a warning when the job has fewer)
    placement: Union[str, Placement, dict] = "contiguous"  # contiguous | balanced | a Placement | {block: Placement}
    expert_load: Optional[Union[Sequence[float], dict]] = None  # tokens per expert, [E] or {block: [E]}
    calibration_inputs: Optional[Sequence[Any]] = None  # model inputs to measure expert_load on (summed over ranks)
    max_experts_per_rank: Optional[int] = None  # expert slots per rank and block (default: ceil(E/N))
    memory_limit_bytes: Optional[int] = None  # expert-weight bytes per rank and block; turned into slots
    replicate: bool = False  # spend spare slots on replicas of the hottest experts (balanced only)
    overlap: Union[bool, str] = "auto"  # dual-batch overlap: True, False or auto (from OVERLAP_MIN_TOKENS)
    overlap_min_tokens: int = OVERLAP_MIN_TOKENS
    version: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.placement, str) and self.placement not in STRATEGIES:
            raise ValueError(f"placement must be one of {STRATEGIES}, a Placement or {{block: Placement}}, "
                             f"got {self.placement!r}")
        if self.overlap not in (True, False, "auto"):
            raise ValueError(f"overlap must be True, False or 'auto', got {self.overlap!r}")

    @classmethod
    def coerce(cls, value: Any) -> "ExpertParallelConfig":
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(size=value)
        raise TypeError(f"expert_parallel must be a number of ranks or an ExpertParallelConfig, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "calibration_inputs"}
        if isinstance(self.placement, Placement):
            data["placement"] = self.placement.to_dict()
        elif isinstance(self.placement, dict):
            data["placement"] = {k: p.to_dict() for k, p in self.placement.items()}
        if isinstance(self.expert_load, dict):
            data["expert_load"] = {k: [float(v) for v in load] for k, load in self.expert_load.items()}
        elif self.expert_load is not None:
            data["expert_load"] = [float(v) for v in self.expert_load]
        return data


def _expert_bytes(block: FusedMoEBlock) -> int:
    tensors = [block.w13[0], block.w2[0]] + [b[0] for b in (block.b13, block.b2) if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def _capacity(config: ExpertParallelConfig, block: FusedMoEBlock) -> Optional[int]:
    limits = [config.max_experts_per_rank] if config.max_experts_per_rank is not None else []
    if config.memory_limit_bytes is not None:
        limits.append(max_experts_for_bytes(config.memory_limit_bytes, _expert_bytes(block)))
    return min(limits) if limits else None


def _expert_loads(model: nn.Module, config: ExpertParallelConfig, blocks: dict[str, FusedMoEBlock],
                  ep: EPGroup) -> dict[str, Optional[list[float]]]:
    """Per-block tokens per expert: the user's, or measured on the calibration inputs and summed over the group
    (every rank then computes the same placement)."""
    if config.expert_load is not None:
        given = config.expert_load
        return {name: [float(v) for v in (given[name] if isinstance(given, dict) else given)] for name in blocks}
    if config.calibration_inputs is None:
        return {name: None for name in blocks}
    measured = measure_expert_load(model, config.calibration_inputs)
    stacked = torch.stack([measured[name] for name in blocks]).to(next(iter(blocks.values())).w13.device)
    dist.all_reduce(stacked, group=ep.group)  # [blocks, E]
    return {name: [float(v) for v in row] for name, row in zip(blocks, stacked.cpu().tolist())}


def _placement(config: ExpertParallelConfig, name: str, block: FusedMoEBlock, load: Optional[list[float]],
               size: int) -> Placement:
    capacity = _capacity(config, block)
    if isinstance(config.placement, Placement):
        placement = config.placement
    elif isinstance(config.placement, dict):
        placement = config.placement[name]
    elif config.placement == "balanced":
        if load is None:
            raise ValueError("placement='balanced' needs routing statistics: pass expert_load or calibration_inputs")
        return balanced_placement(load, size, capacity, config.replicate)
    else:
        placement = Placement.contiguous(block.spec.num_experts, size)
    if capacity is not None and placement.slots_per_rank > capacity:
        raise PlacementError(f"block {name}: the {config.placement if isinstance(config.placement, str) else 'given'}"
                             f" placement puts {placement.slots_per_rank} experts on a rank, over the memory limit "
                             f"of {capacity}")
    return placement


def _record(result: OptimizeResult, config: ExpertParallelConfig, size: int, **extra: Any) -> None:
    result.expert_parallel = {"requested": config.size, "size": size, **extra}


def apply_expert_parallel(model: nn.Module, value: Any, device: torch.device, enabled: dict[str, bool],
                          result: OptimizeResult, swaps: list[BlockSwap], verify: bool = True) -> None:
    """Shard the fused blocks of `model` over an expert-parallel group; appends its swaps to `swaps`."""
    config = ExpertParallelConfig.coerce(value)
    if not init_distributed(device):
        _warn_and_record(result, config, "torch.distributed is not initialised and this is not a torchrun job")
        return
    size, warning = adjust_world_size(config.size, device)
    if warning:
        warnings.warn(warning, stacklevel=3)
    blocks = fused_blocks(model)
    if size == 1 or not blocks:
        _record(result, config, 1, reason="one rank" if size == 1 else "no fused MoE blocks")
        return
    packed = [name for name, block in blocks.items() if block.packed is not None]
    if packed:
        raise ValueError(f"expert parallelism shards dense expert weights; {packed[0]} holds FP8/2:4 packed "
                         f"experts ({blocks[packed[0]].packed.weight_format}), which this version cannot shard: "
                         f"use expert_parallel without fp8/sparsity_24 (e.g. profile 'balanced')")
    ep = make_ep_group(size, device)
    loads = _expert_loads(model, config, blocks, ep)
    report = PlacementReport(size, config.placement if isinstance(config.placement, str) else "given")
    new_swaps: dict[str, BlockSwap] = {}
    for name, fused in blocks.items():
        placement = _placement(config, name, fused, loads[name], size)
        block = ExpertParallelMoEBlock(fused, placement, ep, config.overlap, config.overlap_min_tokens)
        block.expert_load = loads[name]
        parent, attr = _parent_and_attr(model, name)
        new_swaps[name] = BlockSwap(parent, attr, fused, block)
        new_swaps[name].apply()
        swaps.append(new_swaps[name])
        report.blocks.append(BlockPlacement(name, placement, loads[name]))
    errors = _verify(new_swaps, ep) if verify else {}
    for feature in ("compile", "cuda_graphs"):
        if enabled.get(feature):
            enabled[feature] = result.features[feature] = False
            result.unavailable[feature] = EMIT_OFF_REASON
    _record(result, config, size, rank=ep.rank, backend=ep.backend, overlap=config.overlap,
            overlap_min_tokens=config.overlap_min_tokens, settings=config.to_dict(), block_errors=errors,
            placement=report.to_dict())
    result.passes.append(f"expert_parallel(N={size})")
    result.pass_counts["expert_parallel"] = len(new_swaps)
    log.info("%s", report)


def _warn_and_record(result: OptimizeResult, config: ExpertParallelConfig, why: str) -> None:
    message = (f"expert_parallel={config.size} needs a distributed job ({why}): run the script with torchrun "
               "--nproc-per-node N, or call torch.distributed.init_process_group first; running on one rank")
    warnings.warn(message, stacklevel=3)
    _record(result, config, 1, reason=why)


@torch.no_grad()
def _verify(swaps: dict[str, BlockSwap], ep: EPGroup, tokens: int = 64, seed: int = 3) -> dict[str, float]:
    """Relative L2 error of each expert-parallel block against its fused block on the same probes (the largest
    over the group). A block over the tolerance fails on every rank alike (the group agrees on the error), and
    `optimize` then puts the whole model back."""
    errors = {}
    for name, swap in swaps.items():
        fused, block = swap.original, swap.replacement
        generator = torch.Generator().manual_seed(seed + ep.rank)  # different tokens on each rank
        x = torch.randn(tokens, fused.spec.hidden_size, generator=generator).to(fused.w13.device, fused.w13.dtype)
        expected = block_output_tensor(fused(x)).float()
        actual = block_output_tensor(block(x)).float()
        error = ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).reshape(1)
        dist.all_reduce(error, op=dist.ReduceOp.MAX, group=ep.group)
        errors[name] = float(error)
    tolerance = VERIFY_RTOL.get(next(iter(swaps.values())).original.w13.dtype, 2e-2)
    worst = max(errors.values(), default=0.0)
    if worst > tolerance:
        raise RuntimeError(f"expert-parallel blocks miss the fused blocks by {worst:.2e} (tolerance {tolerance:.0e}) "
                           f"on probe inputs: {errors}; optimize puts the model back as it was")
    return errors
