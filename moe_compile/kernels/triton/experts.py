"""The two grouped GEMMs of the experts, over rows sorted by expert (`align.align_by_expert`).

gate_up: each program takes one BLOCK_M tile of slots (one expert) and BLOCK_N intermediate columns, gathers its
tokens' rows of x, multiplies by the expert's gate rows and up rows (two accumulators, so the activation fuses in
the epilogue: no [rows, 2I] intermediate) and writes act(gate) * up to inter [P, I] in the activation dtype.
down: each program takes one tile and BLOCK_N hidden columns (and 1/SPLIT_K of I), multiplies inter by the
expert's w2, adds the bias, scales by the routing weight and adds into the fp32 output with atomics (every token
gets K contributions, and SPLIT_K partial sums each) or, without split, writes its rows for a later sum over K.

Dimension legend: T = tokens, K = top_k, N = T*K routed rows, E = experts, H = hidden, I = intermediate,
P = padded slots, BM/BN/BK = tile sizes.
"""

from __future__ import annotations

import triton
import triton.language as tl

# activation codes (constexpr in the kernels)
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "swiglu_oai": 4}


@triton.jit
def _sigmoid(v):
    # 1 / (1 + exp(-v)): exp overflows to inf for v << 0 and the result is a clean 0, never NaN
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _act(g, alpha, ACT: tl.constexpr):
    """Elementwise activation of an fp32 tile (the reference's `_act`)."""
    if ACT == 0:  # silu
        out = g * _sigmoid(g)
    elif ACT == 1:  # gelu, erf form
        out = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACT == 2:  # gelu, tanh form; tanh(y) = 2 sigmoid(2y) - 1 stays finite for any y
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        out = g * _sigmoid(2.0 * inner)
    elif ACT == 3:  # relu
        out = tl.maximum(g, 0.0)
    else:  # swiglu_oai without a gate: h * sigmoid(alpha h)
        out = g * _sigmoid(alpha * g)
    return out


@triton.jit
def _gated_act(g, u, alpha, limit, ACT: tl.constexpr):
    """act(gate) * up on fp32 tiles; GPT-OSS clamps both and uses (up + 1)."""
    if ACT == 4:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        out = (u + 1.0) * g * _sigmoid(alpha * g)
    else:
        out = _act(g, alpha, ACT) * u
    return out


@triton.jit
def _tile_coords(pid, num_tiles_m, num_tiles_n, GROUP_M: tl.constexpr):
    """Program id -> (slot tile, column tile), GROUP_M slot tiles side by side so their x rows and the expert's
    weight columns are reused from L2 (GROUP_M = 1: all column tiles of one slot tile, then the next)."""
    per_group = GROUP_M * num_tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_size
    tile_n = (pid % per_group) // group_size
    return tile_m, tile_n


@triton.jit
def gate_up_kernel(
    x_ptr, w13_ptr, b13_ptr, topk_w_ptr, sorted_rows_ptr, tile_expert_ptr, inter_ptr,
    N, H, I, num_tiles,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wk, stride_be, stride_inter,
    alpha, limit,
    TOP_K: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_INPUT: tl.constexpr,
    ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
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
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + kk[None, :] * stride_xh  # [BM, BK]
    g_ptrs = w13_ptr + expert * stride_we + cols[None, :] * stride_wn + kk[:, None] * stride_wk  # [BK, BN]
    u_ptrs = g_ptrs + I * stride_wn  # up rows follow the I gate rows
    if SCALE_INPUT:  # Llama4: the routing weight scales the expert's input
        route_w = tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0)  # [BM] fp32
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = (k0 + kk) < H  # [BK]
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        if SCALE_INPUT:
            a = (a.to(tl.float32) * route_w[:, None]).to(x_ptr.dtype.element_ty)
        w_ok = k_ok[:, None] & col_ok[None, :]
        acc_g = tl.dot(a, tl.load(g_ptrs, mask=w_ok, other=0.0), acc_g, input_precision=DOT_PRECISION)
        if GATED:
            acc_u = tl.dot(a, tl.load(u_ptrs, mask=w_ok, other=0.0), acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        b_ptrs = b13_ptr + expert * stride_be + cols  # [BN]
        acc_g += tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_ptrs + I, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        h = _gated_act(acc_g, acc_u, alpha, limit, ACT)  # [BM, BN]
    else:
        h = _act(acc_g, alpha, ACT)
    out_ptrs = inter_ptr + slots[:, None].to(tl.int64) * stride_inter + cols[None, :]  # [BM, BN]
    tl.store(out_ptrs, h.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def down_kernel(
    inter_ptr, w2_ptr, b2_ptr, topk_w_ptr, sorted_rows_ptr, tile_expert_ptr, out_ptr,
    N, H, I, num_tiles,
    stride_inter, stride_we, stride_wh, stride_wi, stride_be, stride_out,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_OUTPUT: tl.constexpr, ATOMIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """ATOMIC: out [T, H] fp32 += rows (any SPLIT_K). Else out [N, H] gets row r at r (SPLIT_K must be 1)."""
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
    kk = k_lo + tl.arange(0, BLOCK_K)  # [BK]
    a_ptrs = inter_ptr + slots[:, None].to(tl.int64) * stride_inter + kk[None, :]  # [BM, BK]
    b_ptrs = w2_ptr + expert * stride_we + cols[None, :] * stride_wh + kk[:, None] * stride_wi  # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = (kk + (k0 - k_lo)) < k_hi  # [BK]
        # pad slots of inter were never written: mask them, garbage could be NaN
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BK, BN]
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wi
    if HAS_BIAS:
        bias = tl.load(b2_ptr + expert * stride_be + cols, mask=col_ok & (split == 0), other=0.0)  # [BN]
        acc += bias.to(tl.float32)[None, :]
    if SCALE_OUTPUT:
        acc *= tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0)[:, None]  # [BM, 1] routing weight
    ok = row_ok[:, None] & col_ok[None, :]
    if ATOMIC:
        tokens = (rows // TOP_K).to(tl.int64)
        tl.atomic_add(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc, mask=ok, sem="relaxed")
    else:
        out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ---- decode: GEMV-style kernels for tiles of a few rows (BLOCK_M 1-8), no tensor cores ----------------------------
# Each program owns one tile (one expert, BLOCK_M slots) and BLOCK_N output columns; it streams the expert's weight
# rows [BLOCK_N, BLOCK_K] along the contiguous K axis (16-byte vectors where strides allow), multiplies in fp32 into
# a [BM, BN, BK] accumulator and reduces over K once at the end. At a few rows per expert the tensor-core tile
# (16 rows) spends shared-memory traffic and issue slots on pad rows; here every loaded weight byte meets only real
# rows.


@triton.jit
def _rows_fma(acc, a, w):
    """acc [BM, BN, BK] fp32 += a [BM, BK] x w [BN, BK] elementwise; the K reduction waits for the end (one
    cross-lane sum per program instead of one per K step)."""
    return acc + a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]


@triton.jit
def gate_up_gemv_kernel(
    x_ptr, w13_ptr, b13_ptr, topk_w_ptr, sorted_rows_ptr, tile_expert_ptr, inter_ptr,
    N, H, I,
    stride_xt, stride_we, stride_wn, stride_be, stride_inter,
    alpha, limit,
    TOP_K: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_INPUT: tl.constexpr,
    ACT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gate_up_kernel's contract; x [T, H] and w13 [E, 2I or I, H] contiguous along H."""
    num_n = tl.cdiv(I, BLOCK_N)
    pid = tl.program_id(0)
    tile_m = pid // num_n
    tile_n = pid % num_n
    expert = tl.load(tile_expert_ptr + tile_m).to(tl.int64)
    if expert < 0:
        return
    slots = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rows = tl.load(sorted_rows_ptr + slots)  # [BM]
    row_ok = rows < N
    tokens = (rows // TOP_K).to(tl.int64)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] intermediate columns
    col_ok = cols < I
    kk = tl.arange(0, BLOCK_K)  # [BK]
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + kk[None, :]  # [BM, BK]
    g_ptrs = w13_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn + kk[None, :]  # [BN, BK]
    u_off = I * stride_wn
    if SCALE_INPUT:
        route_w = tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0)  # [BM]
    acc_g = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            wg = tl.load(g_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + kk) < H
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wg = tl.load(g_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if SCALE_INPUT:
            a = (a.to(tl.float32) * route_w[:, None]).to(x_ptr.dtype.element_ty)
        acc_g = _rows_fma(acc_g, a, wg)
        if GATED:
            if EVEN_K:
                wu = tl.load(g_ptrs + u_off, mask=col_ok[:, None], other=0.0)
            else:
                wu = tl.load(g_ptrs + u_off, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc_u = _rows_fma(acc_u, a, wu)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
    acc_g = tl.sum(acc_g, axis=2)  # [BM, BN]
    acc_u = tl.sum(acc_u, axis=2)
    if HAS_BIAS:
        b_ptrs = b13_ptr + expert * stride_be + cols  # [BN]
        acc_g += tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_ptrs + I, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        h = _gated_act(acc_g, acc_u, alpha, limit, ACT)  # [BM, BN]
    else:
        h = _act(acc_g, alpha, ACT)
    out_ptrs = inter_ptr + slots[:, None].to(tl.int64) * stride_inter + cols[None, :]
    tl.store(out_ptrs, h.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def down_gemv_kernel(
    inter_ptr, w2_ptr, b2_ptr, topk_w_ptr, sorted_rows_ptr, tile_expert_ptr, out_ptr,
    N, H, I,
    stride_inter, stride_we, stride_wh, stride_be, stride_out,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_OUTPUT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """down_kernel's contract with ATOMIC (out [T, H] fp32 +=); w2 [E, H, I] contiguous along I."""
    num_n = tl.cdiv(H, BLOCK_N)
    pid = tl.program_id(0)
    tile_m = pid // num_n
    tile_n = pid % num_n
    expert = tl.load(tile_expert_ptr + tile_m).to(tl.int64)
    if expert < 0:
        return
    slots = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rows = tl.load(sorted_rows_ptr + slots)  # [BM]
    row_ok = rows < N
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] hidden columns
    col_ok = cols < H
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + slots[:, None].to(tl.int64) * stride_inter + kk[None, :]  # [BM, BK]
    w_ptrs = w2_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wh + kk[None, :]  # [BN, BK]
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        # pad slots of inter were never written: mask them, garbage could be NaN
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + kk) < I
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _rows_fma(acc, a, w)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = tl.sum(acc, axis=2)  # [BM, BN]
    if HAS_BIAS:
        acc += tl.load(b2_ptr + expert * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SCALE_OUTPUT:
        acc *= tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0)[:, None]
    tokens = (rows // TOP_K).to(tl.int64)
    tl.atomic_add(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc,
                  mask=row_ok[:, None] & col_ok[None, :], sem="relaxed")
