"""Tile configurations of the expert GEMMs, picked by shape on the host (no autotuning: nothing to time at
capture, the same config for the same shape every call).

Three regimes, told apart by the average routed rows per expert (N / E, balanced routing assumed):
- GEMV decode (<= GEMV_MAX_ROWS_PER_EXPERT rows per expert, off by default: see there): tiles of 1-8 rows, fp32
  FMA kernels that stream the weights without tensor cores (`experts.gate_up_gemv_kernel`).
- tensor-core decode (<= 16 rows per expert): each weight byte is read once and the time is bytes / bandwidth.
  BLOCK_M = 16 (the smallest tensor-core tile); column tiles and split-K are chosen so that at least ~4 programs
  per SM stream weights at once, since with 1 token only K experts have work (Qwen3: 8 tiles).
- prefill (> 48 rows per expert): tensor-core bound; BLOCK_M = 32 in between keeps padding low.

Dimension legend: N = T*K routed rows, E = experts, H = hidden, I = intermediate.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton

# At least this many programs in flight per SM keep enough loads outstanding to reach copy bandwidth on a
# memory-bound GEMM (an H100 SM holds ~2-4 of these 4-warp programs at once).
PROGRAMS_PER_SM = 4
# GEMV decode kernels (no tensor cores) up to this many routed rows per expert (balanced routing assumed), tiles
# of the next power of two rows; their programs are small, so more of them per SM. Off (0): on an H100 they were
# no faster than the tensor-core decode kernels at 1 row per expert (Qwen3 1 token: gate_up 24.5 vs 23.8 us,
# down 16.7 vs 17.6; DeepSeek-V3: 174.8 vs 200.9, 84.0 vs 87.0) and slower from 8 tokens on (Qwen3 32 tokens:
# 353 vs 226 us); benchmarks/NOTES.md, version 3. Kept selectable (gemv_config) for the sweep.
GEMV_MAX_ROWS_PER_EXPERT = 0
GEMV_PROGRAMS_PER_SM = 8


@dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1


@dataclass(frozen=True)
class MoEConfig:
    block_m: int
    gate_up: GemmConfig
    down: GemmConfig
    group_m: int  # slot tiles that share an L2 window (prefill reuse); 1 at decode
    atomic_combine: bool  # down adds into [T, H] fp32 with atomics; else writes [N, H] and sums over K
    gemv: bool = False  # decode kernels without tensor cores (experts.gate_up_gemv_kernel); needs atomic_combine


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():  # Triton's CPU interpreter: an H100's count, so configs match the GPU
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def expected_tiles(num_rows: int, num_experts: int, block_m: int) -> float:
    """Tiles used by balanced random routing: each expert that gets rows takes at least one tile."""
    active = num_experts * (1.0 - (1.0 - 1.0 / num_experts) ** num_rows)
    return max(active, num_rows / block_m)


def _decode_n(columns: int, tiles: float, sms: int) -> int:
    """Largest column tile (64 down to 16) that still gives PROGRAMS_PER_SM programs per SM."""
    for block_n in (64, 32):
        if tiles * triton.cdiv(columns, block_n) >= PROGRAMS_PER_SM * sms:
            return block_n
    return 16


def split_k(columns: int, depth: int, block_n: int, block_k: int, tiles: float, sms: int) -> int:
    """Split the reduction of the down GEMM when there are too few (tile, column tile) programs; every split
    adds one more fp32 atomic per output element, so only as far as needed and never below 2 BK steps each."""
    programs = tiles * triton.cdiv(columns, block_n)
    wanted = math.ceil(PROGRAMS_PER_SM * sms / programs)
    return max(1, min(wanted, depth // (2 * block_k), 16))


def _gemv_n(columns: int, tiles: float, sms: int, block_m: int, block_k: int, num_warps: int) -> int:
    """Column slice of a GEMV program: as wide as the fp32 accumulator allows (BM x BN x BK <= 32 values a
    thread), but no wider than keeps GEMV_PROGRAMS_PER_SM programs per SM."""
    widest = max(1, 32 * 32 * num_warps // (block_m * block_k))
    block_n = min(widest, 32)
    while block_n > 2 and tiles * triton.cdiv(columns, block_n) < GEMV_PROGRAMS_PER_SM * sms:
        block_n //= 2
    return block_n


def gemv_config(num_rows: int, num_experts: int, hidden: int, inter: int, device_index: int,
                block_m: int) -> MoEConfig:
    sms = num_sms(device_index)
    tiles = expected_tiles(num_rows, num_experts, block_m)
    bk = 256
    gate_up = GemmConfig(_gemv_n(inter, tiles, sms, block_m, bk, 4), bk, 4, 1)
    down = GemmConfig(_gemv_n(hidden, tiles, sms, block_m, bk, 4), bk, 4, 1)
    return MoEConfig(block_m, gate_up, down, group_m=1, atomic_combine=True, gemv=True)


def select_config(num_rows: int, num_experts: int, hidden: int, inter: int, device_index: int,
                  allow_gemv: bool = True) -> MoEConfig:
    sms = num_sms(device_index)
    rows_per_expert = num_rows / num_experts
    if allow_gemv and rows_per_expert <= GEMV_MAX_ROWS_PER_EXPERT:
        block_m = 1
        while block_m < rows_per_expert:
            block_m *= 2
        return gemv_config(num_rows, num_experts, hidden, inter, device_index, block_m)
    if rows_per_expert <= 16:
        tiles = expected_tiles(num_rows, num_experts, 16)
        # BK = 128: 16 rows x 128 x 2 B = 4 KB of x and 4-8 KB of weights a stage; 4 stages keep ~40 KB
        # of loads in flight per program, plenty to cover DRAM latency at decode
        gate_up = GemmConfig(_decode_n(inter, tiles, sms), 128, 4, 4)
        down_n = _decode_n(hidden, tiles, sms)
        down = GemmConfig(down_n, 128, 4, 4, split_k(hidden, inter, down_n, 128, tiles, sms))
        return MoEConfig(16, gate_up, down, group_m=1, atomic_combine=True)
    if rows_per_expert <= 48:
        # 32-64 rows a tile: still mostly weight streaming; 64-wide columns, 4 warps
        return MoEConfig(32, GemmConfig(64, 128, 4, 4), GemmConfig(64, 128, 4, 4), group_m=4, atomic_combine=True)
    # prefill: 128 x 128 (x2 for gate and up) accumulators over 8 warps; BK = 64 with 4 stages = 4 x 48 KB of
    # shared memory. Swept on H100 (benchmarks/NOTES.md): BLOCK_M = 128 beat 64 from 64 rows per expert up
    # (Qwen3 2048 tokens: gate_up 358 vs 391 us; DeepSeek-V3 2048: 5.58 vs 5.97 ms)
    return MoEConfig(128, GemmConfig(128, 64, 8, 4), GemmConfig(128, 64, 8, 3), group_m=8, atomic_combine=True)
