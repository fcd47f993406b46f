"""Tiny models of the major MoE families, from transformers configs (no hub access).

Sizes keep H, I, 2I and E pairwise distinct so that no layout reading is ambiguous by shape. Router weights are
redrawn with std 0.5 (and zero-initialised biases with small noise) so routing is decisive: with the default
init (std 0.02) routing is nearly uniform and bugs in renorm, biases or interleaving would go unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
DBRX_COMMON = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4)  # DBRX names the common keys its own way
USER = "user"  # model_type of the models built by `user_modules.build_user_lm` (not transformers)


@dataclass(frozen=True)
class TinyModel:
    model_type: str
    config: dict[str, Any]
    description: str
    moe_layers: int  # MoE blocks the model has (dense layers excluded)
    common: dict[str, Any] = field(default_factory=lambda: dict(COMMON))
    builder: Optional[Callable[..., nn.Module]] = None  # config -> model, for models that are not transformers'
    skip_reason: Optional[str] = None  # why its MoE blocks are expected to stay unfused (None: all fuse)


def _hf(model_type: str, description: str, moe_layers: int, skip_reason: Optional[str] = None, **config):
    return TinyModel(model_type, config, description, moe_layers, skip_reason=skip_reason)


def _user(description: str, moe_layers: int, **config):
    from moe_compile.models.user_modules import build_user_lm

    return TinyModel(USER, config, description, moe_layers, common={}, builder=build_user_lm)


QWEN3 = dict(intermediate_size=64, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=True, head_dim=8)
SHARED = dict(shared_expert_intermediate_size=40)
DEEPSEEK_MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                    num_key_value_heads=4)
QWEN3_NEXT_LINEAR = dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
                         linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                         linear_conv_kernel_dim=2)
# transformers 4.5x only: its Jamba refuses to run without the CUDA mamba kernels unless told (5.x warns it is unused)
V4_CONFIG = {"jamba": dict(use_mamba_kernels=False)}
PHIMOE_REASON = "sparsemixer"  # the word the skip reason must contain

TINY_MODELS: dict[str, TinyModel] = {
    "tiny-qwen3-moe": _hf("qwen3_moe", "Qwen3-MoE: softmax top-k, renormalised", 2, **QWEN3),
    "tiny-qwen3-moe-mixed": _hf("qwen3_moe", "Qwen3-MoE with a dense layer (mlp_only_layers)", 2,
                                **{**QWEN3, "num_hidden_layers": 3, "mlp_only_layers": [1]}),
    "tiny-qwen2-moe": _hf("qwen2_moe", "Qwen2-MoE: sigmoid-gated shared expert", 2,
                          **{**QWEN3, **SHARED, "norm_topk_prob": False}),
    "tiny-qwen3-next": _hf("qwen3_next", "Qwen3-Next: gated shared expert, linear attention (slow pure torch)", 2,
                           **QWEN3, **SHARED, **QWEN3_NEXT_LINEAR),
    "tiny-mixtral": _hf("mixtral", "Mixtral: 4 experts, top-2, renormalised", 2,
                        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "tiny-olmoe": _hf("olmoe", "OLMoE: softmax top-k, no renorm", 2,
                      intermediate_size=48, num_experts=8, num_experts_per_tok=2, eos_token_id=None),
    "tiny-deepseek-v3": _hf(
        "deepseek_v3", "DeepSeek-V3: sigmoid, group-limited top-k, correction bias, scaling, shared expert, "
        "dense first layer", 1, intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8,
        n_shared_experts=1, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, **DEEPSEEK_MLA),
    "tiny-glm4-moe": _hf("glm4_moe", "GLM4-MoE: DeepSeek-style routing, shared expert, dense first layer", 2,
                         intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                         n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, head_dim=8,
                         num_hidden_layers=3),
    "tiny-gpt-oss": _hf("gpt_oss", "GPT-OSS: transposed interleaved biased experts, clamped SwiGLU, router bias", 2,
                        intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                        layer_types=["sliding_attention", "full_attention"], sliding_window=16),
    "tiny-llama4": _hf("llama4_text", "Llama4: sigmoid weight on the expert input, flat output, shared expert", 2,
                       intermediate_size=24, intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=1,
                       head_dim=8, interleave_moe_layer_step=1),
    "tiny-granite-moe": _hf("granitemoe", "Granite-MoE: top-k then softmax", 2,
                            intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "tiny-jamba": _hf("jamba", "Jamba: softmax top-k, no renorm, mamba layers (slow pure torch)", 2,
                      intermediate_size=48, num_experts=4, num_experts_per_tok=2, expert_layer_period=1,
                      expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8),
    "tiny-dbrx": TinyModel("dbrx", dict(attn_config={"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8.0},
                                        ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2}),
                           "DBRX: w1/v1/w2 as [E*I, H], L1-renormalised", 2, common=dict(DBRX_COMMON)),
    "tiny-phimoe": _hf("phimoe", "PhiMoE: sparsemixer routing, skipped with the reason", 2,
                       skip_reason=PHIMOE_REASON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "tiny-user-gpt-fast": _user("user-written gpt-fast MoE: 3-D w1/w2/w3 gathered with einsum, flat output", 2,
                                feed_forward="gpt_fast"),
    "tiny-user-modulelist": _user("user-written ModuleList of gated MLPs named inp/gatey/outp", 2,
                                  feed_forward="modulelist", num_experts=4, intermediate_size=20),
    "tiny-user-dense": _user("user-written dense LM: no MoE block, nothing to fuse", 0, feed_forward="dense"),
}


def tiny_model_names() -> list[str]:
    return sorted(TINY_MODELS)


def tiny_config(name: str, **overrides: Any):
    """The config of tiny model `name` (a transformers config, or a `UserLMConfig` for user-written models)."""
    spec = TINY_MODELS[name]
    values = {**spec.common, **spec.config, **overrides}
    if spec.builder is not None:
        from moe_compile.models.user_modules import UserLMConfig

        return UserLMConfig(**values)
    import transformers
    from transformers import AutoConfig

    if _major(transformers.__version__) < 5:
        values = {**V4_CONFIG.get(spec.model_type, {}), **values}
    return AutoConfig.for_model(spec.model_type, **values)


def _major(version: str) -> int:
    return int(version.split(".")[0])


def build_tiny_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                     experts_implementation: Optional[str] = "eager", **overrides: Any) -> nn.Module:
    """The tiny model `name` with seeded random weights and decisive routing, in eval mode.

    `overrides` change config values (e.g. `decoder_sparse_step=2`); `experts_implementation` applies to
    transformers 5 models only (4.5x has per-expert loops and no such switch).
    """
    if name not in TINY_MODELS:
        raise KeyError(f"unknown tiny model {name!r}; built-in: {', '.join(tiny_model_names())}")
    spec = TINY_MODELS[name]
    torch.manual_seed(seed)
    if spec.builder is not None:
        model = spec.builder(**{**spec.common, **spec.config, **overrides})
    else:
        model = _build_hf(tiny_config(name, **overrides), experts_implementation)
    make_routing_decisive(model, seed)
    return model.to(dtype).eval()


def _build_hf(config, experts_implementation: Optional[str]) -> nn.Module:
    import transformers
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if experts_implementation and _major(transformers.__version__) >= 5:
        kwargs["experts_implementation"] = experts_implementation
    return AutoModelForCausalLM.from_config(config, **kwargs)


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
