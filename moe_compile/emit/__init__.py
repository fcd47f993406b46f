"""emit: how the rewritten model runs.

  * eager: the default on CPU, and the `conservative` profile;
  * compile: `model.compile(backend="moe_compile", dynamic=True)` — the forward (and so the prefill of `generate`)
    goes through our graph passes and Inductor with a dynamic token count;
  * cuda_graphs: for HF generative models, `generate` decodes with a static KV cache kept per batch-size bucket and
    replays each decode step from a captured CUDA graph, one per bucket (see `emit/generate.py`, `emit/buckets.py`,
    `emit/static_caches.py`); with `compile` as well, the prefill is its own compiled path with a dynamic token
    count (`emit/prefill.py`: forward calls of more than one token per row, while decode steps keep transformers'
    compiled call). That used to be off: a compiled forward recompiled on the KV cache's state guards at every
    generate call (transformers makes a new, unallocated static cache per call) and on every new cache length.
    With the kept, pre-allocated caches it compiles about twice in all (batch 1, larger batches), measured on CPU
    with transformers 5.17 and 5.24. Grouped-query attention then decodes without copying the KV cache per head
    (`emit/attention.py`);
  * specialize_phase: the compiled graphs' fused_moe nodes get the decode or prefill kernel by token count
    (passes/specialize_phase.py); it acts where a graph is compiled (compile or cuda_graphs).
`apply_emit` returns an undo callable so `optimize` can put everything back on a failure.
"""

from __future__ import annotations

import logging
from typing import Callable

from torch import nn

from moe_compile.emit.generate import (decode_caches, disable_cuda_graph_decode, enable_cuda_graph_decode,
                                       is_hf_generative)
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
            compile_prefill = bool(enabled.get("compile"))
            described = enable_cuda_graph_decode(model, specialize_phase=specialize, compile_prefill=compile_prefill)
            undo.append(lambda: disable_cuda_graph_decode(model))
            result.passes.append(described)
            compiled_somewhere = True
            _gqa_decode_attention(model, result, undo)
            if compile_prefill:
                enabled = {**enabled, "compile": False}  # done: the prefill path is compiled, not model.compile
                caches = decode_caches(model)
                if caches is not None and not caches.installed:
                    result.notes["compile"] = ("this transformers version cannot be handed a kept static cache: "
                                               "generate's prefill runs eager, plain forward calls compiled")
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


def _gqa_decode_attention(model: nn.Module, result: OptimizeResult, undo: list) -> None:
    """Decode steps attend over the KV cache without a per-head copy of it (emit/attention.py)."""
    from moe_compile.emit.attention import use_gqa_decode_attention

    layers, restore = use_gqa_decode_attention(model)
    if layers:
        undo.append(restore)
        result.passes.append("emit:gqa_decode_attention")
        result.pass_counts["gqa_decode_attention"] = layers
