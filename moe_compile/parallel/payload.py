"""Routed rows as one all-to-all payload: a 16-byte head (the row's expert slot on the receiving rank and its
routing weight) followed by the hidden vector, in the activation dtype.

Sending the slot and the weight with the row lets the receiving rank run its experts with the weight applied in
fp32 inside the grouped GEMM's epilogue (as the single-GPU kernel does) and needs no separate metadata exchange.
The head is bits, not values: an int32 slot and the fp32 weight's bits, viewed through the payload's dtype;
all-to-all moves bytes, so they arrive intact.

Layout of one row, W = payload width in elements: [ head: 16 bytes | x: H elements | pad to a 16-byte multiple ].
Dimension legend: n = rows, H = hidden, W = payload width.
"""

from __future__ import annotations

import torch
from torch import Tensor

HEAD_BYTES = 16  # int32 slot, fp32 weight bits, 8 bytes spare: keeps x 16-byte aligned for vector loads


def head_columns(dtype: torch.dtype) -> int:
    return HEAD_BYTES // torch.empty((), dtype=dtype).element_size()


def width(hidden: int, dtype: torch.dtype) -> int:
    """W: head + H, rounded up to whole 16-byte units so every row (and the int32 head view) stays aligned."""
    per_unit = head_columns(dtype)
    return head_columns(dtype) + -(-hidden // per_unit) * per_unit


def head(payload: Tensor) -> Tensor:
    """The int32 view [n, 4] of the head: column 0 the slot, column 1 the fp32 weight's bits."""
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
