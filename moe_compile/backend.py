"""The `torch.compile` backend named `moe_compile`: our graph passes over the captured FX graph, then Inductor.

    torch.compile(model, backend="moe_compile")                         # passes, then Inductor
    torch.compile(model, backend="moe_compile", options={"inner": "eager", "backend": "reference"})

Options: `inner` ("inductor" default, or "eager" to run the passed graph as is), `backend` (pin the fused_moe
kernel, see passes/select_backend.py), `specialize_phase` (True: decode nodes get the decode kernel, prefill nodes
grouped GEMM; `decode_max_rows`, `available_backends` tune it, see passes/specialize_phase.py), `sparsity_24` /
`fp8` (True: the expert weights of each fused_moe node 2:4-compressed / FP8-quantized once at compile time, the
graph then runs fused_moe_packed on frozen packed copies; `fp8_scales` = {layer: (w13_scale, w2_scale)} gives
calibrated scales, see passes/pack_weights_graph.py), `dump_dir`
(per-pass graph dumps, one `graph_NNN/` folder per captured graph; `MOE_COMPILE_DUMP=DIR` does the same),
`cudagraphs` (Inductor's CUDA graphs). Any other key must be an Inductor config name (`max_autotune`,
`triton.cudagraphs`, ...) and is passed to Inductor as a config patch; an unknown key is an error (it used to be
ignored silently). Counters: see moe_compile.counters.
The model should have been through `moe_compile.optimize` first, so its MoE blocks are `fused_moe` nodes; on
other graphs the passes find nothing and the backend is plain Inductor.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

from moe_compile.counters import counters
from moe_compile.passes import PassManager, pipeline

log = logging.getLogger("moe_compile")
BACKEND_NAME = "moe_compile"
_registered = False


# ours; any other key must be an Inductor config name
OPTIONS = ("inner", "backend", "dump_dir", "cudagraphs", "specialize_phase", "decode_max_rows", "available_backends",
           "fp8", "sparsity_24", "fp8_scales")


def _inductor_patches(options: dict[str, Any]) -> dict[str, Any]:
    """Pop the options that are not ours and return them as Inductor config patches (validated by name)."""
    from torch._inductor import config as inductor_config

    patches = {key: options.pop(key) for key in [k for k in options if k not in OPTIONS]}
    unknown = sorted(set(patches) - set(inductor_config.get_config_copy()))
    if unknown:
        raise ValueError(f"unknown moe_compile backend options {unknown}: neither ours {list(OPTIONS)} nor Inductor "
                         "config names (torch._inductor.config)")
    if options.pop("cudagraphs", False):
        patches["triton.cudagraphs"] = True  # Inductor's CUDA graphs (cudagraph trees); a no-op for CPU graphs
    return patches


def moe_compile_backend(gm: torch.fx.GraphModule, example_inputs: list, options: Optional[dict[str, Any]] = None):
    options = dict(options or {})
    inner = options.pop("inner", "inductor")
    if inner not in ("inductor", "eager"):
        raise ValueError(f"option inner must be 'inductor' or 'eager', got {inner!r}")
    patches = _inductor_patches(options)
    if patches and inner == "eager":
        raise ValueError(f"Inductor options {sorted(patches)} need inner='inductor'")
    graph_index = counters["moe_compile"]["graphs"]
    counters["moe_compile"]["graphs"] += 1
    dump_dir = options.get("dump_dir") or os.environ.get("MOE_COMPILE_DUMP")
    if dump_dir:  # one folder per captured graph, so graph breaks do not overwrite each other's dumps
        dump_dir = os.path.join(dump_dir, f"graph_{graph_index:03d}")
    # the weight passes read lifted parameters' real values from the example inputs
    manager = PassManager(pipeline(options), options={**options, "example_inputs": example_inputs}, dump_dir=dump_dir)
    gm = manager(gm)
    log.debug("moe_compile backend: %s", manager.history)
    if inner == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    try:
        return compile_fx(gm, example_inputs, config_patches=patches or None)
    except BaseException:
        # Dynamo may restart the frame from here (e.g. TensorifyScalarRestartAnalysis for float scalars) and call
        # us again on a new graph: take this graph's counts back so counters describe the graphs that run.
        _uncount(manager)
        raise


def _uncount(manager: PassManager) -> None:
    counters["moe_compile"]["graphs"] -= 1
    for name, count in manager.history:
        counters["moe_compile"][name] -= count


def register_compile_backend() -> None:
    """Make `backend="moe_compile"` known to torch.compile (idempotent; done on `import moe_compile`)."""
    global _registered
    if _registered:
        return
    from torch._dynamo import list_backends, register_backend

    if BACKEND_NAME not in list_backends(exclude_tags=()):
        register_backend(compiler_fn=moe_compile_backend, name=BACKEND_NAME)
    _registered = True
