"""Watching the compiled decode step: capture progress per bucket, graphs compiled and CUDA graphs recorded.

transformers' `generate` gets its compiled decode step from `model.get_compiled_call(compile_config)`;
`DecodeGraphs.install` puts an instance attribute of that name on the model that wraps the compiled callable.
Per call the wrapper costs two counter reads. The first decode step of a new bucket compiles the step (Dynamo,
our passes, Inductor: seconds) and the next one records its CUDA graph; that first step runs under a spinner
("capturing decode graph for batch 3 (bucket 4)...") on a terminal, and both are logged with their counts.

Counts: `counters["moe_compile"]["graphs"]` (graphs our backend compiled, all paths),
`counters["moe_compile"]["decode_graphs"]` (those compiled in a decode step) and
`counters["moe_compile"]["cudagraph_recordings"]` (CUDA graphs Inductor's cudagraph trees recorded, from Dynamo's
compilation callbacks). `DecodeGraphs.compiled[bucket]` / `.recorded[bucket]` split them per decode batch size.
Recompiles are bounded: Dynamo's `recompile_limit` (per code object; the decode step is one) is raised to the
number of buckets plus Dynamo's default while installed, and every compile after a bucket's first is logged.
The decode step is compiled again for a bucket only when the bucket's kept static cache grows (a longer call;
emit/static_caches.py logs it); before caches were kept per bucket, transformers' new cache per `generate` call
recompiled the step whenever its length changed, and Inductor recorded the CUDA graph again for its new tensors.
Past the limit Dynamo runs the step eagerly (correct, slow) and says so.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from moe_compile.counters import counters
from moe_compile.progress import status

log = logging.getLogger("moe_compile")

RECORDINGS = "cudagraph_recordings"
DYNAMO_DEFAULT_RECOMPILE_LIMIT = 8  # headroom kept for other models compiled in the process (same code object)


def _count_cudagraph_recordings(args: Any = None) -> None:
    trigger = getattr(args, "callback_trigger", None)
    if trigger is not None and trigger.name == "CUDAGRAPH_RECORDING":
        counters["moe_compile"][RECORDINGS] += 1


def register_recording_counter() -> None:
    """Count CUDA-graph recordings through Dynamo's compilation callbacks (once; again after `torch._dynamo.reset()`,
    which clears every registered callback)."""
    from torch._dynamo.callback import callback_handler

    if _count_cudagraph_recordings not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(_count_cudagraph_recordings)


def _step_batch(kwargs: dict) -> Optional[int]:
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


class DecodeGraphs:
    """Per-bucket bookkeeping of the compiled decode step; installed on a model, removed by `uninstall`."""

    def __init__(self, buckets: Sequence[int]):
        self.buckets = tuple(buckets)
        self.compiled: Counter = Counter()  # decode batch -> graphs our backend compiled for it
        self.recorded: Counter = Counter()  # decode batch -> CUDA graphs recorded for it
        self.first_step_s: dict[int, float] = {}  # decode batch -> seconds of its first (compiling) step
        self._real_batch: Optional[int] = None
        self._source: Any = None
        self._wrapped: Any = None
        self._previous_limit: Optional[int] = None
        self._limit: Optional[int] = None

    # ---- what the caller sees ----
    @property
    def captured_buckets(self) -> list[int]:
        return sorted(b for b, n in self.recorded.items() if n)

    @contextlib.contextmanager
    def serving(self, real_batch: int, bucket: int) -> Iterator[None]:
        """Label the decode steps run inside with the real batch (for the progress line)."""
        self._real_batch = real_batch
        try:
            yield
        finally:
            self._real_batch = None

    # ---- install / uninstall on a model ----
    def install(self, model: torch.nn.Module) -> None:
        register_recording_counter()
        original = type(model).get_compiled_call

        def get_compiled_call(compile_config: Any) -> Callable:
            return self.wrap(original(model, compile_config))

        model.get_compiled_call = get_compiled_call
        self._raise_recompile_limit()

    def uninstall(self, model: torch.nn.Module) -> None:
        model.__dict__.pop("get_compiled_call", None)
        config = torch._dynamo.config
        if self._limit is not None and config.recompile_limit == self._limit:
            config.recompile_limit = self._previous_limit
        self._limit = None

    def _raise_recompile_limit(self) -> None:
        config = torch._dynamo.config
        needed = len(self.buckets) + DYNAMO_DEFAULT_RECOMPILE_LIMIT
        if config.recompile_limit < needed:
            self._previous_limit, self._limit = config.recompile_limit, needed
            config.recompile_limit = needed
            log.info("decode graphs: Dynamo recompile_limit %d -> %d (one graph per batch bucket %s)",
                     self._previous_limit, needed, list(self.buckets))

    # ---- the wrapped decode step ----
    def wrap(self, compiled: Callable) -> Callable:
        if compiled is not self._source:
            self._source, self._wrapped = compiled, self._watch(compiled)
        return self._wrapped

    def _watch(self, compiled: Callable) -> Callable:
        def decode_step(*args: Any, **kwargs: Any) -> Any:
            batch = _step_batch(kwargs)
            stats = counters["moe_compile"]
            graphs, recordings = stats["graphs"], stats[RECORDINGS]
            if batch in self.first_step_s:
                output = compiled(*args, **kwargs)
            else:
                output = self._first_step(batch, compiled, args, kwargs)
            stats = counters["moe_compile"]
            if stats["graphs"] != graphs or stats[RECORDINGS] != recordings:
                self._note(batch, stats["graphs"] - graphs, stats[RECORDINGS] - recordings)
            return output

        return decode_step

    def _first_step(self, batch: Optional[int], compiled: Callable, args: tuple, kwargs: dict) -> Any:
        real = self._real_batch if self._real_batch is not None else batch
        register_recording_counter()  # a torch._dynamo.reset() since install drops it
        start = time.perf_counter()
        with status(f"capturing decode graph for batch {real} (bucket {batch})..."):
            output = compiled(*args, **kwargs)
        self.first_step_s[batch] = time.perf_counter() - start
        log.info("decode step for batch %s (bucket %s): first step %.1f s (compile + warm-up)", real, batch,
                 self.first_step_s[batch])
        return output

    def _note(self, batch: Optional[int], compiled: int, recorded: int) -> None:
        repeat = self.compiled[batch] > 0 and compiled > 0
        self.compiled[batch] += compiled
        counters["moe_compile"]["decode_graphs"] += compiled
        self.recorded[batch] += recorded
        if recorded:
            log.info("captured %d CUDA graph(s) for decode bucket %s; %d decode bucket(s) captured: %s", recorded,
                     batch, len(self.captured_buckets), self.captured_buckets)
        if repeat:
            log.warning("decode step recompiled for bucket %s (%d graphs for it so far; Dynamo recompile_limit %d): "
                        "expected after its static cache grew, else set TORCH_LOGS=recompiles to see which guard "
                        "failed", batch, self.compiled[batch],
                        torch._dynamo.config.recompile_limit)
