"""cleanup: dead-code elimination (e.g. router logits a caller never reads) and a lint of the graph."""

from __future__ import annotations

from typing import Any

import torch

from moe_compile.passes.base import GraphPass, PassResult


def run(gm: torch.fx.GraphModule, options: dict[str, Any]) -> PassResult:
    before = len(gm.graph.nodes)
    modified = gm.graph.eliminate_dead_code()
    return PassResult(gm, modified, before - len(gm.graph.nodes))


CLEANUP = GraphPass("cleanup", run, description="dead-code elimination and lint")
