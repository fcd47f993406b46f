"""Static KV caches kept per batch bucket, so later `generate` calls of a bucket reuse its cache and decode graph.

transformers (5.17 to 5.24 at least) makes a new `StaticCache` in every `generate` call (its
`_prepare_static_cache`), sized for that call or the longest call before it. A new cache means new tensors: the
compiled decode step is compiled again whenever the cache length differs from the previous call's, and
Inductor's cudagraph trees record the step's CUDA graph again for the new static addresses.
`KeptCaches.install` puts an instance attribute `_prepare_static_cache` on the model. For a call that
`BucketedGenerate` runs in a bucket (greedy or sampling, one sequence per row) it returns that bucket's kept
cache, reset in place (zeroed: the same tensors at the same addresses) when it is long enough; otherwise it
makes the bucket's cache anew, its length rounded up to a power of two (at least `min_len`; not past the
model's `max_position_embeddings` where the call fits in it), so a bucket grows a few times at most. Every other
call (beam search, a batch past the largest bucket, a caller's own cache, ...) gets transformers' own fresh cache.

Kept caches are allocated at creation where transformers knows the head shapes (`_get_static_cache_init_shape`),
so their tensors are marked static before any compiled code sees them; otherwise (MLA attention in transformers
5.24, layers on several devices) their first prefill allocates them, eagerly (emit/prefill.py checks).
Memory is logged at each creation and growth; `nbytes()` / `summary()` say it, `release()` frees it (the next
call of a released bucket allocates again and records its CUDA graph again, without a compile when the length
is unchanged). Measured on CPU (transformers 5.17 and 5.24): calls of batch 1, 4, 1, 4 compile the decode step
once per bucket; before, transformers' fresh cache recompiled the step on every change of the cache length.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

log = logging.getLogger("moe_compile")

DEFAULT_MIN_CACHE_LEN = 256  # tokens; the smallest kept cache, so short prompts of a bucket share one length


def cache_length(needed: int, min_len: int, limit: Optional[int] = None) -> int:
    """The kept length for a call needing `needed` tokens: the next power of two, at least `min_len`, and not past
    `limit` (the model's position limit) unless the call itself needs more."""
    length = max(min_len, 1 << max(needed - 1, 0).bit_length())
    if limit is not None and needed <= limit:
        length = min(length, limit)
    return max(length, needed)


def cache_nbytes(cache: Any) -> int:
    """Bytes held by the tensors of a cache's layers (0 while its layers are not allocated yet)."""
    seen, total = set(), 0
    for layer in getattr(cache, "layers", ()):
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total


def cache_is_allocated(cache: Any) -> bool:
    return all(getattr(layer, "is_initialized", True) for layer in getattr(cache, "layers", ()))


def full_length_window_layers(cache: Any, length: int) -> int:
    """Make a kept cache's sliding-window (and chunked) layers full-length static layers; returns how many.

    transformers' `StaticSlidingWindowLayer` keeps the last `window` tokens and tracks its fill in a Python int that
    its update and mask sizes branch on, so a compiled decode step guards on that int and compiles again at every
    step (seen with GPT-OSS: one graph per token until Dynamo's recompile limit). A full-length layer writes at the
    step's cache position (a tensor) like the full-attention layers; the model's sliding-window or chunked mask,
    built from the config over absolute positions, keeps attention to the same tokens. Costs: those layers hold
    `length` tokens instead of `window`, and their attention reads the whole kept cache."""
    from transformers.cache_utils import StaticLayer

    replaced = 0
    for index, layer in enumerate(getattr(cache, "layers", ())):
        if type(layer).__name__ == "StaticSlidingWindowLayer":
            cache.layers[index] = StaticLayer(max_cache_len=length)
            replaced += 1
    return replaced


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _activation_signature(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """dtype and device of the K/V states: those of the input embeddings (the model's own `dtype` may name FP8)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.dtype, weight.device
    return model.dtype, model.device


@dataclass
class KeptCache:
    cache: Any  # a transformers StaticCache
    length: int  # tokens it holds per row
    signature: tuple  # (dtype, device) of the model when it was made


class KeptCaches:
    """One static cache per batch bucket, handed to transformers' `generate` by `_prepare_static_cache`."""

    def __init__(self, buckets: Sequence[int], min_len: int = DEFAULT_MIN_CACHE_LEN):
        if not isinstance(min_len, int) or min_len < 1:
            raise ValueError(f"min_cache_len must be a positive number of tokens, got {min_len!r}")
        self.buckets = tuple(buckets)
        self.min_len = min_len
        self.kept: dict[int, KeptCache] = {}
        self.created: Counter = Counter()  # bucket -> caches made for it (its first, then one per growth)
        self.reused: Counter = Counter()  # bucket -> calls that ran on its kept cache
        self.installed = False
        self._bucket: Optional[int] = None  # the bucket of the `generate` call running now

    # ---- what the caller sees ----
    def is_kept(self, cache: Any) -> bool:
        return any(kept.cache is cache for kept in self.kept.values())

    def nbytes(self) -> int:
        return sum(cache_nbytes(kept.cache) for kept in self.kept.values())

    def summary(self) -> dict[int, dict[str, int]]:
        """bucket -> {"tokens": kept length, "bytes": memory} of every kept cache."""
        return {bucket: {"tokens": kept.length, "bytes": cache_nbytes(kept.cache)}
                for bucket, kept in sorted(self.kept.items())}

    def release(self, buckets: Optional[Sequence[int]] = None) -> int:
        """Drop the kept caches of `buckets` (all by default); returns the bytes they held."""
        chosen = sorted(self.kept) if buckets is None else [b for b in buckets if b in self.kept]
        freed = sum(cache_nbytes(self.kept.pop(bucket).cache) for bucket in chosen)
        if chosen:
            log.info("released the static KV caches of decode buckets %s (%s)", chosen, _mib(freed))
        return freed

    @contextlib.contextmanager
    def serving(self, bucket: int) -> Iterator[None]:
        """Calls of `_prepare_static_cache` inside get the kept cache of `bucket`."""
        self._bucket = bucket
        try:
            yield
        finally:
            self._bucket = None

    # ---- install / uninstall on a model ----
    def install(self, model: torch.nn.Module) -> bool:
        """Hand kept caches to `generate`; False (and a warning) where transformers has no `_prepare_static_cache`."""
        original = getattr(type(model), "_prepare_static_cache", None)
        if original is None:
            log.warning("this transformers version has no GenerationMixin._prepare_static_cache: static caches are "
                        "not kept across generate calls, so a call whose cache length differs from the previous "
                        "one compiles the decode step again")
            return False
        signature = inspect.signature(original)

        def _prepare_static_cache(*args: Any, **kwargs: Any) -> Any:
            arguments = signature.bind(model, *args, **kwargs).arguments
            kept = self._for_call(model, arguments)
            return kept if kept is not None else original(model, *args, **kwargs)

        model._prepare_static_cache = _prepare_static_cache
        self.installed = True
        return True

    def uninstall(self, model: torch.nn.Module) -> None:
        model.__dict__.pop("_prepare_static_cache", None)
        self.installed = False
        self.release()

    # ---- the cache of one call ----
    def _for_call(self, model: torch.nn.Module, arguments: dict) -> Any:
        batch, needed = arguments.get("batch_size"), arguments.get("max_cache_len")
        if (self._bucket is None or batch != self._bucket or arguments.get("cache_implementation") != "static"
                or not isinstance(needed, int) or getattr(model.config, "is_encoder_decoder", False)):
            return None
        kept = self.kept.get(batch)
        if kept is not None and kept.length >= needed and kept.signature == _activation_signature(model):
            kept.cache.reset()
            self.reused[batch] += 1
            return kept.cache
        return self._make(model, batch, needed, kept)

    def _make(self, model: torch.nn.Module, batch: int, needed: int, previous: Optional[KeptCache]) -> Any:
        from transformers import StaticCache

        text_config = model.config.get_text_config(decoder=True)
        length = cache_length(needed, self.min_len, getattr(text_config, "max_position_embeddings", None))
        if previous is not None:
            self.kept.pop(batch)  # the old tensors go before the new ones are allocated
        cache = StaticCache(config=text_config, max_cache_len=length)
        full_length_window_layers(cache, length)
        signature = _activation_signature(model)
        shape = model._get_static_cache_init_shape() if hasattr(model, "_get_static_cache_init_shape") else None
        if shape is not None:
            num_heads, head_dim = shape
            cache.early_initialization(batch_size=batch, num_heads=num_heads, head_dim=head_dim,
                                       dtype=signature[0], device=signature[1])
        self.kept[batch] = KeptCache(cache, length, signature)
        self.created[batch] += 1
        self._log_made(batch, length, needed, cache, previous)
        return cache

    def _log_made(self, batch: int, length: int, needed: int, cache: Any, previous: Optional[KeptCache]) -> None:
        size = _mib(cache_nbytes(cache)) if cache_is_allocated(cache) else "allocated at its first prefill"
        total = f"{len(self.kept)} kept, {_mib(self.nbytes())} in all"
        if previous is None:
            log.info("static KV cache for decode bucket %d: %d tokens per row, %s (%s)", batch, length, size, total)
        elif previous.length < needed:
            log.warning("static KV cache for decode bucket %d grows from %d to %d tokens (a call needs %d): %s (%s); "
                        "the decode step of this bucket compiles again", batch, previous.length, length, needed,
                        size, total)
        else:
            log.info("static KV cache for decode bucket %d made again for the model's new dtype/device: %s (%s)",
                     batch, size, total)
