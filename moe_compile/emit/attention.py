"""Decode attention for grouped-query models without copying the KV cache per step.

transformers' `sdpa` attention, given a mask (a static KV cache always has one) inside a compiled graph, expands
the keys and values of the whole cache to every query head (`repeat_kv`) before SDPA: at each decode step, for
each layer, G = heads / kv_heads copies of the cache are written and read. Measured on an H100 (Qwen3-30B-A3B
shape, 48 layers, batch 64, cache 1024 tokens): the copy kernels and the attention reading them took 37 of the
59 ms of GPU time per step, where the KV bytes themselves take about 1 ms.

With one query token per sequence the G query heads of a group can be read as G query positions of one kv head:
query [B, H, 1, D] -> [B, Hkv, G, D] attends to key / value [B, Hkv, L, D] as they are, and a mask shared by the
heads ([B, 1, 1, L]) broadcasts over the G positions. Same math, no copy. On CUDA (bool or no mask, power-of-two
head dims) the folded call runs `torch.ops.moe_compile.gqa_decode_attention`, a split-KV kernel that spreads the
cache over every SM and skips slots not yet written (H100, 48-layer shape above, 530 of 1024 slots written: batch 1
11.2 µs against 40.9 µs for transformers' path, batch 64 45.1 against 1466 µs; bench_decode_attention.py).
Otherwise SDPA takes the folded shapes, except below `MIN_FOLDED_ROWS` batch x kv-head rows, where transformers'
own path is faster than an SDPA kernel with that few thread blocks. Calls with more than one query token (the
prefill), without groups, with dropout, or with extras SDPA does not take here go to transformers' own
`sdpa_attention_forward`; masks are built as for `sdpa`.

`use_gqa_decode_attention(model)` switches every config that selects `sdpa` to this function and returns an undo;
the emit step applies it with CUDA-graph decode (`result.pass_counts["gqa_decode_attention"]`: the layers).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import nn

from moe_compile.kernels.attention_op import kernel_takes

log = logging.getLogger("moe_compile")

NAME = "moe_compile_sdpa"
# Without the kernel (CPU, other masks): below this many (batch x kv-head) rows the folded SDPA call has too few
# thread blocks to beat transformers' copy: on an H100 (48-layer Qwen3-30B-A3B shape, batch 1, 4 kv heads, 1024-slot
# cache) folded SDPA took 23.6 µs a layer, the copy path 8.0 µs of attention plus ~9 µs of copies.
MIN_FOLDED_ROWS = 8
DELEGATED_KWARGS = ("position_bias", "softcap", "s_aux", "sinks")  # what only transformers' sdpa path handles


def gqa_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                       is_causal: Optional[bool] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [B, H, Q, D], key / value [B, Hkv, L, D(v)], mask
    [B, 1 or H, Q, >=L] (bool or additive) -> (output [B, Q, H, Dv], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    batch, heads, q_len, _ = query.shape
    kv_heads = heads // groups
    if q_len != 1 or groups <= 1 or dropout or any(kwargs.get(k) is not None for k in DELEGATED_KWARGS):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    folded = query.reshape(batch, kv_heads, groups, query.shape[-1])  # [B, Hkv, G, D]: the group as positions
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]  # [B, 1 or H, 1, L]
    key_mask = _key_mask(mask, batch)
    if key_mask is not False and kernel_takes(folded, key, value, key_mask):
        scale = scaling if scaling is not None else folded.shape[-1] ** -0.5
        out = torch.ops.moe_compile.gqa_decode_attention(folded, key, value, key_mask, scale)  # [B, Hkv, G, Dv]
    elif batch * kv_heads < MIN_FOLDED_ROWS:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    else:
        if mask is not None and mask.shape[1] != 1:
            mask = mask.reshape(mask.shape[0], kv_heads, groups, mask.shape[-1])  # per-head: [B, Hkv, G, L]
        out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    out = out.reshape(out.shape[0], heads, 1, value.shape[-1])  # back to [B, H, 1, Dv]
    return out.transpose(1, 2).contiguous(), None  # [B, 1, H, Dv]


def _key_mask(mask: Optional[torch.Tensor], batch: int):
    """A mask shared by the heads, [B or 1, 1, 1, L] bool, as [B, L] (None for no mask); False for any other form
    (additive, per head), which SDPA takes instead of the kernel."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.shape[1] != 1 or mask.shape[2] != 1:
        return False
    return mask[:, 0, 0, :].expand(batch, mask.shape[-1])


def register() -> bool:
    """Register the attention function (and sdpa's mask builder under its name); False where this transformers
    has no attention interface."""
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(NAME, gqa_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return True


def _grouped_attention_layers(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if int(getattr(m, "num_key_value_groups", 1) or 1) > 1
               and hasattr(m, "config"))


def gqa_layers_served(model: nn.Module) -> int:
    """The grouped-query attention layers `use_gqa_decode_attention` would switch (0: none; changes nothing)."""
    has_sdpa = any(getattr(c, "_attn_implementation", None) == "sdpa" for c in _configs(model))
    return _grouped_attention_layers(model) if has_sdpa else 0


def use_gqa_decode_attention(model: nn.Module) -> tuple[int, Callable[[], None]]:
    """Switch the model's `sdpa` attention to `gqa_sdpa_attention`: (grouped-query attention layers it serves,
    undo). Nothing changes (0 layers) for eager / flash / flex attention, or a model without grouped queries."""
    layers = _grouped_attention_layers(model)
    configs = {id(c): c for c in _configs(model) if getattr(c, "_attn_implementation", None) == "sdpa"}
    if not layers or not configs or not register():
        return 0, lambda: None
    for config in configs.values():
        config._attn_implementation = NAME

    def undo() -> None:
        for config in configs.values():
            if config._attn_implementation == NAME:
                config._attn_implementation = "sdpa"

    log.info("moe_compile: decode attention reads the KV cache once per step (%d grouped-query layers)", layers)
    return layers, undo


def _configs(model: nn.Module) -> list:
    """The configs the model's modules read their attention implementation from (each once)."""
    found = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            found[id(config)] = config
    return list(found.values())
