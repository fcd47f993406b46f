"""annotate_moe: label each `fused_moe` node with its layer index and scalar routing parameters in `node.meta`.

Counts one rewrite per fused node, so `counters["moe_compile"]["annotate_moe"]` equals the number of MoE layers
the graph holds; later passes read `node.meta["moe"]`.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_compile.passes.base import GraphPass, PassResult
from moe_compile.passes.fused_nodes import argument, fused_moe_nodes

SCALARS = ("top_k", "scoring", "renormalize", "n_group", "topk_group", "routed_scaling", "weight_on_input",
           "activation")


def run(gm: torch.fx.GraphModule, options: dict[str, Any]) -> PassResult:
    count = 0
    for layer, node in enumerate(fused_moe_nodes(gm)):
        node.meta["moe"] = {"layer": layer, **{name: argument(node, name) for name in SCALARS}}
        count += 1
    return PassResult(gm, False, count)


ANNOTATE_MOE = GraphPass("annotate_moe", run, description="tag fused_moe nodes with layer index and routing")
