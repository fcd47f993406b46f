"""What the tests expect of a tiny model, read from its config, and how to run it (HF or user-written).

Shared by the in-process tests and the transformers 4.5x subprocess (`v4_parity_run.py`), so both check the same
things the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_compile.fused_block import FusedMoEBlock
from moe_compile.models import TINY_MODELS
from moe_compile.models.user_modules import UserLMConfig, greedy_generate

EXPERT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts")  # the config key each family uses for E
TOPK_KEYS = ("num_experts_per_tok",)  # `top_k` is not read from HF configs: in 4.5x it is the sampling default
PROMPT = torch.tensor([[3, 17, 42, 5, 99, 8, 61]])  # [1, S]: one sequence, HF generate needs no padding
NEW_TOKENS = 12


def is_hf(name: str) -> bool:
    return TINY_MODELS[name].builder is None


def config_experts_topk(config) -> tuple[int, int]:
    """(E, top-k) as the model's config states them."""
    if isinstance(config, UserLMConfig):
        return config.num_experts, config.top_k
    ffn = getattr(config, "ffn_config", None)  # DBRX keeps them in a sub-config
    if ffn is not None:
        return ffn.moe_num_experts, ffn.moe_top_k
    experts = next(getattr(config, k) for k in EXPERT_KEYS if isinstance(getattr(config, k, None), int))
    return experts, next(getattr(config, k) for k in TOPK_KEYS)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def generate(model: nn.Module, name: str) -> torch.Tensor:
    """NEW_TOKENS greedy tokens after PROMPT: HF `generate` for HF models, a plain loop for user-written ones."""
    if not is_hf(name):
        return greedy_generate(model, PROMPT, NEW_TOKENS)
    with torch.no_grad():
        return model.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0)


def count_fused(model: nn.Module) -> int:
    return sum(isinstance(m, FusedMoEBlock) for m in model.modules())
