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

from moe_compile.quant.chunks import row_chunks

GROUP = 4
KEEP = 2


def _check_k(k: int) -> None:
    if k % GROUP:
        raise ValueError(f"2:4 sparsity needs the reduction dim to be a multiple of 4, got {k}")


def kept_positions(w: Tensor) -> Tensor:
    """[..., K/4, 2] int64: the positions (ascending) of the 2 largest |w| in every group of 4 along the last dim."""
    _check_k(w.shape[-1])
    groups = w.detach().abs().float().reshape(*w.shape[:-1], -1, GROUP)  # [..., K/4, 4]
    return groups.topk(KEEP, dim=-1).indices.sort(dim=-1).values  # [..., K/4, 2]


def mask_24(w: Tensor) -> Tensor:
    """Boolean mask [..., K] keeping the 2 largest |w| of every group of 4 along the last dim."""
    keep = kept_positions(w)  # [..., K/4, 2]
    mask = torch.zeros(*keep.shape[:-1], GROUP, dtype=torch.bool, device=w.device).scatter_(-1, keep, True)
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
    _check_k(k)
    values = torch.empty(*w.shape[:-1], k // 2, dtype=w.dtype, device=w.device)
    meta = torch.empty(*w.shape[:-1], -(-k // 8), dtype=torch.uint8, device=w.device)
    rows_w, rows_v, rows_m = w.detach().reshape(-1, k), values.view(-1, k // 2), meta.view(-1, meta.shape[-1])
    for rows in row_chunks(rows_w.shape[0], k):  # bounded temporaries (fp32 magnitudes, int64 positions)
        rows_v[rows], rows_m[rows] = _compress_rows(rows_w[rows])
    return values, meta


def _compress_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """compress_24 of w [N, K]."""
    idx = kept_positions(w)  # [N, G, 2]
    values = w.reshape(w.shape[0], -1, GROUP).gather(-1, idx).reshape(w.shape[0], -1)  # [N, K/2]
    nibble = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # [N, G]
    if nibble.shape[-1] % 2:
        nibble = torch.nn.functional.pad(nibble, (0, 1))
    return values, nibble[..., 0::2] | (nibble[..., 1::2] << 4)  # [N, K/2], [N, ceil(G/2)]


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
