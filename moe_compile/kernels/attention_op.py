"""`torch.ops.moe_compile.gqa_decode_attention`: one query token per sequence, grouped query heads, a KV cache.

query [B, Hkv, G, D] (the G query heads of each kv head as G rows), key [B, Hkv, L, D], value [B, Hkv, L, Dv],
mask [B, L] bool (True: attend) or None -> [B, Hkv, G, Dv]. The op is pure and opaque to tracing, so a compiled
decode step (and its CUDA graph) calls it as one node.

On a CUDA device with Triton it runs the split-KV kernel (`kernels/triton/decode_attention.py`): every SM gets part
of the cache and masked cache slots are not read. Elsewhere, and for inputs the kernel does not take (head dims past
MAX_HEAD_DIM, non-contiguous head dims, additive masks), it runs `reference_decode_attention`: SDPA on the same folded
shapes, which the tests and the kernel's checks compare against.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger("moe_compile")

try:  # the kernel needs Triton and a CUDA device; its absence leaves the reference
    from moe_compile.kernels.triton import decode_attention as _triton_kernel
except ImportError as exc:
    _triton_kernel = None
    log.debug("gqa_decode_attention: the Triton kernel is unavailable (%s); SDPA runs instead", exc)

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 256  # the kernel holds a [32 keys, head dim] tile of keys and of values in registers


def reference_decode_attention(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor],
                               scale: float) -> Tensor:
    """SDPA on the folded shapes: the G rows of a kv head attend to its keys; mask [B, L] broadcasts over them."""
    attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, L]
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)


def kernel_takes(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor]) -> bool:
    """Whether the Triton kernel runs these inputs (else the reference does)."""
    if _triton_kernel is None or not query.is_cuda or query.dtype not in KERNEL_DTYPES:
        return False
    if max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM or key.shape[-1] != query.shape[-1]:
        return False
    if any(t.stride(-1) != 1 for t in (query, key, value)) or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    return mask is None or mask.dtype == torch.bool


@torch.library.custom_op("moe_compile::gqa_decode_attention", mutates_args=())
def gqa_decode_attention(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    """query [B, Hkv, G, D], key [B, Hkv, L, D], value [B, Hkv, L, Dv], mask [B, L] bool or None -> [B, Hkv, G, Dv]."""
    if kernel_takes(query, key, value, mask):
        return _triton_kernel.decode_attention(query, key, value, mask, scale)
    return reference_decode_attention(query, key, value, mask, scale).contiguous()


@gqa_decode_attention.register_fake
def _gqa_decode_attention_fake(query, key, value, mask, scale):
    return query.new_empty(*query.shape[:-1], value.shape[-1])
