"""select_backend: set the kernel backend argument of every `fused_moe` node (option `backend`).

With `backend="auto"` (the default) nodes are left alone and the op picks per device and token count at run time.
Counts the nodes it changed.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_compile.passes.base import GraphPass, PassResult
from moe_compile.passes.fused_nodes import argument, fused_moe_nodes, set_argument


def run(gm: torch.fx.GraphModule, options: dict[str, Any]) -> PassResult:
    backend = options.get("backend", "auto")
    if backend == "auto":
        return PassResult(gm, False, 0)
    count = 0
    for node in fused_moe_nodes(gm):
        if argument(node, "backend") != backend:
            set_argument(node, "backend", backend)
            count += 1
    return PassResult(gm, count > 0, count)


SELECT_BACKEND = GraphPass("select_backend", run, requires=("annotate_moe",),
                           description="pin the fused_moe kernel backend")
