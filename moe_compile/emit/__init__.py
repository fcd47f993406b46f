"""emit: how the rewritten model runs.

  * eager: the default on CPU, and the `conservative` profile;
  * compile: `model.compile(backend="moe_compile", dynamic=True)` — the forward (and so the prefill of `generate`)
    goes through our graph passes and Inductor with a dynamic token count;
  * cuda_graphs: for HF generative models, `generate` decodes with a static KV cache and replays each decode step
    from a captured CUDA graph, one per batch size (see `emit/generate.py`).
`apply_emit` returns an undo callable so `optimize` can put everything back on a failure.
"""

from __future__ import annotations

import logging
from typing import Callable

from torch import nn

from moe_compile.emit.generate import disable_cuda_graph_decode, enable_cuda_graph_decode, is_hf_generative
from moe_compile.report import OptimizeResult

log = logging.getLogger("moe_compile")


def apply_emit(model: nn.Module, enabled: dict[str, bool], result: OptimizeResult) -> Callable[[], None]:
    """Apply the emit features the plan enabled; returns a callable that undoes them (called here on failure)."""
    undo: list[Callable[[], None]] = []

    def undo_all() -> None:
        for step in reversed(undo):
            step()

    try:
        _apply(model, enabled, result, undo)
    except BaseException:
        undo_all()
        raise
    return undo_all


def _apply(model: nn.Module, enabled: dict[str, bool], result: OptimizeResult, undo: list) -> None:
    if enabled.get("cuda_graphs"):
        if is_hf_generative(model):
            result.passes.append(enable_cuda_graph_decode(model))
            undo.append(lambda: disable_cuda_graph_decode(model))
            if enabled.get("compile"):
                # Measured on transformers 5.17: a compiled forward recompiles on the KV cache's state guards
                # (`layers[i].is_initialized`) at every generate call and hits dynamo's recompile limit. So the
                # prefill runs the eager forward, whose MoE layers are already the fused kernels.
                enabled = {**enabled, "compile": False}
                result.features["compile"] = False
                result.unavailable["compile"] = ("with CUDA-graph decode the prefill runs eager with the fused "
                                                 "kernels: a compiled forward recompiles on the KV cache state")
        else:
            result.features["cuda_graphs"] = False
            result.unavailable["cuda_graphs"] = ("CUDA-graph decode needs a transformers generative model "
                                                 "(use torch.compile(model, backend='moe_compile', "
                                                 "options={'cudagraphs': True}) for other modules)")
    if enabled.get("compile"):
        from moe_compile.backend import register_compile_backend

        register_compile_backend()
        model.compile(backend="moe_compile", dynamic=True)
        undo.append(lambda: setattr(model, "_compiled_call_impl", None))
        result.passes.append("emit:torch.compile(backend=moe_compile, dynamic=True)")
    if not enabled.get("compile") and not enabled.get("cuda_graphs"):
        result.passes.append("emit:eager")
