"""The prefill as its own compiled path: `torch.compile(backend="moe_compile", dynamic=True)` of the forward, run
for forward calls with more than one token per row; one-token steps run as before (generate's decode step through
transformers' compiled call and its CUDA graphs, a plain one-token forward eagerly).

`CompiledPrefill.install` sets the model's `_compiled_call_impl` (what `nn.Module.compile` sets; `model(...)`
calls it in place of `_call_impl`) to a dispatcher, and `uninstall` puts the previous one back. The compiled path
takes a forward call only when the shapes it would compile for are bounded:
  * more than one token per row (`input_ids` or `inputs_embeds`), and not inside a compiled region (the decode
    step, compiled by transformers, traces through the dispatcher and takes the eager branch);
  * inference, i.e. gradients off (`generate` turns them off; `torch.no_grad()` / `torch.inference_mode()` for a
    plain forward): a training forward runs eagerly, as it did before;
  * no cache argument (a plain forward: the model makes its own cache inside the graph), or one of the static
    caches kept per batch bucket (emit/static_caches.py), already allocated. A caller's own cache, or a fresh
    transformers cache, runs eagerly: its state (allocated or not, its type and length) would be new guards.
Measured on CPU (Dynamo of torch 2.13; transformers 5.17 and 5.24; TORCH_LOGS=recompiles): with transformers'
fresh cache per call, the compiled forward recompiled on `cache.layers[0].is_initialized` (a fresh cache is
allocated inside the first prefill) and on the cache length. With the kept, allocated caches, token counts, cache
lengths and batches past 1 are symbolic, and what is left is one graph per kind of call:
  * batch 1 or larger (Dynamo specialises sizes 0 and 1);
  * `attention_mask`: with a static cache, transformers gives the forward a 4-D mask when a prompt has padding and
    none when it has not (a different set of inputs);
  * a kept cache or none (generate, or a plain forward).
On an H100 (torch 2.11) the first prompt of a kind compiled with its token count static and the second token count
compiled it again, dynamic (guard `size mismatch at index 1`, TORCH_LOGS=recompiles): two graphs per kind there,
logged as "compiled again". On CPU (torch 2.13),
generate's prefill compiles at most four times whatever the buckets, prompt and cache lengths (calls of batch
1, 3 with left padding, 1, 4, 4 with 40 tokens, 4: three graphs), a plain forward adds its own kinds. `compiled`
counts the graphs per batch, a kind compiled again is logged as a warning, and `counters["moe_compile"]
["prefill_graphs"]` / `["prefill_runs"]` sum them up.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Callable, Optional

import torch

from moe_compile.counters import counters
from moe_compile.emit.static_caches import KeptCaches, cache_is_allocated
from moe_compile.progress import status

log = logging.getLogger("moe_compile")

CACHE_ARGUMENTS = ("cache", "past_key_values")  # the cache keyword of transformers 5.24 and of 5.17


def _rows_and_tokens(args: tuple, kwargs: dict) -> Optional[tuple[int, int]]:
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(tokens, torch.Tensor):
        tokens = kwargs.get("inputs_embeds")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
        return None
    return int(tokens.shape[0]), int(tokens.shape[1])


class CompiledPrefill:
    """The dispatcher between the compiled prefill and the model's own forward; installed on one model."""

    def __init__(self, caches: KeptCaches, options: Optional[dict[str, Any]] = None):
        self.caches = caches
        self.options = dict(options or {})
        self.compiled: Counter = Counter()  # batch -> prefill graphs our backend compiled for it
        self.runs: Counter = Counter()  # "compiled" / "eager" -> forward calls with more than one token per row
        self.first_call_s: dict[tuple, float] = {}  # kind of call (see the module doc) -> seconds of its first
        self._compiled_call: Optional[Callable] = None
        self._previous: Any = None
        self._installed: Optional[Callable] = None

    def install(self, model: torch.nn.Module) -> None:
        from moe_compile.backend import register_compile_backend

        register_compile_backend()
        self._previous = model._compiled_call_impl
        self._compiled_call = torch.compile(model._call_impl, backend="moe_compile", dynamic=True,
                                            options=self.options or None)
        call_impl = model._call_impl

        def forward_call(*args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():  # the decode step, compiled by transformers, traces through here
                return call_impl(*args, **kwargs)
            shape = _rows_and_tokens(args, kwargs)
            if shape is None or shape[1] <= 1:
                return call_impl(*args, **kwargs)
            cache = self._cache_argument(args, kwargs)
            if cache is False or torch.is_grad_enabled():
                self.runs["eager"] += 1
                return call_impl(*args, **kwargs)
            return self._run_compiled(shape, cache is not None, args, kwargs)

        model._compiled_call_impl = forward_call
        self._installed = forward_call

    def uninstall(self, model: torch.nn.Module) -> None:
        if self._installed is not None and model.__dict__.get("_compiled_call_impl") is self._installed:
            model._compiled_call_impl = self._previous
        self._compiled_call = self._installed = None

    def _cache_argument(self, args: tuple, kwargs: dict) -> Any:
        """None (no cache), the kept cache passed, or False when the call must run eagerly."""
        if len(args) > 1:
            return False  # positional arguments past the ids may hold a cache: leave such calls alone
        caches = [kwargs[name] for name in CACHE_ARGUMENTS if kwargs.get(name) is not None]
        if not caches:
            return None
        cache = caches[0]
        if len(caches) == 1 and self.caches.is_kept(cache) and cache_is_allocated(cache):
            return cache
        return False

    def _run_compiled(self, shape: tuple[int, int], has_cache: bool, args: tuple, kwargs: dict) -> Any:
        batch, tokens = shape
        mask = kwargs.get("attention_mask")
        kind = (batch == 1, mask.dim() if isinstance(mask, torch.Tensor) else None, has_cache)
        graphs = counters["moe_compile"]["graphs"]
        self.runs["compiled"] += 1
        counters["moe_compile"]["prefill_runs"] += 1
        first = kind not in self.first_call_s
        if first:
            start = time.perf_counter()
            with status(f"compiling the prefill for batch {batch} (dynamic token count)..."):
                output = self._compiled_call(*args, **kwargs)
            self.first_call_s[kind] = time.perf_counter() - start
        else:
            output = self._compiled_call(*args, **kwargs)
        new_graphs = counters["moe_compile"]["graphs"] - graphs
        if new_graphs:
            self._note(batch, tokens, new_graphs, first)
        return output

    def _note(self, batch: int, tokens: int, new_graphs: int, first: bool) -> None:
        self.compiled[batch] += new_graphs
        counters["moe_compile"]["prefill_graphs"] += new_graphs
        total = sum(self.compiled.values())
        if first:
            log.info("prefill compiled for batch %d (%d tokens; the token count is dynamic): %d prefill graph(s)",
                     batch, tokens, total)
        else:
            log.warning("prefill compiled again for batch %d, %d tokens (%d prefill graphs so far): set "
                        "TORCH_LOGS=recompiles to see which guard failed", batch, tokens, total)
