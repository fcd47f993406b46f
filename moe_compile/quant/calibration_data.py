"""Calibration data for the weight passes: the hidden states each fused block receives over calibration tokens,
and their routing (shared by ModelOpt's FP8 calibration and SparseGPT's 2:4 pruning).

Dimension legend: T = tokens, E = experts, H = hidden.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_compile.kernels import reference

MIN_EXPERT_TOKENS = 8  # every expert is fed at least this many calibration tokens (fewer if T is smaller)
MAX_BLOCK_TOKENS = 8192  # recorded input rows kept per block



@torch.no_grad()
def record_block_inputs(model: nn.Module, ids: Tensor, blocks: dict[str, nn.Module],
                        max_tokens: int = MAX_BLOCK_TOKENS) -> dict[str, Tensor]:
    """The hidden states x [T, H] each block receives over the calibration windows (the gate's windows), at most
    `max_tokens` rows per block."""
    from moe_compile.quality.eval import perplexity

    seen: dict[str, list[Tensor]] = {name: [] for name in blocks}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            kept = sum(t.shape[0] for t in seen[name])
            if kept < max_tokens:
                seen[name].append(args[0].detach().reshape(-1, module.spec.hidden_size)[: max_tokens - kept])
        return record

    handles = [block.register_forward_pre_hook(hook(name)) for name, block in blocks.items()]
    try:
        perplexity(model, text=ids)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(rows) for name, rows in seen.items() if rows}


def route_for_calibration(block: nn.Module, x: Tensor, min_tokens: int = MIN_EXPERT_TOKENS
                          ) -> tuple[list[tuple[int, Tensor, Tensor]], list[int], list[int]]:
    """Route x [T, H] with the block's router; experts with fewer than `min_tokens` tokens also get the tokens
    their router score ranks highest. Returns (groups (expert, rows, weights), routed tokens per expert,
    forced experts)."""
    s = block.spec
    logits = reference.router_logits(x, block.router_weight, block.router_bias)  # [T, E]
    weights, ids = reference.route(logits, block.correction_bias, s.top_k, s.scoring, s.renormalize, s.n_group,
                                   s.topk_group, s.routed_scaling)  # [T, K] each
    routed = torch.zeros(x.shape[0], s.num_experts, dtype=torch.bool, device=x.device).scatter_(1, ids, True)
    dense_weights = torch.zeros_like(logits, dtype=torch.float32).scatter_(1, ids, weights)  # [T, E]
    counts = routed.sum(0).tolist()  # [E]
    want = min(min_tokens, x.shape[0])
    forced = [e for e, n in enumerate(counts) if n < want]
    for e in forced:  # calibration only: the tokens this expert's router score ranks highest
        score = logits[:, e].float().masked_fill(routed[:, e], float("-inf"))
        extra = score.topk(want - counts[e]).indices
        routed[extra, e] = True
        dense_weights[extra, e] = 1.0 / s.top_k
    groups = []
    for e in range(s.num_experts):
        rows = routed[:, e].nonzero().squeeze(1)  # [n]
        if rows.numel():
            groups.append((e, rows, dense_weights[rows, e]))
    return groups, counts, forced
