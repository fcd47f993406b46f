"""Row chunks for weight transforms: quantizing or compressing a whole MoE layer's experts at once (billions of
elements) would allocate fp32 / int64 temporaries of several times its size; a few rows at a time bounds them."""

from __future__ import annotations

from typing import Iterator

# Elements of a weight transformed at a time: a few hundred MB of temporaries, whatever the weight's size.
CHUNK_ELEMENTS = 1 << 24


def row_chunks(rows: int, width: int, elements: int = 0) -> Iterator[slice]:
    """Slices over `rows` rows of `width` elements, about `elements` (default CHUNK_ELEMENTS) elements each."""
    step = max(1, (elements or CHUNK_ELEMENTS) // max(1, width))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))
