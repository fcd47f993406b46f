"""specialize_phase: give decode and prefill `fused_moe` nodes the kernel backend that suits each phase.

The library form of prefill/decode disaggregation. Each node's token count T is read from the graph's fake tensor
metadata (`meta["val"]` on export/AOT graphs, `meta["example_value"]` on Dynamo graphs):
  * decode — a static T with T * top_k <= `decode_max_rows` routed rows: memory-bound on the active experts'
    weights, so the persistent decode kernel (`cuda`) where it is registered, else `triton`;
  * prefill — a larger static T, or a symbolic T (a dynamic graph serves every prompt length): compute-bound,
    so `triton` (grouped tensor-core GEMMs over tokens sorted by expert).
Only CUDA nodes whose `backend` is still "auto" are pinned: a backend the user pinned (option `backend`,
`select_backend`) wins, and CPU nodes keep the reference. Backends come from `available_backends()` at pass time
(option `available_backends` narrows or names them). Enabled by option `specialize_phase=True` (the profile
feature of that name sets it for the compiled decode graphs).

Counts the nodes it pinned; `counters["moe_compile"]["specialize_phase.<phase>.<backend>"]` says how many nodes
got which, and each node's `meta["moe"]` gains `phase`, `tokens` and `phase_backend`.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from moe_compile.counters import counters
from moe_compile.passes.base import GraphPass, PassResult
from moe_compile.passes.fused_nodes import argument, fused_moe_nodes, set_argument

log = logging.getLogger("moe_compile")

NAME = "specialize_phase"
# Routed rows (T * top_k) up to which a step is decode: the `cuda` persistent kernel's limit (it hands larger
# cases to triton itself), and the end of the triton decode tile regime for the usual E.
DECODE_MAX_ROWS = 64
# best first, per phase; only backends registered at pass time are chosen
PHASE_PREFERENCE = {"decode": ("cuda", "triton"), "prefill": ("triton",)}


def token_count(node: torch.fx.Node) -> Optional[object]:
    """T of the node's `x` ([T, H]): an int, a SymInt for a dynamic graph, or None without fake metadata."""
    x = argument(node, "x")
    value = x.meta.get("val", x.meta.get("example_value")) if isinstance(x, torch.fx.Node) else None
    return value.shape[0] if isinstance(value, torch.Tensor) else None


def _device_type(node: torch.fx.Node) -> Optional[str]:
    x = argument(node, "x")
    value = x.meta.get("val", x.meta.get("example_value")) if isinstance(x, torch.fx.Node) else None
    return value.device.type if isinstance(value, torch.Tensor) else None


def phase_of(tokens: object, top_k: int, decode_max_rows: int = DECODE_MAX_ROWS) -> str:
    """"decode" for a static token count with tokens * top_k <= decode_max_rows, else "prefill"."""
    if isinstance(tokens, int) and tokens * top_k <= decode_max_rows:
        return "decode"
    return "prefill"  # larger, or symbolic: a dynamic graph runs prompts of any length


def phase_backend(phase: str, available: list[str]) -> Optional[str]:
    return next((name for name in PHASE_PREFERENCE[phase] if name in available), None)


def _available(options: dict[str, Any]) -> list[str]:
    if options.get("available_backends") is not None:
        return list(options["available_backends"])
    from moe_compile.kernels import available_backends

    return available_backends()


def run(gm: torch.fx.GraphModule, options: dict[str, Any]) -> PassResult:
    if not options.get(NAME, False):
        return PassResult(gm, False, 0)
    available = _available(options)
    limit = int(options.get("decode_max_rows", DECODE_MAX_ROWS))
    pinned: dict[str, int] = {}
    for node in fused_moe_nodes(gm):
        tokens = token_count(node)
        if tokens is None or _device_type(node) != "cuda" or argument(node, "backend") != "auto":
            continue  # no metadata, a CPU graph (reference only), or a backend someone pinned already
        phase = phase_of(tokens, argument(node, "top_k"), limit)
        backend = phase_backend(phase, available)
        if backend is None:
            continue
        set_argument(node, "backend", backend)
        node.meta.setdefault("moe", {}).update(phase=phase, tokens=tokens, phase_backend=backend)
        key = f"{phase}.{backend}"
        pinned[key] = pinned.get(key, 0) + 1
    for key, count in pinned.items():
        counters["moe_compile"][f"{NAME}.{key}"] += count
    if pinned:
        log.info("specialize_phase: fused_moe nodes pinned per phase.backend: %s", dict(sorted(pinned.items())))
    total = sum(pinned.values())
    return PassResult(gm, total > 0, total)


SPECIALIZE_PHASE = GraphPass(NAME, run, requires=("annotate_moe", "select_backend"),
                             description="pin decode nodes to the decode kernel, prefill nodes to grouped GEMM")
