"""Graph passes over `fused_moe` nodes (installed as `moe_compile.passes`). See README.md for the invariants."""

from moe_compile.passes.annotate_moe import ANNOTATE_MOE
from moe_compile.passes.base import GraphPass, PassManager, PassOrderError, PassResult
from moe_compile.passes.cleanup import CLEANUP
from moe_compile.passes.fused_nodes import fused_moe_nodes, is_fused_moe
from moe_compile.passes.select_backend import SELECT_BACKEND
from moe_compile.passes.specialize_phase import SPECIALIZE_PHASE
from moe_compile.passes.quantize_fp8 import quantize_fp8  # module-level weight passes (FP8, 2:4); see README
from moe_compile.passes.sparsify_24 import sparsify_24

DEFAULT_PIPELINE = [ANNOTATE_MOE, SELECT_BACKEND, SPECIALIZE_PHASE, CLEANUP]

__all__ = ["ANNOTATE_MOE", "CLEANUP", "DEFAULT_PIPELINE", "GraphPass", "PassManager", "PassOrderError",
           "PassResult", "SELECT_BACKEND", "SPECIALIZE_PHASE", "fused_moe_nodes", "is_fused_moe", "quantize_fp8",
           "sparsify_24"]
