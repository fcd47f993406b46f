"""Routed rows as one all-to-all payload: a 16-element head (the row's expert slot on the receiving rank and its
routing weight) followed by the hidden vector, in the activation dtype.

Sending the slot and the weight with the row lets the receiving rank run its experts with the weight applied in
fp32 inside the grouped GEMM's epilogue (as the single-GPU kernel does) and needs no separate metadata exchange.
The head is bits, not values: an int32 slot and the fp32 weight's bits, viewed through the payload's dtype;
all-to-all moves bytes, so they arrive intact.

Layout of one row, W = payload width in elements: [ head: 16 elements | x: H elements | pad to a multiple of 16 ].
Dimension legend: n = rows, H = hidden, W = payload width.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The head is 16 elements (32 bytes in bf16): it holds the int32 slot and the fp32 weight bits with room to spare,
# and with H rounded up to a multiple of 16 the row stride W is a multiple of 16 elements. Triton specialises
# integer arguments on divisibility by 16, so the expert GEMMs reading x [n, H] at stride W keep their vectorised
# loads (a stride of H + 8 cost the prefill path about 2x on an H100).
ALIGN_ELEMENTS = 16


def head_columns(dtype: torch.dtype) -> int:
    return ALIGN_ELEMENTS


def width(hidden: int, dtype: torch.dtype) -> int:
    """W: the 16-element head + H rounded up to a multiple of 16 elements."""
    return ALIGN_ELEMENTS + -(-hidden // ALIGN_ELEMENTS) * ALIGN_ELEMENTS


def head(payload: Tensor) -> Tensor:
    """The int32 view of the head [n, 16 * element size / 4]: column 0 the slot, column 1 the fp32 weight's bits."""
    return payload[:, : head_columns(payload.dtype)].view(torch.int32)


def hidden_part(payload: Tensor, hidden: int) -> Tensor:
    """The rows' hidden vectors [n, H] (a strided view)."""
    start = head_columns(payload.dtype)
    return payload[:, start:start + hidden]


def pack(x_rows: Tensor, slots: Tensor, weights: Tensor) -> Tensor:
    """Rows x_rows [n, H] with their slots [n] and fp32 weights [n] -> payload [n, W] in x_rows' dtype."""
    n, hidden = x_rows.shape
    packed = torch.empty(n, width(hidden, x_rows.dtype), dtype=x_rows.dtype, device=x_rows.device)  # [n, W]
    meta = head(packed)
    meta[:, 0] = slots.to(torch.int32)
    meta[:, 1] = weights.to(torch.float32).view(torch.int32)
    hidden_part(packed, hidden).copy_(x_rows)
    return packed


def read(payload: Tensor, hidden: int) -> tuple[Tensor, Tensor, Tensor]:
    """payload [n, W] -> (x [n, H] view, slots [n] int64, weights [n] fp32)."""
    packed = head(payload)
    slots = packed[:, 0].long()
    weights = packed[:, 1].contiguous().view(torch.float32)
    return hidden_part(payload, hidden), slots, weights
