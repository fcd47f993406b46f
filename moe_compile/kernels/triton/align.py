"""Sort routed rows by expert on the device, padded so that every BLOCK_M tile of slots holds one expert's rows.

No host synchronisation, buffers sized for the worst case. Many rows: three launches: count rows per expert
(atomics), round each count up to BLOCK_M and prefix-sum the rounded counts into each expert's first slot, then
give every routed row a slot through one atomic cursor per expert. Few rows (decode): the same in one program.
Pad slots hold the sentinel N so the GEMMs mask them; tiles past
the last used slot get expert -1 and their programs exit at once. Order inside an expert is arbitrary (atomics):
every row's result is independent of its slot.

Dimension legend: T = tokens, K = top_k, N = T*K routed rows (row r = token r // K, choice r % K), E = experts,
BM = BLOCK_M slots per tile, B = max_tiles, P = B * BM slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Rows per program of the count and scatter passes: one element per thread at 4 warps; the passes are a few
# microseconds even at N = 64K, so nothing to tune.
ROW_CHUNK = 128
# Elements of the 2-D temporaries in the prefix pass ([tiles or pad slots] x experts): keeps them in registers
# for any E (E = 512 gives 8 x 512).
PREFIX_TILE_ELEMS = 4096
# Up to this many routed rows the whole alignment runs in one program (`_align_small_kernel`): 2 x N / CHUNK
# serial steps against a memset and three launches. H100, Qwen3 shape, graph replay: N = 8: 7.4 vs 10.7 us;
# N = 64: 9.5 vs 11.2; N = 256: 21.2 vs 14.8 (benchmarks/NOTES.md, version 3).
SMALL_ROWS = 64


def max_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Worst-case number of BLOCK_M tiles: an expert with c rows takes ceil(c / BM) <= (c + BM - 1) / BM tiles,
    and at most min(E, N) experts get rows, so tiles <= (N + min(E, N) * (BM - 1)) / BM. Never more than the
    design's T*K + E*(BM-1) rows, and far fewer at decode (T=1, K=8, E=128, BM=16: 8 tiles, not 120)."""
    return (num_rows + min(num_experts, num_rows) * (block_m - 1)) // block_m


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, N, CHUNK: tl.constexpr):
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)  # [CHUNK] routed rows
    ok = offs < N
    ids = tl.load(ids_ptr + offs, mask=ok, other=0)
    tl.atomic_add(counts_ptr + ids, 1, mask=ok, sem="relaxed")


@triton.jit
def _pads_and_tiles(counts, e, e_ok, sorted_rows_ptr, tile_expert_ptr, N, num_tiles,
                    BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, PAD_CHUNK: tl.constexpr, TILE_CHUNK: tl.constexpr):
    """Counts [E_POW2] -> each expert's first slot [E_POW2]; writes the pad sentinels and every tile's expert."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [E_POW2] slots each expert owns
    end = tl.cumsum(padded, axis=0)  # [E_POW2] one past each expert's last slot
    start = end - padded
    total = tl.sum(padded, axis=0)
    # the pad slots of each expert (after its rows, before the next expert) get the sentinel N
    sentinel = tl.zeros([E_POW2, PAD_CHUNK], dtype=tl.int32) + N
    for p0 in range(0, BLOCK_M, PAD_CHUNK):
        slot = start[:, None] + counts[:, None] + p0 + tl.arange(0, PAD_CHUNK)[None, :]  # [E_POW2, PAD_CHUNK]
        tl.store(sorted_rows_ptr + slot, sentinel, mask=(slot < end[:, None]) & e_ok[:, None])
    # a tile's expert is the number of experts that end at or before the tile's first slot
    for b0 in range(0, num_tiles, TILE_CHUNK):
        tile = b0 + tl.arange(0, TILE_CHUNK)  # [TILE_CHUNK]
        first = tile * BLOCK_M
        ended = (end[None, :] <= first[:, None]) & e_ok[None, :]  # [TILE_CHUNK, E_POW2]
        expert = tl.sum(ended.to(tl.int32), axis=1)
        expert = tl.where(first < total, expert, -1)
        tl.store(tile_expert_ptr + tile, expert, mask=tile < num_tiles)
    return start


@triton.jit
def _prefix_kernel(
    counts_ptr, cursor_ptr, sorted_rows_ptr, tile_expert_ptr, N, E, num_tiles,
    BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, PAD_CHUNK: tl.constexpr, TILE_CHUNK: tl.constexpr,
):
    e = tl.arange(0, E_POW2)
    e_ok = e < E
    counts = tl.load(counts_ptr + e, mask=e_ok, other=0)  # [E_POW2]
    start = _pads_and_tiles(counts, e, e_ok, sorted_rows_ptr, tile_expert_ptr, N, num_tiles,
                            BLOCK_M, E_POW2, PAD_CHUNK, TILE_CHUNK)
    tl.store(cursor_ptr + e, start, mask=e_ok)


@triton.jit
def _align_small_kernel(
    ids_ptr, sorted_rows_ptr, tile_expert_ptr, N, E, num_tiles,
    BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr, PAD_CHUNK: tl.constexpr,
    TILE_CHUNK: tl.constexpr,
):
    """All of align_by_expert in one program, for few rows: counts by one-hot sums over CHUNK rows at a time,
    then each row's slot = its expert's first slot + rows of that expert before it (earlier chunks: a running
    count per expert; this chunk: a CHUNK x CHUNK comparison). Rows of an expert keep their order."""
    e = tl.arange(0, E_POW2)
    e_ok = e < E
    c = tl.arange(0, CHUNK)
    counts = tl.zeros([E_POW2], dtype=tl.int32)
    for r0 in range(0, N, CHUNK):
        ids = tl.load(ids_ptr + r0 + c, mask=r0 + c < N, other=-1).to(tl.int32)  # [CHUNK]
        counts += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
    running = _pads_and_tiles(counts, e, e_ok, sorted_rows_ptr, tile_expert_ptr, N, num_tiles,
                              BLOCK_M, E_POW2, PAD_CHUNK, TILE_CHUNK)  # [E_POW2] next free slot
    earlier = c[None, :] < c[:, None]  # [CHUNK, CHUNK] column row comes before row row
    for r0 in range(0, N, CHUNK):
        ok = r0 + c < N
        ids = tl.load(ids_ptr + r0 + c, mask=ok, other=-1).to(tl.int32)  # [CHUNK]
        onehot = ids[:, None] == e[None, :]  # [CHUNK, E_POW2]
        base = tl.sum(tl.where(onehot, running[None, :], 0), axis=1)  # [CHUNK]
        rank = tl.sum(((ids[None, :] == ids[:, None]) & earlier).to(tl.int32), axis=1)
        tl.store(sorted_rows_ptr + base + rank, r0 + c, mask=ok)
        running += tl.sum(onehot.to(tl.int32), axis=0)


@triton.jit
def _scatter_kernel(ids_ptr, cursor_ptr, sorted_rows_ptr, N, CHUNK: tl.constexpr):
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)  # [CHUNK] routed rows
    ok = offs < N
    ids = tl.load(ids_ptr + offs, mask=ok, other=0)
    slot = tl.atomic_add(cursor_ptr + ids, 1, mask=ok, sem="relaxed")  # each row its own slot
    tl.store(sorted_rows_ptr + slot, offs, mask=ok)


def align_by_expert(
    ids: Tensor, num_experts: int, block_m: int, allow_small: bool = True
) -> tuple[Tensor, Tensor, int]:
    """Routed expert ids [T, K] -> (sorted_rows [P] int32, tile_expert [B] int32, B).

    sorted_rows[s] is the routed row (t*K + k) in slot s, or N for a pad slot; slots [b*BM, (b+1)*BM) all belong
    to expert tile_expert[b], or to none when it is -1 (then sorted_rows there is never read). Tile b's slots of
    one expert are contiguous, experts in ascending order. Up to SMALL_ROWS routed rows: one launch (decode);
    more (or allow_small=False): a memset and three launches.
    """
    n = ids.numel()
    num_tiles = max_tiles(n, num_experts, block_m)
    flat = ids.reshape(-1)  # [N]
    sorted_rows = torch.empty(num_tiles * block_m, dtype=torch.int32, device=ids.device)  # [P]
    tile_expert = torch.empty(num_tiles, dtype=torch.int32, device=ids.device)  # [B]
    e_pow2 = triton.next_power_of_2(num_experts)
    chunks = dict(PAD_CHUNK=max(1, min(block_m, PREFIX_TILE_ELEMS // e_pow2)),
                  TILE_CHUNK=max(16, PREFIX_TILE_ELEMS // e_pow2))
    if allow_small and n <= SMALL_ROWS:
        _align_small_kernel[(1,)](
            flat, sorted_rows, tile_expert, n, num_experts, num_tiles, BLOCK_M=block_m, E_POW2=e_pow2,
            CHUNK=max(16, min(128, PREFIX_TILE_ELEMS // e_pow2)), **chunks, num_warps=8,
        )
        return sorted_rows, tile_expert, num_tiles
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)  # [E]
    cursor = torch.empty(num_experts, dtype=torch.int32, device=ids.device)  # [E]
    grid = (triton.cdiv(n, ROW_CHUNK),)
    _count_kernel[grid](flat, counts, n, CHUNK=ROW_CHUNK)
    _prefix_kernel[(1,)](counts, cursor, sorted_rows, tile_expert, n, num_experts, num_tiles,
                         BLOCK_M=block_m, E_POW2=e_pow2, **chunks)
    _scatter_kernel[grid](flat, cursor, sorted_rows, n, CHUNK=ROW_CHUNK)
    return sorted_rows, tile_expert, num_tiles
