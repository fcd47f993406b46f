"""Deferred stop checks for CUDA-graph decode (experimental, off unless MOE_COMPILE_DEFERRED_STOP=1).

transformers' `generate` reads `unfinished_sequences.max() == 0` on the host after every step. That read waits for
the GPU to finish the step, so the host prepares the next step while the GPU idles: on an H100 (48-layer
Qwen3-30B-A3B shape, batch 1) ~1.8 ms of each ~7.2 ms step was host time with the GPU idle (bench_e2e --trace:
the compiled step's own host side 1.7 ms, Dynamo guards and the graph launch). transformers (5.17 and later) has
`DeferredStopCheck`: the flag is copied asynchronously and read one step late, so the host queues step n + 1 while
the GPU runs step n; an EOS stop then costs one extra forward, which `generate` undoes before it returns (a length
stop is known on the host and costs nothing). transformers enables it only on "mps".

`deferring_stop_checks()` enables it for CUDA devices for the duration of a call, keeping transformers' other
conditions (never for an assistant model; a cache handed back to the caller must be croppable, so the extra step can
be undone in it). The kept static caches of CUDA-graph decode are not handed back: the extra step's KV entry lies
past the returned tokens, where the next call's masks do not look. Not yet measured on the GPU, hence opt-in.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

ENABLE_ENV = "MOE_COMPILE_DEFERRED_STOP"


def _stop_check_class() -> Any:
    """transformers' DeferredStopCheck, or None where this transformers has none."""
    try:
        from transformers.generation.utils import DeferredStopCheck
    except ImportError:
        return None
    return DeferredStopCheck if callable(getattr(DeferredStopCheck, "is_supported", None)) else None


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV) == "1" and _stop_check_class() is not None


@contextlib.contextmanager
def deferring_stop_checks() -> Iterator[bool]:
    """Within the block, `generate` on a CUDA device defers its stop check by one step (where `enabled()`); yields
    whether it does. Restores transformers' rule on exit (nested blocks leave it to the outermost)."""
    cls = _stop_check_class()
    if not enabled() or getattr(cls.is_supported, "_moe_compile", False):
        yield enabled()
        return
    original = cls.__dict__["is_supported"]

    def is_supported(device, cache, cache_is_returned, is_assistant) -> bool:
        if device.type != "cuda":
            return original.__func__(device, cache, cache_is_returned, is_assistant)
        if is_assistant:
            return False
        return cache is None or bool(cache.is_croppable) or not cache_is_returned

    is_supported._moe_compile = True
    cls.is_supported = staticmethod(is_supported)
    try:
        yield True
    finally:
        cls.is_supported = original
