"""Batch-size buckets for CUDA-graph decode: `generate` pads the batch up to its bucket so decode graphs are shared.

Each decode-step graph is captured for one batch size. Without buckets every distinct batch size compiles and
captures its own (tens of seconds on a large model); with them, a batch of 3 runs as the bucket of 4 and reuses
that graph. `BucketedGenerate` wraps `model.generate`:
  * it appends copies of the last real row (input ids, attention mask, embeddings) up to the bucket — real,
    well-formed rows, so left padding, masks and routing stay valid in them;
  * a stopping criterion marks the added rows finished from the first token, so they never keep the loop going
    (eos, `max_length`, stop strings and the caller's own criteria act on the real rows as before);
  * rows are independent in a decoder (attention per row, MoE routing per token), so the real rows' tokens do not
    depend on the added ones; the output is cut back to the real rows.
A call run in a bucket (padded or not) gets the bucket's kept static KV cache (emit/static_caches.py, through
the `on_batch` context), so buckets used in turn keep their decode graphs.
Sampling draws over the padded batch, so a seeded sampling run differs from an unpadded one (it stays seeded).
Calls that padding could change are passed through unpadded (their batch gets its own graph), and say why in the
debug log: beam search, several return sequences, `return_dict_in_generate` (outputs and cache hold the padded
batch), an assistant model, a streamer, a caller's cache, or per-row inputs other than ids / mask / embeddings.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from typing import Any, Callable, Optional, Sequence

import torch

log = logging.getLogger("moe_compile")

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# per-row tensors `generate` accepts that padding knows how to extend; any other batch-sized input disables padding
PADDABLE = ("input_ids", "attention_mask", "inputs_embeds", "token_type_ids")
# arguments whose presence makes padding unsafe or pointless (they see or return per-row state of the batch)
UNPADDABLE_ARGUMENTS = ("assistant_model", "streamer", "prefix_allowed_tokens_fn", "negative_prompt_ids",
                        "negative_prompt_attention_mask", "synced_gpus", "custom_generate")
CACHE_KWARGS = ("past_key_values", "cache")  # a caller's own KV cache (the keyword of transformers 5.17 / 5.24)
UNPADDABLE_KWARGS = (*CACHE_KWARGS, "assistant_model", "encoder_outputs")


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Sorted, distinct, positive bucket sizes; a clear error otherwise."""
    values = tuple(sorted(set(buckets)))
    if not values or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in values):
        raise ValueError(f"decode batch buckets must be positive integers, e.g. (1, 2, 4, 8), got {list(buckets)!r}")
    return values


def bucket_for(batch: int, buckets: Sequence[int]) -> Optional[int]:
    """The smallest bucket holding `batch` rows, or None past the largest (that batch then runs unpadded)."""
    return next((b for b in buckets if b >= batch), None)


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` [B, ...] extended to [rows, ...] with copies of its last row."""
    extra = rows - tensor.shape[0]
    if extra <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(extra, *tensor.shape[1:])], dim=0)


@functools.lru_cache(maxsize=None)
def _padding_rows_done_class() -> type:
    from transformers import StoppingCriteria  # transformers is imported only when generate is wrapped

    class PaddingRowsDone(StoppingCriteria):
        """Every row from `real_rows` on is finished (the rows added to fill the bucket)."""

        def __init__(self, real_rows: int):
            self.real_rows = real_rows

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs) -> torch.Tensor:
            return torch.arange(input_ids.shape[0], device=input_ids.device) >= self.real_rows

    return PaddingRowsDone


def padding_rows_done(real_rows: int) -> Any:
    """A transformers StoppingCriteria that reports every row from `real_rows` on as finished."""
    return _padding_rows_done_class()(real_rows)


class BucketedGenerate:
    """Replaces `model.generate` (an instance attribute, removed on undo): pads the batch to its bucket."""

    def __init__(self, model: torch.nn.Module, buckets: Sequence[int], on_batch: Callable[[int, int], Any],
                 callers_cache: Callable[[], Any] = contextlib.nullcontext):
        self.model = model
        self.original = model.generate  # the bound method of the class
        self.signature = inspect.signature(self.original)
        self.buckets = check_buckets(buckets)
        self.on_batch = on_batch  # context manager factory (real rows, bucket) -> labels the decode graphs
        self.callers_cache = callers_cache  # context manager factory for calls that bring their own KV cache
        self.__wrapped__ = self.original
        self.__doc__ = self.original.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        plan = self._plan(bound.arguments)
        if isinstance(plan, str):
            log.debug("generate: batch not padded to a bucket (%s)", plan)
            model_kwargs = bound.arguments.get("kwargs", {})
            own_cache = any(model_kwargs.get(name) is not None for name in CACHE_KWARGS)
            with self.callers_cache() if own_cache else contextlib.nullcontext():
                return self.original(*args, **kwargs)
        batch, bucket = plan
        if batch == bucket:
            with self.on_batch(batch, bucket):
                return self.original(*args, **kwargs)
        self._pad(bound.arguments, batch, bucket)
        with self.on_batch(batch, bucket):
            output = self.original(*bound.args, **bound.kwargs)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"generate returned {type(output).__name__} for a padded batch; expected token ids "
                            "(return_dict_in_generate is not padded)")
        return output[:batch]

    def _setting(self, arguments: dict, name: str, default: Any) -> Any:
        model_kwargs = arguments.get("kwargs", {})
        if name in model_kwargs:
            return model_kwargs[name]
        config = arguments.get("generation_config") or self.model.generation_config
        value = getattr(config, name, None)
        return default if value is None else value

    def _plan(self, arguments: dict) -> tuple[int, int] | str:
        """(real rows, bucket), or why this call is passed through unpadded."""
        model_kwargs = arguments.get("kwargs", {})
        rows = arguments.get("inputs")
        for name in ("input_ids", "inputs_embeds"):
            rows = model_kwargs.get(name) if rows is None else rows
        if not isinstance(rows, torch.Tensor) or rows.dim() < 2:
            return "no batched input ids or embeddings"
        batch = rows.shape[0]
        bucket = bucket_for(batch, self.buckets)
        if bucket is None:
            return f"batch {batch} is past the largest bucket {self.buckets[-1]}"
        blocking = [n for n in UNPADDABLE_ARGUMENTS if arguments.get(n) not in (None, False)]
        blocking += [n for n in UNPADDABLE_KWARGS if model_kwargs.get(n) is not None]
        blocking += [n for n, v in model_kwargs.items()
                     if n not in PADDABLE and isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch]
        if blocking:
            return f"arguments {blocking} see the batch's rows"
        for name, default in (("num_beams", 1), ("num_return_sequences", 1), ("return_dict_in_generate", False)):
            if self._setting(arguments, name, default) != default:
                return f"{name}={self._setting(arguments, name, default)}"
        return batch, bucket

    def _pad(self, arguments: dict, batch: int, bucket: int) -> None:
        if isinstance(arguments.get("inputs"), torch.Tensor):
            arguments["inputs"] = pad_rows(arguments["inputs"], bucket)
        model_kwargs = arguments.setdefault("kwargs", {})
        for name in PADDABLE:
            if isinstance(model_kwargs.get(name), torch.Tensor):
                model_kwargs[name] = pad_rows(model_kwargs[name], bucket)
        from transformers import StoppingCriteriaList

        criteria = list(arguments.get("stopping_criteria") or [])
        arguments["stopping_criteria"] = StoppingCriteriaList([*criteria, padding_rows_done(batch)])
