"""Graph passes over `fused_moe` nodes (installed as `moe_compile.passes`). See README.md for the invariants."""

from moe_compile.passes.annotate_moe import ANNOTATE_MOE
from moe_compile.passes.base import GraphPass, PassManager, PassOrderError, PassResult
from moe_compile.passes.cleanup import CLEANUP
from moe_compile.passes.fused_nodes import fused_moe_nodes, is_fused_moe
from moe_compile.passes.select_backend import SELECT_BACKEND
from moe_compile.passes.specialize_phase import SPECIALIZE_PHASE
from moe_compile.passes.quantize_fp8 import quantize_fp8  # module-level weight passes (FP8, 2:4); see README
from moe_compile.passes.sparsify_24 import sparsify_24
from moe_compile.passes.pack_weights_graph import (QUANTIZE_FP8_GRAPH, SPARSIFY_24_GRAPH, WEIGHT_PASSES,
                                                   scales_by_layer)

DEFAULT_PIPELINE = [ANNOTATE_MOE, SELECT_BACKEND, SPECIALIZE_PHASE, CLEANUP]


def pipeline(options: dict) -> list[GraphPass]:
    """DEFAULT_PIPELINE, plus the weight passes (2:4, then FP8) before `cleanup` when option `sparsity_24` or `fp8`
    asks for them; they come after the backend passes so each packed node keeps the node's backend choice."""
    if not (options.get("fp8") or options.get("sparsity_24")):
        return list(DEFAULT_PIPELINE)
    return DEFAULT_PIPELINE[:-1] + WEIGHT_PASSES + [CLEANUP]


__all__ = ["ANNOTATE_MOE", "CLEANUP", "DEFAULT_PIPELINE", "GraphPass", "PassManager", "PassOrderError",
           "PassResult", "QUANTIZE_FP8_GRAPH", "SELECT_BACKEND", "SPARSIFY_24_GRAPH", "SPECIALIZE_PHASE",
           "WEIGHT_PASSES", "fused_moe_nodes", "is_fused_moe", "pipeline", "quantize_fp8", "scales_by_layer",
           "sparsify_24"]
