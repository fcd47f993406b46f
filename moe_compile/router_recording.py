"""Keep transformers' router-logit recording working after a block is fused.

transformers 5 collects `router_logits` (for `output_router_logits=True` and the load-balancing aux loss) with
forward hooks on the router modules, active only while a forward asks for them. A fused block keeps the original
router module as a child, sharing its weight, and calls it only while such a collection is active: the hooks then
record exactly what they recorded before, and the aux loss trains the same router weight. The child is hidden from
`state_dict` (its weight is the block's own `router_weight`), so checkpoints are unchanged.
"""

from __future__ import annotations

import functools

from torch import nn

ROUTER_CHILD = "router_module"


@functools.cache
def _collector():
    """transformers' output collector (looked up once: this runs in every fused block's forward), or None."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # transformers 4.5x (blocks return logits themselves) or no transformers
        return None
    return _active_collector


def router_outputs_requested() -> bool:
    """True while a transformers forward collects router logits (reads transformers' own collector, if any)."""
    collector = _collector()
    collected = None if collector is None else collector.get()
    return bool(collected) and "router_logits" in collected


def _drop_router_child_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(f"{prefix}{ROUTER_CHILD}.")]:
        del state_dict[key]


def _ignore_missing_router_child_keys(module: nn.Module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if f"{ROUTER_CHILD}." not in k]


def attach_router_module(block: nn.Module, router: nn.Module) -> None:
    """Register `router` as `block.router_module`, left out of `state_dict` and `load_state_dict`'s missing keys."""
    block.add_module(ROUTER_CHILD, router)
    block._register_state_dict_hook(_drop_router_child_keys)
    block.register_load_state_dict_post_hook(_ignore_missing_router_child_keys)
