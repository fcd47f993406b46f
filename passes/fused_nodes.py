"""Helpers shared by passes: finding `fused_moe` nodes in a graph, and reading their arguments by name."""

from __future__ import annotations

from typing import Any, Iterator

import torch

import moe_compile.kernels  # noqa: F401  (registers the op)

FUSED_MOE = torch.ops.moe_compile.fused_moe
_SCHEMA_ARGS = [a.name for a in FUSED_MOE.default._schema.arguments]


def is_fused_moe(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (FUSED_MOE, FUSED_MOE.default)


def fused_moe_nodes(gm: torch.fx.GraphModule) -> Iterator[torch.fx.Node]:
    return (n for n in gm.graph.nodes if is_fused_moe(n))


def argument(node: torch.fx.Node, name: str) -> Any:
    index = _SCHEMA_ARGS.index(name)
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, FUSED_MOE.default._schema.arguments[index].default_value)


def set_argument(node: torch.fx.Node, name: str, value: Any) -> None:
    index = _SCHEMA_ARGS.index(name)
    if index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}
