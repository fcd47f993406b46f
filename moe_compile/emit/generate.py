"""CUDA-graph emission for HF `generate`: decode steps replayed from captured graphs in batch-size buckets.

transformers' `generate` already splits the two phases: the prefill (variable token count) runs the model's own
`__call__`, and, when the KV cache is static, every decode step (one token per sequence, fixed shapes) runs
`model.get_compiled_call(generation_config.compile_config)`, i.e. `torch.compile(model.__call__, ...)`. We set a
static cache and a compile config that sends the decode step through the `moe_compile` backend (with
`specialize_phase`, decode nodes get the decode kernel) and Inductor's CUDA graphs (cudagraph trees), then:
  * `model.generate` pads each batch up to its bucket (emit/buckets.py), so batches 3 and 4 share one graph;
  * `model.get_compiled_call` is wrapped (emit/decode_graphs.py): a bucket's first decode step (compile +
    warm-up; the CUDA graph is recorded on the next) shows a progress line, captures and recompiles are counted
    and logged, and Dynamo's recompile limit is raised to cover the buckets (so the bound is explicit).
Both are instance attributes: `disable_cuda_graph_decode` deletes them and transformers' own methods come back.
The fused op on the GPU path does no host synchronisation, so capture is safe. The prefill stays eager (with the
fused kernels): see emit/__init__.py for why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import nn

from moe_compile.emit.buckets import DEFAULT_BUCKETS, BucketedGenerate, check_buckets
from moe_compile.emit.decode_graphs import DecodeGraphs

log = logging.getLogger("moe_compile")
STATE = "_moe_compile_decode"  # model attribute holding what enable_cuda_graph_decode changed


@dataclass
class _DecodeState:
    graphs: DecodeGraphs
    cache_implementation: Any
    compile_config: Any


def is_hf_generative(model: nn.Module) -> bool:
    try:
        from transformers import GenerationMixin
    except ImportError:
        return False
    return isinstance(model, GenerationMixin) and getattr(model, "generation_config", None) is not None


def decode_compile_config(specialize_phase: bool = False):
    from transformers import CompileConfig

    options: dict[str, Any] = {"cudagraphs": True}
    if specialize_phase:
        options["specialize_phase"] = True
    # mode must stay None: a custom backend takes options, and torch.compile refuses both at once.
    return CompileConfig(fullgraph=False, dynamic=False, backend="moe_compile", mode=None, options=options)


def enable_cuda_graph_decode(model: nn.Module, specialize_phase: bool = False,
                             buckets: Sequence[int] = DEFAULT_BUCKETS) -> str:
    """Configure `model.generate` for CUDA-graph decode in batch buckets; returns what was set, for the report."""
    if getattr(model, STATE, None) is not None:
        disable_cuda_graph_decode(model)  # a second optimize: start from transformers' own methods
    buckets = check_buckets(buckets)
    config = model.generation_config
    graphs = DecodeGraphs(buckets)
    state = _DecodeState(graphs, config.cache_implementation, config.compile_config)
    config.cache_implementation = "static"
    config.compile_config = decode_compile_config(specialize_phase)
    graphs.install(model)
    model.generate = BucketedGenerate(model, buckets, graphs.serving)
    object.__setattr__(model, STATE, state)
    log.info("generate: static KV cache, decode steps compiled by moe_compile with CUDA graphs, batch buckets %s",
             list(buckets))
    phase = ", decode kernels by specialize_phase" if specialize_phase else ""
    return f"generate: static cache + CUDA-graph decode (batch buckets {list(buckets)}{phase})"


def disable_cuda_graph_decode(model: nn.Module) -> None:
    """Undo `enable_cuda_graph_decode`: transformers' `generate` and compile config come back."""
    state: Optional[_DecodeState] = model.__dict__.pop(STATE, None)
    model.__dict__.pop("generate", None)
    config = model.generation_config
    if state is None:
        config.cache_implementation = None
        config.compile_config = None
        return
    state.graphs.uninstall(model)
    config.cache_implementation = state.cache_implementation
    config.compile_config = state.compile_config


def decode_graphs(model: nn.Module) -> Optional[DecodeGraphs]:
    """The decode-graph bookkeeping of a model set up by `enable_cuda_graph_decode` (None otherwise)."""
    state = getattr(model, STATE, None)
    return state.graphs if state is not None else None


def set_decode_buckets(model: nn.Module, buckets: Sequence[int]) -> None:
    """Change the batch buckets of a model already set up for CUDA-graph decode (graphs are captured lazily)."""
    state: Optional[_DecodeState] = getattr(model, STATE, None)
    if state is None:
        raise ValueError("set_decode_buckets needs a model set up by optimize(model, 'balanced') on a GPU "
                         "(CUDA-graph decode); this one is not")
    specialize = bool((model.generation_config.compile_config.options or {}).get("specialize_phase"))
    enable_cuda_graph_decode(model, specialize, buckets)
