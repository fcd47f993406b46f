"""capture: an optimized model (or one block or decoder layer) as a `torch.export.ExportedProgram`.

Non-strict export with the token count dynamic: every MoE layer that `optimize` fused becomes one
`torch.ops.moe_compile.fused_moe` node, its weights lifted to graph inputs, so the graph passes can see them.

    ep = capture(model, (input_ids,))          # HF causal LM: use_cache=False is added (see below)
    count_fused_nodes(ep)                      # == number of fused MoE layers

What works (transformers 5.24, torch 2.13, CPU): whole HF causal LMs (Qwen3-MoE, GPT-OSS, DeepSeek-V3 tiny models),
decoder layers and single fused blocks, each with the sequence length dynamic (one shared `tokens` dim, 1..2^16).
Limit: the KV cache. A `DynamicCache` in the output is not a pytree type, so an HF model is captured with
`use_cache=False` (added when its forward takes `use_cache` and the caller did not set it); the exported program
must then be called with `use_cache=False` too. The batch size stays static.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Union

import torch
from torch import nn

from moe_compile.passes.fused_nodes import is_fused_moe

MAX_TOKENS = 1 << 16  # upper bound of the dynamic token dim; export needs one, any realistic context fits


def _token_dim(value: Any) -> Optional[int]:
    """Which dim of an example input counts tokens: last for integer ids / masks, second to last for activations."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    if not value.is_floating_point():
        return value.dim() - 1  # input_ids / attention_mask / position_ids [B, S]
    return value.dim() - 2 if value.dim() >= 2 else None  # hidden states [T, H] or [B, S, H]


def _dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict[str, Any], tokens: torch.export.Dim) -> dict:
    """Specs keyed by forward's parameter names, as torch.export binds (args, kwargs) to them."""

    def spec(value):
        dim = _token_dim(value)
        return None if dim is None else {dim: tokens}

    signature = inspect.signature(module.forward)
    bound = signature.bind(*args, **kwargs).arguments
    shapes = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(spec(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: spec(v) for k, v in value.items()}
        else:
            shapes[name] = spec(value)
    return shapes


def _forward_takes(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def capture(
    model_or_block: nn.Module,
    example_args: Union[torch.Tensor, tuple, list, dict],
    dynamic_tokens: bool = True,
    dynamic_shapes: Any = None,
) -> torch.export.ExportedProgram:
    """Export `model_or_block` (non-strict) on `example_args` (a tensor, a tuple of positional args or a dict of
    keyword args). With `dynamic_tokens` the token dim of every tensor input is one shared dynamic dim;
    `dynamic_shapes` (in `torch.export.export`'s format for (args, kwargs)) overrides that guess."""
    if isinstance(example_args, dict):
        args, kwargs = (), dict(example_args)
    elif isinstance(example_args, torch.Tensor):
        args, kwargs = (example_args,), {}
    else:
        args, kwargs = tuple(example_args), {}
    if getattr(getattr(model_or_block, "config", None), "use_cache", None) is not None and "use_cache" not in kwargs \
            and _forward_takes(model_or_block, "use_cache"):
        kwargs["use_cache"] = False  # DynamicCache is not a pytree type: see the module docstring
    if dynamic_shapes is None and dynamic_tokens:
        tokens = torch.export.Dim("tokens", min=1, max=MAX_TOKENS)
        dynamic_shapes = _dynamic_shapes(model_or_block, args, kwargs, tokens)
    return torch.export.export(model_or_block, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


def count_fused_nodes(graph_module: Union[torch.fx.GraphModule, torch.export.ExportedProgram]) -> int:
    """Number of `fused_moe` call nodes in a graph (an ExportedProgram's or any FX GraphModule's), submodules
    included (higher-order ops such as `cond` keep their branches as submodules)."""
    if isinstance(graph_module, torch.export.ExportedProgram):
        graph_module = graph_module.graph_module
    total = 0
    for module in graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            total += sum(1 for node in module.graph.nodes if is_fused_moe(node))
    return total
