"""Triton kernels of the packed-weight experts (`fused_moe_packed`): FP8 W8A8, 2:4 sparse, and FP8 + 2:4.

They keep the structure of `experts.py` (rows sorted by expert in BLOCK_M tiles, gate_up with the activation in
the epilogue, down with the routing weight and an fp32 atomic combine) and change what the weight tile is made of:
- FP8 (e4m3 weights, one fp32 scale per output channel; activations quantized per routed row at run time, as the
  reference does): the dot is e4m3 x e4m3 -> fp32 and the epilogue multiplies by row scale x channel scale.
  gate_up reads x already quantized (`quantize_rows_kernel`, one launch, which also zeroes the row maxima of
  inter); its epilogue writes inter in the activation dtype and adds each row's |max| to `inter_amax` with an
  atomic max. Then either the down kernel quantizes inter while loading it (prefill: the cost is shared by wide
  column tiles), or, at decode, `quantize_inter_kernel` quantizes each used row once (the in-loop quantization was
  repeated by every column-tile program and every warp: ~80% of the down kernel's instructions) and the down
  kernel reads e4m3 (A_E4M3).
- 2:4 (values [N, K/2] + one metadata nibble per group of 4 along K, `quant.sparse24`): the weights are read
  compressed (half the value bytes, plus K/8 metadata bytes a row), each group's two values as one word, and
  expanded in registers to the dense [BN, BK] tile (each value shifted to its position in a group-wide word, then
  split and interleaved by joins), which goes to one dot. Triton has no sparse tensor-core MMA (mma.sp), so the
  dot is dense: fewer bytes, no fewer FLOPs.
- SWAP_AB (decode): the dot runs transposed, w [BN, BK] x a^T [BK, BM] -> acc [BN, BM], so the wide weight tile is
  the MMA's M side: with BN >= 64 Triton emits Hopper wgmma (native e4m3 operands from shared memory) instead of
  mma.sync m16n8k16 at BM = 16, where e4m3 operands are first converted to fp16 in registers.
Every kernel reads its sizes from device memory only (tile experts, sorted rows): no host synchronisation, so a
CUDA graph captures them and stays correct when the routing changes.

Dimension legend: T = tokens, K = top_k, N = T*K routed rows, E = experts, H = hidden, I = intermediate,
P = padded slots, BM/BN/BK = tile sizes (BK counts dense K positions; a 2:4 tile reads BK/2 values, BK/8 metadata
bytes a row), G = BK/4 groups of 4 along K.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_compile.kernels.triton.experts import _act, _gated_act, _tile_coords

E4M3_MAX = tl.constexpr(448.0)
MIN_SCALE = tl.constexpr(1e-12)  # quant.fp8.MIN_SCALE: all-zero rows get this scale instead of a division by zero


@triton.jit
def _row_scale(amax):
    """Per-row amax (fp32) -> the e4m3 scale of `quant.fp8.quantize_per_token`."""
    return tl.maximum(amax / E4M3_MAX, MIN_SCALE)


@triton.jit
def _to_e4m3(v, scale):
    """fp32 tile [R, C] / scale [R] -> e4m3, rounded to nearest even and clamped like the reference."""
    return tl.minimum(tl.maximum(v / scale[:, None], -E4M3_MAX), E4M3_MAX).to(tl.float8e4nv)


@triton.jit
def quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr, C, stride_x, stride_q, zero_n, zero_per_row,
    BLOCK: tl.constexpr, ZERO_BLOCK: tl.constexpr,
):
    """One program per row: x [R, C] -> q [R, C] e4m3 and scale [R] fp32 (amax / 448); it also zeroes its share
    (zero_per_row entries) of zero_ptr [zero_n] fp32, the row maxima that the gate_up kernel fills next."""
    row = tl.program_id(0)
    zero_end = tl.minimum((row + 1) * zero_per_row, zero_n)
    for z0 in range(row * zero_per_row, zero_end, ZERO_BLOCK):
        z = z0 + tl.arange(0, ZERO_BLOCK)
        tl.store(zero_ptr + z, tl.zeros([ZERO_BLOCK], dtype=tl.float32), mask=z < zero_end)
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    x_row = x_ptr + row.to(tl.int64) * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, C, BLOCK):
        v = tl.load(x_row + c0 + cols, mask=c0 + cols < C, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = _row_scale(tl.max(amax, axis=0))
    tl.store(scale_ptr + row, scale)
    q_row = q_ptr + row.to(tl.int64) * stride_q
    for c0 in range(0, C, BLOCK):
        ok = c0 + cols < C
        v = tl.load(x_row + c0 + cols, mask=ok, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(v / scale, -E4M3_MAX), E4M3_MAX).to(tl.float8e4nv)
        tl.store(q_row + c0 + cols, q, mask=ok)


@triton.jit
def quantize_inter_kernel(
    inter_ptr, inter_amax_ptr, q_ptr, sorted_rows_ptr, tile_expert_ptr, N, I, stride_inter, stride_q,
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per (slot tile, BLOCK columns): inter [P, I] -> q [P, I] e4m3 with each row's scale
    inter_amax / 448 (the scale the down kernel multiplies back); pad slots and unused tiles are left unwritten."""
    tile_m = tl.program_id(0)
    if tl.load(tile_expert_ptr + tile_m) < 0:  # past the last used slot
        return
    slots = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row_ok = tl.load(sorted_rows_ptr + slots) < N
    scale = _row_scale(tl.load(inter_amax_ptr + slots, mask=row_ok, other=0.0))  # [BM]
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = row_ok[:, None] & (cols < I)[None, :]
    v = tl.load(inter_ptr + slots[:, None].to(tl.int64) * stride_inter + cols[None, :], mask=ok, other=0.0)
    tl.store(q_ptr + slots[:, None].to(tl.int64) * stride_q + cols[None, :], _to_e4m3(v.to(tl.float32), scale),
             mask=ok)


@triton.jit
def _dense_tile(w_rows, k0, K, col_ok, BLOCK_K: tl.constexpr):
    """The [BN, BK] weight tile at dense positions k0..k0+BK of the columns whose rows start at w_rows [BN]."""
    kk = k0 + tl.arange(0, BLOCK_K)  # [BK]
    return tl.load(w_rows[:, None] + kk[None, :], mask=col_ok[:, None] & (kk < K)[None, :], other=0.0)


@triton.jit
def _sparse_tile(pair_rows, meta_rows, k0, K, meta_k, col_ok, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 W_BITS: tl.constexpr, W_DTYPE: tl.constexpr):
    """The dense [BN, BK] weight tile at positions k0..k0+BK (k0 a multiple of BK), expanded from the 2:4 groups of
    the columns whose rows start at pair_rows [BN] (values read as one word per group: int32 for two 16-bit
    values, int16 for two e4m3) and meta_rows [BN] (uint8 [meta_k] a row, group 2b in the low nibble of byte b;
    nibble = i0 | i1 << 2 with i0 < i1, so 6 valid nibbles). Selected on the bit patterns (0 is +0.0 in bf16,
    fp16 and e4m3); zeros past K and for masked columns."""
    G: tl.constexpr = BLOCK_K // 4
    grp = tl.multiple_of(k0 // 4, G) + tl.arange(0, G)  # [G] group index along K
    pairs = tl.load(pair_rows[:, None] + grp[None, :], mask=col_ok[:, None] & (grp < K // 4)[None, :],
                    other=0)  # [BN, G]
    byte = tl.multiple_of(k0 // 8, G // 2) + tl.arange(0, G // 2)  # [G/2] metadata bytes
    meta = tl.load(meta_rows[:, None] + byte[None, :], mask=col_ok[:, None] & (byte < meta_k)[None, :],
                   other=0).to(tl.int32)  # [BN, G/2]
    nib = tl.reshape(tl.join(meta & 0xF, meta >> 4), [BLOCK_N, G])  # [BN, G]
    i0 = nib & 0x3  # position of the group's first kept value
    i1 = nib >> 2  # ... and of its second (i0 < i1)
    if W_BITS == 16:  # the group as one 64-bit word, 16 bits a position: first << 16 i0 | second << 16 i1
        word = pairs.to(tl.uint32, bitcast=True).to(tl.uint64)
        group = ((word & 0xFFFF) << (16 * i0).to(tl.uint64)) | ((word >> 16) << (16 * i1).to(tl.uint64))
        d0 = group.to(tl.int16)  # [BN, G] the weight at position 0 of each group, ...
        d1 = (group >> 16).to(tl.int16)
        d2 = (group >> 32).to(tl.int16)
        d3 = (group >> 48).to(tl.int16)
    else:  # 8 bits a position in one 32-bit word
        word = pairs.to(tl.uint16, bitcast=True).to(tl.uint32)
        group = ((word & 0xFF) << (8 * i0).to(tl.uint32)) | ((word >> 8) << (8 * i1).to(tl.uint32))
        d0 = group.to(tl.int8)
        d1 = (group >> 8).to(tl.int8)
        d2 = (group >> 16).to(tl.int8)
        d3 = (group >> 24).to(tl.int8)
    # [BN, G, 2 (d0 d2 | d1 d3), 2] -> [BN, BK]: element (g, i, j) is position 2i + j of group g
    dense = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), [BLOCK_N, BLOCK_K])
    return dense.to(W_DTYPE, bitcast=True)


@triton.jit
def _weight_tile(w_rows, m_rows, k0, K, meta_k, col_ok, SPARSE: tl.constexpr, W_BITS: tl.constexpr,
                 W_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BN, BK] weights at dense positions k0..k0+BK: read as stored, or expanded from 2:4."""
    if SPARSE:
        w = _sparse_tile(w_rows, m_rows, k0, K, meta_k, col_ok, BLOCK_N, BLOCK_K, W_BITS, W_DTYPE)
    else:
        w = _dense_tile(w_rows, k0, K, col_ok, BLOCK_K)
    return w


@triton.jit
def _mma(a, w, acc, SWAP_AB: tl.constexpr):
    """acc + a [BM, BK] x w [BN, BK]^T: acc [BM, BN], or with SWAP_AB acc [BN, BM] = w x a^T (the weight tile on
    the MMA's M side, for wgmma at BM < 64)."""
    if SWAP_AB:
        acc = tl.dot(w, tl.trans(a), acc)
    else:
        acc = tl.dot(a, tl.trans(w), acc)
    return acc


@triton.jit
def _acc_zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr):
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    return acc


@triton.jit
def _acc_rows(acc, SWAP_AB: tl.constexpr):
    """The accumulator as [BM, BN] (a transposed view with SWAP_AB: no data moves)."""
    if SWAP_AB:
        acc = tl.trans(acc)
    return acc


@triton.jit
def packed_gate_up_kernel(
    x_ptr, x_scale_ptr, w13_ptr, w13_scale_ptr, w13_meta_ptr, b13_ptr, topk_w_ptr, sorted_rows_ptr, tile_expert_ptr,
    inter_ptr, inter_amax_ptr,
    N, H, I, num_tiles, meta_k,
    stride_xt, stride_we, stride_wn, stride_se, stride_me, stride_mn, stride_be, stride_inter,
    alpha, limit,
    TOP_K: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_INPUT: tl.constexpr, ACT: tl.constexpr,
    FP8: tl.constexpr, SPARSE: tl.constexpr, W_BITS: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """experts.gate_up_kernel with packed w13 [E, 2I or I, H (H/2 with 2:4)]. FP8: x is e4m3 [T, H] with
    x_scale [T], w13_scale [E, 2I]; writes inter [P, I] in its dtype and atomically maxes |inter| rows into
    inter_amax [P] (zeroed before)."""
    tile_m, tile_n = _tile_coords(tl.program_id(0), num_tiles, tl.cdiv(I, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ptr + tile_m).to(tl.int64)
    if expert < 0:  # past the last used slot
        return
    slots = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rows = tl.load(sorted_rows_ptr + slots)  # [BM] routed row, N for a pad slot
    row_ok = rows < N
    tokens = (rows // TOP_K).to(tl.int64)  # [BM]
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] intermediate columns
    col_ok = cols < I
    kk = tl.arange(0, BLOCK_K)  # [BK]
    x_ptrs = (x_ptr + tokens * stride_xt)[:, None] + kk[None, :]  # [BM, BK]
    g_rows = w13_ptr + expert * stride_we + cols.to(tl.int64) * stride_wn  # [BN] gate rows
    u_rows = g_rows + I * stride_wn  # up rows follow the I gate rows
    gm_rows = w13_meta_ptr + expert * stride_me + cols.to(tl.int64) * stride_mn  # [BN] (2:4 only)
    um_rows = gm_rows + I * stride_mn
    w_dtype = tl.float8e4nv if FP8 else x_ptr.dtype.element_ty
    if SCALE_INPUT:  # Llama4: the routing weight scales the expert's input (16-bit activations only)
        route_w = tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0)  # [BM] fp32
    acc_g = _acc_zeros(BLOCK_M, BLOCK_N, SWAP_AB)  # [BM, BN] ([BN, BM] with SWAP_AB)
    acc_u = _acc_zeros(BLOCK_M, BLOCK_N, SWAP_AB)
    for k0 in range(0, H, BLOCK_K):
        a = tl.load(x_ptrs, mask=row_ok[:, None] & ((k0 + kk) < H)[None, :], other=0.0)  # [BM, BK]
        if SCALE_INPUT:
            a = (a.to(tl.float32) * route_w[:, None]).to(x_ptr.dtype.element_ty)
        w_g = _weight_tile(g_rows, gm_rows, k0, H, meta_k, col_ok, SPARSE, W_BITS, w_dtype, BLOCK_N, BLOCK_K)
        acc_g = _mma(a, w_g, acc_g, SWAP_AB)
        if GATED:
            w_u = _weight_tile(u_rows, um_rows, k0, H, meta_k, col_ok, SPARSE, W_BITS, w_dtype, BLOCK_N, BLOCK_K)
            acc_u = _mma(a, w_u, acc_u, SWAP_AB)
        x_ptrs += BLOCK_K
    acc_g = _acc_rows(acc_g, SWAP_AB)  # [BM, BN]
    acc_u = _acc_rows(acc_u, SWAP_AB)
    if FP8:  # dequantize: per-token activation scale x per-output-channel weight scale
        x_scale = tl.load(x_scale_ptr + tokens, mask=row_ok, other=0.0)[:, None]  # [BM, 1]
        s_ptrs = w13_scale_ptr + expert * stride_se + cols  # [BN]
        acc_g *= x_scale * tl.load(s_ptrs, mask=col_ok, other=0.0)[None, :]
        if GATED:
            acc_u *= x_scale * tl.load(s_ptrs + I, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        b_ptrs = b13_ptr + expert * stride_be + cols  # [BN]
        acc_g += tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_ptrs + I, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        h = _gated_act(acc_g, acc_u, alpha, limit, ACT)  # [BM, BN]
    else:
        h = _act(acc_g, alpha, ACT)
    h = h.to(inter_ptr.dtype.element_ty)
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(inter_ptr + slots[:, None].to(tl.int64) * stride_inter + cols[None, :], h, mask=ok)
    if FP8:  # the down GEMM quantizes each inter row with its amax over all I: gather it across column tiles
        row_max = tl.max(tl.where(ok, tl.abs(h.to(tl.float32)), 0.0), axis=1)  # [BM]
        tl.atomic_max(inter_amax_ptr + slots, row_max, mask=row_ok, sem="relaxed")


@triton.jit
def packed_down_kernel(
    inter_ptr, inter_amax_ptr, w2_ptr, w2_scale_ptr, w2_meta_ptr, b2_ptr, topk_w_ptr, sorted_rows_ptr,
    tile_expert_ptr, out_ptr,
    N, H, I, num_tiles, meta_k,
    stride_inter, stride_we, stride_wh, stride_se, stride_me, stride_mh, stride_be, stride_out,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_OUTPUT: tl.constexpr,
    FP8: tl.constexpr, SPARSE: tl.constexpr, W_BITS: tl.constexpr, SWAP_AB: tl.constexpr, A_E4M3: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """experts.down_kernel (atomic combine into out [T, H] fp32) with packed w2 [E, H, I (I/2 with 2:4)]. FP8:
    inter rows are e4m3 already (A_E4M3, `quantize_inter_kernel`) or quantized here on load, with scale
    inter_amax / 448 either way; w2_scale [E, H]."""
    tile_m, tile_n = _tile_coords(tl.program_id(0), num_tiles, tl.cdiv(H, BLOCK_N), GROUP_M)
    split = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile_m).to(tl.int64)
    if expert < 0:
        return
    slots = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rows = tl.load(sorted_rows_ptr + slots)  # [BM]
    row_ok = rows < N
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] hidden columns
    col_ok = cols < H
    k_span = tl.cdiv(tl.cdiv(I, BLOCK_K), SPLIT_K) * BLOCK_K  # this split's share of I, whole BK steps
    k_lo = split * k_span
    k_hi = tl.minimum(k_lo + k_span, I)
    kk = tl.arange(0, BLOCK_K)  # [BK]
    a_ptrs = (inter_ptr + slots.to(tl.int64) * stride_inter)[:, None] + (k_lo + kk)[None, :]  # [BM, BK]
    w_rows = w2_ptr + expert * stride_we + cols.to(tl.int64) * stride_wh  # [BN]
    m_rows = w2_meta_ptr + expert * stride_me + cols.to(tl.int64) * stride_mh  # [BN] (2:4 only)
    w_dtype = tl.float8e4nv if FP8 else inter_ptr.dtype.element_ty
    if FP8:
        a_scale = _row_scale(tl.load(inter_amax_ptr + slots, mask=row_ok, other=0.0))  # [BM]
    acc = _acc_zeros(BLOCK_M, BLOCK_N, SWAP_AB)  # [BM, BN] ([BN, BM] with SWAP_AB)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        # pad slots of inter were never written: mask them, garbage could be NaN
        a = tl.load(a_ptrs, mask=row_ok[:, None] & ((k0 + kk) < k_hi)[None, :], other=0.0)  # [BM, BK]
        if FP8 and not A_E4M3:
            a = _to_e4m3(a.to(tl.float32), a_scale)
        w = _weight_tile(w_rows, m_rows, k0, I, meta_k, col_ok, SPARSE, W_BITS, w_dtype, BLOCK_N, BLOCK_K)  # [BN, BK]
        acc = _mma(a, w, acc, SWAP_AB)
        a_ptrs += BLOCK_K
    acc = _acc_rows(acc, SWAP_AB)  # [BM, BN]
    if FP8:
        acc *= a_scale[:, None] * tl.load(w2_scale_ptr + expert * stride_se + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        bias = tl.load(b2_ptr + expert * stride_be + cols, mask=col_ok & (split == 0), other=0.0)  # [BN]
        acc += bias.to(tl.float32)[None, :]
    if SCALE_OUTPUT:
        acc *= tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0)[:, None]  # [BM, 1] routing weight
    tokens = (rows // TOP_K).to(tl.int64)
    tl.atomic_add(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc,
                  mask=row_ok[:, None] & col_ok[None, :], sem="relaxed")
