"""Routing statistics: tokens per expert per MoE block, measured by running the model on calibration inputs.

Each fused (or expert-parallel) block's input is routed with `reference.route` (the block's own router math) and
its expert choices counted; the model's output is discarded. The counts drive `balanced_placement`.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from moe_compile.fused_block import FusedMoEBlock
from moe_compile.kernels import reference


def _routed_blocks(model: nn.Module) -> dict[str, nn.Module]:
    from moe_compile.parallel.expert_parallel import ExpertParallelMoEBlock

    return {name: m for name, m in model.named_modules() if isinstance(m, (FusedMoEBlock, ExpertParallelMoEBlock))}


def block_expert_counts(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """[E] int64: how many of these tokens' top-k choices go to each expert of `block`."""
    s = block.spec
    x = hidden_states.reshape(-1, s.hidden_size)  # [T, H]
    logits = reference.router_logits(x, block.router_weight, block.router_bias)  # [T, E]
    _, ids = reference.route(logits, block.correction_bias, s.top_k, s.scoring, s.renormalize, s.n_group,
                             s.topk_group, s.routed_scaling)  # [T, K]
    return torch.bincount(ids.reshape(-1), minlength=s.num_experts).cpu()


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def measure_expert_load(model: nn.Module, inputs: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Run `model` on each of `inputs` (a tensor, a tuple of positional args or a dict of keyword args) and return
    {block name: tokens per expert [E] int64} for every fused block."""
    blocks = _routed_blocks(model)
    if not blocks:
        raise ValueError("measure_expert_load needs fused MoE blocks: run moe_compile.optimize on the model first")
    counts = {name: torch.zeros(b.spec.num_experts, dtype=torch.int64) for name, b in blocks.items()}
    handles = []
    for name, block in blocks.items():
        def hook(module, args, kwargs, name=name):
            hidden = args[0] if args else kwargs["hidden_states"]
            counts[name] += block_expert_counts(module, hidden)

        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for batch in inputs:
            _call(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return counts
