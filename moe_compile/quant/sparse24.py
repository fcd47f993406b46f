"""2:4 semi-structured sparsity numerics: magnitude pruning along the reduction dim, compression, decompression.

In every group of 4 consecutive weights along K (the input dim, the last one) the 2 of largest magnitude are kept.
Compressed storage: `values [..., K/2]` (the kept weights in order) and `meta [..., ceil(K/8)]` uint8, where each
group contributes one nibble `i0 | i1 << 2` (i0 < i1 the kept positions, 2 bits each) and two consecutive groups
share a byte (even group in the low nibble). This is the information a sparse tensor-core kernel needs; the exact
bit layout a CUTLASS/cuSPARSELt kernel wants is a reordering of it, done when such a kernel exists.
"""

from __future__ import annotations

import torch
from torch import Tensor

GROUP = 4
KEEP = 2


def _check_k(k: int) -> None:
    if k % GROUP:
        raise ValueError(f"2:4 sparsity needs the reduction dim to be a multiple of 4, got {k}")


def mask_24(w: Tensor) -> Tensor:
    """Boolean mask [..., K] keeping the 2 largest |w| of every group of 4 along the last dim."""
    _check_k(w.shape[-1])
    groups = w.detach().abs().float().reshape(*w.shape[:-1], -1, GROUP)  # [..., K/4, 4]
    keep = groups.topk(KEEP, dim=-1).indices  # [..., K/4, 2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(w.shape)


def prune_24(w: Tensor) -> Tensor:
    """w with the 2 smallest |w| of every group of 4 along the last dim set to zero."""
    return w * mask_24(w).to(w.dtype)


def is_24_sparse(w: Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 along the last dim."""
    _check_k(w.shape[-1])
    return bool(((w.reshape(*w.shape[:-1], -1, GROUP) != 0).sum(-1) <= KEEP).all())


def compress_24(w: Tensor) -> tuple[Tensor, Tensor]:
    """Magnitude-prune w [..., K] to 2:4 and compress: (values [..., K/2] in w's dtype, meta [..., ceil(K/8)] uint8)."""
    k = w.shape[-1]
    mask = mask_24(w).reshape(*w.shape[:-1], -1, GROUP)  # [..., G, 4]
    pos = torch.arange(GROUP, device=w.device).expand_as(mask)
    idx = pos[mask].reshape(*w.shape[:-1], -1, KEEP)  # [..., G, 2] kept positions, ascending
    values = w.reshape(*w.shape[:-1], -1, GROUP).gather(-1, idx).reshape(*w.shape[:-1], k // 2)  # [..., K/2]
    nibble = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # [..., G]
    if nibble.shape[-1] % 2:
        nibble = torch.nn.functional.pad(nibble, (0, 1))
    meta = nibble[..., 0::2] | (nibble[..., 1::2] << 4)  # [..., ceil(G/2)]
    return values, meta


def metadata_indices(meta: Tensor, k: int) -> Tensor:
    """meta [..., ceil(K/8)] uint8 -> kept positions within each group [..., K/4, 2] (int64)."""
    nibble = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(*meta.shape[:-1], -1)[..., : k // GROUP]
    return torch.stack([nibble & 0x3, (nibble >> 2) & 0x3], dim=-1).long()  # [..., G, 2]


def decompress_24(values: Tensor, meta: Tensor) -> Tensor:
    """(values [..., K/2], meta) -> dense [..., K] with zeros at the pruned positions, in values' dtype.

    fp8 values are decompressed in fp32 (scatter is not defined for float8 on every device); dequantize first.
    """
    k = values.shape[-1] * 2
    _check_k(k)
    idx = metadata_indices(meta, k)  # [..., G, 2]
    dtype = values.dtype if values.dtype.is_floating_point and values.element_size() > 1 else torch.float32
    dense = torch.zeros(*values.shape[:-1], k // GROUP, GROUP, dtype=dtype, device=values.device)
    dense.scatter_(-1, idx, values.to(dtype).reshape(*values.shape[:-1], -1, KEEP))
    return dense.reshape(*values.shape[:-1], k)
