"""emit: how the rewritten model runs.

  * eager: the default on CPU, and the `conservative` profile;
  * compile: `model.compile(backend="moe_compile", dynamic=True)` — the forward (and so the prefill of `generate`)
    goes through our graph passes and Inductor with a dynamic token count;
  * cuda_graphs: for HF generative models, `generate` decodes with a static KV cache and replays each decode step
    from a captured CUDA graph, one per batch-size bucket (see `emit/generate.py`, `emit/buckets.py`);
  * specialize_phase: the compiled graphs' fused_moe nodes get the decode or prefill kernel by token count
    (passes/specialize_phase.py); it acts where a graph is compiled (compile or cuda_graphs).
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
    specialize = bool(enabled.get("specialize_phase"))
    compiled_somewhere = False
    if enabled.get("cuda_graphs"):
        if is_hf_generative(model):
            result.passes.append(enable_cuda_graph_decode(model, specialize_phase=specialize))
            undo.append(lambda: disable_cuda_graph_decode(model))
            compiled_somewhere = True
            if enabled.get("compile"):
                # Measured on transformers 5.17 (H100): a compiled forward recompiles on the KV cache's state guards
                # at every generate call and hits dynamo's recompile limit. Compiling only the inner model
                # (`model.model`, dynamic=True) recompiles whenever generate makes a new static cache (new batch
                # bucket or longer cache): seconds each, against a prefill gain of 7.3 -> 4.6 ms (2 layers of the
                # Qwen3-30B-A3B shape, batch 1, 512 tokens). So the prefill runs the eager forward, whose MoE
                # layers are already the fused kernels.
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
        model.compile(backend="moe_compile", dynamic=True, options={"specialize_phase": True} if specialize else None)
        undo.append(lambda: setattr(model, "_compiled_call_impl", None))
        result.passes.append("emit:torch.compile(backend=moe_compile, dynamic=True)")
        compiled_somewhere = True
    if not compiled_somewhere:
        result.passes.append("emit:eager")
    if specialize and not compiled_somewhere:
        result.features["specialize_phase"] = False
        result.unavailable["specialize_phase"] = ("phase specialisation acts on compiled graphs: it needs the "
                                                  "compile or cuda_graphs feature")
