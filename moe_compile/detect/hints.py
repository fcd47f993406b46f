"""Scalars a block's routing and activation probably use, read from the block, its router, its experts or the config.

These only order the prover's search (and fill the report before a proof); the prover accepts a spec only when
it reproduces the block numerically, so a wrong hint costs time, never correctness.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from moe_compile.detect.candidate import Hints, get_path

TOP_K_NAMES = ("top_k", "num_experts_per_tok", "moe_top_k", "num_activated_experts", "experts_per_token", "k")
# Read from modules only: on a transformers 4.5x config `top_k` is the sampling default (50), not the router's.
MODULE_ONLY_NAMES = ("top_k", "k")
RENORM_NAMES = ("norm_topk_prob", "renormalize", "normalize_expert_weights", "moe_normalize_expert_weights")
SCALING_NAMES = ("routed_scaling_factor", "route_scale", "routed_scaling")
GROUP_NAMES = ("n_group", "num_group", "num_expert_group")
TOPK_GROUP_NAMES = ("topk_group", "num_topk_group")
SCORING_NAMES = ("scoring_func", "score_func", "router_activation")
ACT_NAMES = ("hidden_act", "activation", "act_fn_name")
ALPHA_NAMES = ("alpha", "swiglu_alpha")
LIMIT_NAMES = ("limit", "swiglu_limit")

ACTIVATION_CLASSES = {  # class name of an activation module -> activation of the fused op
    "SiLU": "silu", "SiLUActivation": "silu", "GELU": "gelu", "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
    "GELUPytorchTanh": "gelu_tanh", "ReLU": "relu",
}
ACTIVATION_NAMES = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                    "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "relu": "relu"}


def _sources(block: nn.Module, router_path: str, expert_paths: list[str], config: Any) -> list[Any]:
    sources: list[Any] = [block, get_path(block, router_path)]
    sources += [get_path(block, p) for p in expert_paths]
    for obj in list(sources):
        cfg = getattr(obj, "config", None)
        if cfg is not None:
            sources.append(cfg)
    if config is not None:
        sources.append(config)
        ffn = getattr(config, "ffn_config", None)  # DBRX keeps its MoE scalars in a sub-config
        if ffn is not None:
            sources.append(ffn)
    return sources


def _first(sources: list[Any], names: tuple[str, ...], kinds: tuple[type, ...], valid=None) -> Optional[Any]:
    for source in sources:
        for name in names:
            if name in MODULE_ONLY_NAMES and not isinstance(source, nn.Module):
                continue
            value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
            if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds) and \
                    (valid is None or valid(value)):
                return value
    return None


def read_hints(block: nn.Module, router_path: str, expert_paths: list[str], config: Any = None,
               num_experts: Optional[int] = None) -> Hints:
    sources = _sources(block, router_path, expert_paths, config)
    hints = Hints()
    hints.top_k = _first(sources, TOP_K_NAMES, (int,), lambda k: 1 <= k <= (num_experts or k))
    renorm = _first(sources, RENORM_NAMES, (bool, int, float))
    hints.renormalize = None if renorm is None else bool(renorm)
    scoring = _first(sources, SCORING_NAMES, (str,))
    hints.scoring = scoring if scoring in ("softmax", "sigmoid") else None
    hints.n_group = int(_first(sources, GROUP_NAMES, (int,)) or 1)
    hints.topk_group = int(_first(sources, TOPK_GROUP_NAMES, (int,)) or 1)
    hints.routed_scaling = float(_first(sources, SCALING_NAMES, (int, float)) or 1.0)
    hints.alpha = float(_first(sources, ALPHA_NAMES, (int, float)) or 1.702)
    hints.limit = float(_first(sources, LIMIT_NAMES, (int, float)) or 7.0)
    hints.activation = _activation_hint(block, sources)
    experts = [get_path(block, p) for p in expert_paths]
    hints.custom_gate = any(_overrides_apply_gate(e) or _has_clamp_scalars(e) for e in experts)
    return hints


def _activation_hint(block: nn.Module, sources: list[Any]) -> Optional[str]:
    for module in block.modules():
        name = ACTIVATION_CLASSES.get(type(module).__name__)
        if name:
            return name
    for source in sources:
        ffn_act = source.get("ffn_act_fn") if isinstance(source, dict) else getattr(source, "ffn_act_fn", None)
        if isinstance(ffn_act, dict) and ffn_act.get("name") in ACTIVATION_NAMES:
            return ACTIVATION_NAMES[ffn_act["name"]]
    value = _first(sources, ACT_NAMES, (str,))
    return ACTIVATION_NAMES.get(value) if value else None


def _has_clamp_scalars(experts: nn.Module) -> bool:
    """Experts that carry both a gate slope and a clamp limit (GPT-OSS in 4.5x, which has no `_apply_gate`)."""
    return any(isinstance(getattr(experts, n, None), float) for n in ALPHA_NAMES) and \
        any(isinstance(getattr(experts, n, None), float) for n in LIMIT_NAMES)


def _overrides_apply_gate(experts: nn.Module) -> bool:
    method = getattr(type(experts), "_apply_gate", None)
    return method is not None and getattr(method, "__name__", "") == "_apply_gate" and \
        getattr(method, "__module__", "") != "transformers.integrations.moe"
