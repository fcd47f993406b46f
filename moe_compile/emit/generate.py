"""CUDA-graph emission for HF `generate`: decode steps replayed from captured graphs, prefill left dynamic.

transformers' `generate` already splits the two phases: the prefill (variable token count) runs the model's own
`__call__`, and, when the KV cache is static, every decode step (one token per sequence, fixed shapes) runs
`torch.compile(model.__call__, **generation_config.compile_config)`. We set a static cache and a compile config
that sends the decode step through the `moe_compile` backend with Inductor's CUDA graphs (cudagraph trees):
each distinct batch size is one bucket, captured lazily on its first decode step and replayed after that.
Recompiles per new batch size are bounded by `torch._dynamo.config.recompile_limit` and logged by
`TORCH_LOGS=recompiles`. The fused op on the GPU path does no host synchronisation, so capture is safe.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger("moe_compile")


def is_hf_generative(model: nn.Module) -> bool:
    try:
        from transformers import GenerationMixin
    except ImportError:
        return False
    return isinstance(model, GenerationMixin) and getattr(model, "generation_config", None) is not None


def decode_compile_config():
    from transformers import CompileConfig

    # mode must stay None: a custom backend takes options, and torch.compile refuses both at once.
    return CompileConfig(fullgraph=False, dynamic=False, backend="moe_compile", mode=None,
                         options={"cudagraphs": True})


def enable_cuda_graph_decode(model: nn.Module) -> str:
    """Configure `model.generate` for CUDA-graph decode; returns what was set, for the report."""
    config = model.generation_config
    config.cache_implementation = "static"
    config.compile_config = decode_compile_config()
    log.info("generate: static KV cache, decode steps compiled by moe_compile with CUDA graphs")
    return "generate: static cache + CUDA-graph decode (one graph per batch size)"


def disable_cuda_graph_decode(model: nn.Module) -> None:
    config = model.generation_config
    config.cache_implementation = None
    config.compile_config = None
