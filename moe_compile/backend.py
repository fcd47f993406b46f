"""The `torch.compile` backend named `moe_compile`: our graph passes over the captured FX graph, then Inductor.

    torch.compile(model, backend="moe_compile")                         # passes, then Inductor
    torch.compile(model, backend="moe_compile", options={"inner": "eager", "backend": "reference"})

Options: `inner` ("inductor" default, or "eager" to run the passed graph as is), `backend` (pin the fused_moe
kernel, see passes/select_backend.py), `dump_dir` (per-pass graph dumps, one `graph_NNN/` folder per captured
graph; `MOE_COMPILE_DUMP=DIR` does the same). Unknown options are an error. Counters: see moe_compile.counters.
The model should have been through `moe_compile.optimize` first, so its MoE blocks are `fused_moe` nodes; on
other graphs the passes find nothing and the backend is plain Inductor.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

from moe_compile.counters import counters
from moe_compile.passes import DEFAULT_PIPELINE, PassManager

log = logging.getLogger("moe_compile")
BACKEND_NAME = "moe_compile"
_registered = False


OPTIONS = ("inner", "backend", "dump_dir")


def moe_compile_backend(gm: torch.fx.GraphModule, example_inputs: list, options: Optional[dict[str, Any]] = None):
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown moe_compile backend options {unknown}; valid: {list(OPTIONS)}")
    inner = options.pop("inner", "inductor")
    if inner not in ("inductor", "eager"):
        raise ValueError(f"option inner must be 'inductor' or 'eager', got {inner!r}")
    graph_index = counters["moe_compile"]["graphs"]
    counters["moe_compile"]["graphs"] += 1
    dump_dir = options.get("dump_dir") or os.environ.get("MOE_COMPILE_DUMP")
    if dump_dir:  # one folder per captured graph, so graph breaks do not overwrite each other's dumps
        dump_dir = os.path.join(dump_dir, f"graph_{graph_index:03d}")
    manager = PassManager(list(DEFAULT_PIPELINE), options=options, dump_dir=dump_dir)
    gm = manager(gm)
    log.debug("moe_compile backend: %s", manager.history)
    if inner == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    try:
        return compile_fx(gm, example_inputs)
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
