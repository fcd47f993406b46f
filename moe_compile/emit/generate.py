"""CUDA-graph emission for HF `generate`: decode steps replayed from captured graphs in batch-size buckets, each
bucket on its own kept static KV cache, and optionally a compiled prefill with a dynamic token count.

transformers' `generate` already splits the two phases: the prefill (variable token count) runs the model's own
`__call__`, and, when the KV cache is static, every decode step (one token per sequence, fixed shapes) runs
`model.get_compiled_call(generation_config.compile_config)`, i.e. `torch.compile(model.__call__, ...)`. We set a
static cache and a compile config that sends the decode step through the `moe_compile` backend (with
`specialize_phase`, decode nodes get the decode kernel) and Inductor's CUDA graphs (cudagraph trees), then:
  * `model.generate` pads each batch up to its bucket (emit/buckets.py), so batches 3 and 4 share one graph;
  * each bucket keeps its static cache across calls (emit/static_caches.py, `model._prepare_static_cache`), so
    calls of batch 1, 4, 1, 4 compile the decode step once per bucket and replay its graph on the same tensors;
    a bucket's cache grows (power-of-two lengths, logged) only when a call needs more tokens;
  * `model.get_compiled_call` is wrapped (emit/decode_graphs.py): a bucket's first decode step (compile +
    warm-up; the CUDA graph is recorded on the next) shows a progress line, captures and recompiles are counted
    and logged, and Dynamo's recompile limit is raised to cover the buckets (so the bound is explicit);
  * with `compile_prefill` (the plan's `compile` feature), forward calls of more than one token per row run
    `torch.compile(backend="moe_compile", dynamic=True)` (emit/prefill.py, `model._compiled_call_impl`): about
    two prefill graphs in all, whatever the buckets, prompt lengths and cache lengths.
All are instance attributes: `disable_cuda_graph_decode` removes them (transformers' own methods come back) and
drops the kept caches; `release_decode_caches` drops the caches alone. The fused op on the GPU path does no host
synchronisation, so capture is safe.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

from torch import nn

from moe_compile.emit.buckets import DEFAULT_BUCKETS, BucketedGenerate, check_buckets
from moe_compile.emit.decode_graphs import DecodeGraphs
from moe_compile.emit.deferred_stop import deferring_stop_checks
from moe_compile.emit.prefill import CompiledPrefill
from moe_compile.emit.static_caches import DEFAULT_MIN_CACHE_LEN, KeptCaches

log = logging.getLogger("moe_compile")
STATE = "_moe_compile_decode"  # model attribute holding what enable_cuda_graph_decode changed


@dataclass
class _DecodeState:
    graphs: DecodeGraphs
    caches: KeptCaches
    prefill: Optional[CompiledPrefill]
    cache_implementation: Any
    compile_config: Any
    settings: dict[str, Any] = field(default_factory=dict)  # the arguments of enable_cuda_graph_decode but buckets


def is_hf_generative(model: nn.Module) -> bool:
    try:
        from transformers import GenerationMixin
    except ImportError:
        return False
    return isinstance(model, GenerationMixin) and getattr(model, "generation_config", None) is not None


def decode_compile_config(specialize_phase: bool = False, dynamic_batch: bool = False):
    """transformers' compile config of the decode step: our backend with CUDA graphs. `dynamic_batch` lets Dynamo
    mark sizes dynamic when they change (dynamic=None, Dynamo's automatic dynamic shapes): the first bucket compiles
    with static sizes, the next one once more with a dynamic batch and cache length, and every later bucket and
    grown cache reuses that graph (CUDA graphs are still recorded per bucket). Otherwise (dynamic=False) each bucket
    and each kept-cache length compiles its own graph."""
    from transformers import CompileConfig

    options: dict[str, Any] = {"cudagraphs": True}
    if specialize_phase:
        options["specialize_phase"] = True
    # mode must stay None: a custom backend takes options, and torch.compile refuses both at once.
    return CompileConfig(fullgraph=False, dynamic=None if dynamic_batch else False, backend="moe_compile", mode=None,
                         options=options)


def enable_cuda_graph_decode(model: nn.Module, specialize_phase: bool = False,
                             buckets: Sequence[int] = DEFAULT_BUCKETS, compile_prefill: bool = False,
                             min_cache_len: int = DEFAULT_MIN_CACHE_LEN,
                             prefill_options: Optional[dict[str, Any]] = None, dynamic_batch: bool = False) -> str:
    """Configure `model.generate` for CUDA-graph decode in batch buckets, each on a static KV cache kept across
    calls (at least `min_cache_len` tokens); with `compile_prefill`, forward calls of more than one token per row
    run a compiled forward with a dynamic token count (`prefill_options`: extra moe_compile backend options);
    `dynamic_batch`: see `decode_compile_config` (experimental: fewer compiles, not yet timed on a GPU).
    Returns what was set, for the report."""
    if getattr(model, STATE, None) is not None:
        disable_cuda_graph_decode(model)  # a second optimize: start from transformers' own methods
    buckets = check_buckets(buckets)
    settings = dict(specialize_phase=specialize_phase, compile_prefill=compile_prefill, min_cache_len=min_cache_len,
                    prefill_options=prefill_options, dynamic_batch=dynamic_batch)
    config = model.generation_config
    caches = KeptCaches(buckets, min_cache_len)
    state = _DecodeState(DecodeGraphs(buckets), caches, None, config.cache_implementation, config.compile_config,
                         settings)
    object.__setattr__(model, STATE, state)
    try:
        _install(model, state, specialize_phase, compile_prefill, prefill_options, dynamic_batch)
    except BaseException:
        disable_cuda_graph_decode(model)
        raise
    log.info("generate: static KV caches kept per batch bucket %s, decode steps compiled by moe_compile with CUDA "
             "graphs%s", list(buckets), ", prefill compiled with a dynamic token count" if state.prefill else "")
    return _describe(state, buckets)


def _install(model: nn.Module, state: _DecodeState, specialize_phase: bool, compile_prefill: bool,
             prefill_options: Optional[dict[str, Any]], dynamic_batch: bool) -> None:
    config = model.generation_config
    config.cache_implementation = "static"
    config.compile_config = decode_compile_config(specialize_phase, dynamic_batch)
    state.graphs.install(model)
    state.caches.install(model)
    if compile_prefill:
        options = {"specialize_phase": True} if specialize_phase else {}
        state.prefill = CompiledPrefill(state.caches, {**options, **(prefill_options or {})})
        state.prefill.install(model)

    @contextlib.contextmanager
    def serving(real_batch: int, bucket: int) -> Iterator[None]:
        with state.graphs.serving(real_batch, bucket), state.caches.serving(bucket), deferring_stop_checks():
            yield

    @contextlib.contextmanager
    def callers_cache() -> Iterator[None]:
        # transformers refuses a caller's cache beside a `cache_implementation`: give it back its own for the call
        config.cache_implementation = state.cache_implementation
        try:
            yield
        finally:
            config.cache_implementation = "static"

    model.generate = BucketedGenerate(model, state.graphs.buckets, serving, callers_cache)


def _describe(state: _DecodeState, buckets: Sequence[int]) -> str:
    phase = ", decode kernels by specialize_phase" if state.settings["specialize_phase"] else ""
    kept = ", a static cache kept per bucket" if state.caches.installed else ""
    phase += ", a dynamic batch past the first bucket" if state.settings["dynamic_batch"] else ""
    prefill = "; prefill compiled by moe_compile (dynamic token count)" if state.prefill else ""
    return f"generate: static cache + CUDA-graph decode (batch buckets {list(buckets)}{kept}{phase}){prefill}"


def disable_cuda_graph_decode(model: nn.Module) -> None:
    """Undo `enable_cuda_graph_decode`: transformers' `generate`, cache preparation, forward and compile config come
    back, and the kept caches are dropped."""
    state: Optional[_DecodeState] = model.__dict__.pop(STATE, None)
    model.__dict__.pop("generate", None)
    config = model.generation_config
    if state is None:
        config.cache_implementation = None
        config.compile_config = None
        return
    if state.prefill is not None:
        state.prefill.uninstall(model)
    state.caches.uninstall(model)
    state.graphs.uninstall(model)
    config.cache_implementation = state.cache_implementation
    config.compile_config = state.compile_config


def decode_graphs(model: nn.Module) -> Optional[DecodeGraphs]:
    """The decode-graph bookkeeping of a model set up by `enable_cuda_graph_decode` (None otherwise)."""
    state = getattr(model, STATE, None)
    return state.graphs if state is not None else None


def decode_caches(model: nn.Module) -> Optional[KeptCaches]:
    """The static KV caches kept per bucket (`.summary()`, `.nbytes()`), None where CUDA-graph decode is off."""
    state = getattr(model, STATE, None)
    return state.caches if state is not None else None


def compiled_prefill(model: nn.Module) -> Optional[CompiledPrefill]:
    """The compiled prefill path (`.compiled`, `.runs`), None where it is off."""
    state = getattr(model, STATE, None)
    return state.prefill if state is not None else None


def _state(model: nn.Module, what: str) -> _DecodeState:
    state: Optional[_DecodeState] = getattr(model, STATE, None)
    if state is None:
        raise ValueError(f"{what} needs a model set up by optimize(model, 'balanced') on a GPU (CUDA-graph decode); "
                         "this one is not")
    return state


def set_decode_buckets(model: nn.Module, buckets: Sequence[int]) -> None:
    """Change the batch buckets of a model already set up for CUDA-graph decode (graphs are captured lazily); the
    kept caches are dropped, each bucket makes its own at its next call."""
    state = _state(model, "set_decode_buckets")
    enable_cuda_graph_decode(model, buckets=buckets, **state.settings)


def set_dynamic_decode(model: nn.Module, dynamic_batch: bool = True) -> None:
    """Compile the decode step of a model already set up for CUDA-graph decode with a dynamic batch (or not): see
    `decode_compile_config`. Like `set_decode_buckets`, it starts over: kept caches and compiled steps are dropped."""
    state = _state(model, "set_dynamic_decode")
    enable_cuda_graph_decode(model, buckets=state.graphs.buckets, **{**state.settings, "dynamic_batch": dynamic_batch})


def release_decode_caches(model: nn.Module, buckets: Optional[Sequence[int]] = None) -> int:
    """Free the static KV caches kept for `buckets` (all by default); returns the bytes they held. A later call of
    such a bucket allocates its cache again and records its CUDA graph again (no compile at an unchanged length)."""
    return _state(model, "release_decode_caches").caches.release(buckets)
