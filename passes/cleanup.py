"""cleanup: dead-code elimination (e.g. router logits a caller never reads) on graphs that hold `fused_moe` nodes.

torch.fx's own purity test treats every `call_method` as pure, but Dynamo graphs are torch-level and keep in-place
methods (`kv[..., :8].copy_(k_nope)` in DeepSeek-V3 attention): plain `eliminate_dead_code` drops those writes and
changes the model's output. So a node is removed only if it is provably free of side effects (see `_is_impure`).
Graphs without `fused_moe` nodes are left alone (the backend is then plain Inductor).
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from moe_compile.passes.base import GraphPass, PassResult
from moe_compile.passes.fused_nodes import fused_moe_nodes

# Python operators that mutate their first argument in place (Dynamo emits them for `x += y`, `x[i] = v`).
_MUTATING_OPERATORS = {operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul,
                       operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                       operator.ior, operator.ixor, operator.ilshift, operator.irshift, operator.imatmul}


def _changes_functorch_state(target: Any, name: str) -> bool:
    """vmap / grad transforms enter and leave their levels through calls whose results nobody uses
    (`_vmap_increment_nesting`, `_vmap_decrement_nesting`, ...): removing one unbalances the interpreter's stack."""
    module = getattr(target, "__module__", None) or ""
    return module.startswith(("torch._C._functorch", "torch._functorch")) or name.startswith(("_vmap_", "_grad_"))


def _is_impure(node: torch.fx.Node) -> bool:
    """Conservative: anything that may write to a tensor, or whose effects we cannot see, is kept."""
    if node.op in ("placeholder", "output", "call_module"):  # a module may mutate its own state
        return True
    if node.op == "call_method":  # `x.copy_(y)`, `x.add_(y)`, `x.__setitem__(i, v)`
        return node.target.endswith("_")
    if node.op == "call_function":
        if node.is_impure() or node.target in _MUTATING_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        if _changes_functorch_state(node.target, name):
            return True
        in_place = name.endswith("_") and not name.endswith("__") and not name.startswith("_")  # torch.relu_
        return in_place or bool(node.kwargs.get("inplace")) or "out" in node.kwargs
    return False


def run(gm: torch.fx.GraphModule, options: dict[str, Any]) -> PassResult:
    if next(fused_moe_nodes(gm), None) is None:
        return PassResult(gm, False, 0)
    before = len(gm.graph.nodes)
    modified = gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    return PassResult(gm, modified, before - len(gm.graph.nodes))


CLEANUP = GraphPass("cleanup", run, description="dead-code elimination of side-effect-free nodes, and lint")
