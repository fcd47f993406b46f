"""Tiny models of the major MoE families, from transformers configs (no hub access).

Sizes keep H, I, 2I and E pairwise distinct so that no layout reading is ambiguous by shape. Router weights are
redrawn with std 0.5 (and zero-initialised biases with small noise) so routing is decisive: with the default
init (std 0.02) routing is nearly uniform and bugs in renorm, biases or interleaving would go unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class TinyModel:
    model_type: str
    config: dict[str, Any]
    description: str
    moe_layers: int  # MoE blocks the model has (dense layers excluded)
    common: dict[str, Any] = field(default_factory=lambda: dict(COMMON))


TINY_MODELS: dict[str, TinyModel] = {
    "tiny-qwen3-moe": TinyModel("qwen3_moe", dict(intermediate_size=64, moe_intermediate_size=24, num_experts=8,
                                                  num_experts_per_tok=2, norm_topk_prob=True, head_dim=8),
                                "Qwen3-MoE: softmax top-k, renormalised", 2),
    "tiny-qwen2-moe": TinyModel("qwen2_moe", dict(intermediate_size=64, moe_intermediate_size=24, num_experts=8,
                                                  num_experts_per_tok=2, shared_expert_intermediate_size=40,
                                                  head_dim=8),
                                "Qwen2-MoE: sigmoid-gated shared expert", 2),
    "tiny-mixtral": TinyModel("mixtral", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
                              "Mixtral: 4 experts, top-2, renormalised", 2),
    "tiny-olmoe": TinyModel("olmoe", dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2),
                            "OLMoE: softmax top-k, no renorm", 2),
    "tiny-deepseek-v3": TinyModel("deepseek_v3", dict(
        intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1, n_group=2,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, routed_scaling_factor=2.5, kv_lora_rank=16,
        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
        "DeepSeek-V3: sigmoid, group-limited top-k, correction bias, scaling, shared expert, dense first layer", 1),
    "tiny-gpt-oss": TinyModel("gpt_oss", dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                              head_dim=8, layer_types=["sliding_attention", "full_attention"],
                                              sliding_window=16),
                              "GPT-OSS: transposed interleaved biased experts, clamped SwiGLU, router bias", 2),
}


def tiny_model_names() -> list[str]:
    return sorted(TINY_MODELS)


def tiny_config(name: str):
    from transformers import AutoConfig

    spec = TINY_MODELS[name]
    return AutoConfig.for_model(spec.model_type, **{**spec.common, **spec.config})


def build_tiny_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                     experts_implementation: Optional[str] = "eager") -> nn.Module:
    """The tiny model `name` with seeded random weights and decisive routing, in eval mode."""
    from transformers import AutoModelForCausalLM

    if name not in TINY_MODELS:
        raise KeyError(f"unknown tiny model {name!r}; built-in: {', '.join(tiny_model_names())}")
    torch.manual_seed(seed)
    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    model = AutoModelForCausalLM.from_config(tiny_config(name), **kwargs)
    make_routing_decisive(model, seed)
    return model.to(dtype).eval()


def make_routing_decisive(model: nn.Module, seed: int = 0) -> None:
    """Redraw router weights with std 0.5 and all-zero MoE biases with small noise (see module docstring)."""
    from moe_compile.detect import find_candidates, get_path

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for candidate in find_candidates(model, getattr(model, "config", None)):
            router = get_path(candidate.module, candidate.router.path)
            weight = getattr(router, candidate.router.weight_name)
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
            for tensor in list(candidate.module.parameters()) + list(candidate.module.buffers()):
                if tensor.is_floating_point() and tensor.numel() and not tensor.any():
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
