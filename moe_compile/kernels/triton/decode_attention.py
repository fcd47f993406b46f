"""Split-KV decode attention for grouped queries (flash-decoding): one query token per sequence, the G query heads
of a kv head read as G query rows, the cache split along its length over many programs, then one combine.

Why: at decode a (batch x kv head) pair is one row block of work; with few of them (batch 1: 4 kv heads) an
attention kernel that walks the whole cache in one program per pair has a handful of programs on 132 SMs and
runs at the latency of one serial walk. Splitting the cache gives every SM work, and a split whose cache slots
are all masked (slots not yet written in a static cache, left padding) loads nothing, so a step reads only the
keys and values in use, not the whole pre-allocated cache.

Phase 1 (`_split_kernel`, grid [B * Hkv, S]): for split s, keys n in [s * SPLIT, (s + 1) * SPLIT):
  scores [G, BN] = q [G, D] . k [BN, D]^T * scale, masked to -inf; online softmax over the split's BN-tiles;
  writes the unnormalised partial output [G, Dv] (fp32), its running max m and sum l [G].
Phase 2 (`_combine_kernel`, grid [B * Hkv * G], one query row each, COMBINE_CHUNK splits per load):
  out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s, M = max_s m_s, in the query's dtype; splits with no
  visible key wrote no partial output and are not read; a row with no visible key gives zeros.

Dimension legend: B = batch, Hkv = kv heads, G = query heads per kv head, L = cache length, D = head dim,
Dv = value head dim (GP, DP, DVP: G, D, Dv padded to a power of two >= 16 for tl.dot; the pad loads zeros),
BN = keys per tile, S = splits, SPLIT = keys per split.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_N = 32  # keys per tile: one tile of a 16 x 128 bf16 query against 32 keys keeps the registers small
# Splits: enough that B * Hkv * S reaches PROGRAMS_PER_SM programs per SM, and none longer than MAX_SPLIT keys: the
# visible part of a static cache is unknown at launch (the graph is replayed as it fills), and splits past it exit
# after reading their mask, so short splits keep the work of the visible part spread over the grid.
PROGRAMS_PER_SM = 8
MAX_SPLIT = 128
COMBINE_CHUNK = 32  # splits combined per load: [32, Dv] fp32 partial outputs


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, m_ptr, l_ptr,
                  stride_qb, stride_qh, stride_qg, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                  stride_mb, stride_ml, HKV, G, L, D, DV, SPLIT, S, scale,
                  GP: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr, BN: tl.constexpr, HAS_MASK: tl.constexpr,
                  IEEE: tl.constexpr):
    bh = tl.program_id(0)
    s = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    rows = tl.arange(0, GP)  # [GP] query heads of the group
    dims = tl.arange(0, DP)  # head dims padded to a power of two >= 16 (tl.dot); the pad loads zeros
    dims_v = tl.arange(0, DVP)
    dim_ok = dims < D
    dim_v_ok = dims_v < DV
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qg + dims[None, :],
                mask=(rows[:, None] < G) & dim_ok[None, :], other=0.0)  # [GP, DP]
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DVP], tl.float32)
    start = s * SPLIT
    end = tl.minimum(start + SPLIT, L)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    for n0 in range(start, end, BN):
        keys = n0 + tl.arange(0, BN)  # [BN]
        visible = keys < end
        if HAS_MASK:
            visible = visible & (tl.load(mask_ptr + b * stride_mb + keys * stride_ml, mask=visible, other=0) != 0)
        if tl.max(visible.to(tl.int32), axis=0) > 0:  # a tile of unwritten or padded slots loads nothing
            k = tl.load(k_base + keys[:, None] * stride_kl + dims[None, :], mask=visible[:, None] & dim_ok[None, :],
                        other=0.0)  # [BN, DP]
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")  # [GP, BN]
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(visible[None, :], scores * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: the tile has a visible key
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + keys[:, None] * stride_vl + dims_v[None, :],
                        mask=visible[:, None] & dim_v_ok[None, :], other=0.0)  # [BN, DVP]
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv  # [GP, DVP]
            m_i = m_new
    # partials: acc [pairs, G, S, DVP] and m, l [pairs, G, S]; a split with no visible key writes only m = -inf
    row_ok = rows < G
    part = (bh * G + rows) * S + s  # [GP]
    tl.store(acc_ptr + part[:, None] * DVP + dims_v[None, :], acc, mask=row_ok[:, None] & (l_i[:, None] > 0))
    tl.store(m_ptr + part, m_i, mask=row_ok)
    tl.store(l_ptr + part, l_i, mask=row_ok)


@triton.jit
def _combine_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, stride_ob, stride_oh, stride_og, HKV, G, S, DV,
                    DVP: tl.constexpr, SC: tl.constexpr):
    pid = tl.program_id(0)  # one (batch, kv head, query row)
    bh = pid // G
    g = pid % G
    base = pid * S
    dims_v = tl.arange(0, DVP)
    m_max = float("-inf")
    for s0 in range(0, S, SC):
        splits = s0 + tl.arange(0, SC)
        m_max = tl.maximum(m_max, tl.max(tl.load(m_ptr + base + splits, mask=splits < S, other=float("-inf")), 0))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)  # no visible key in any split: weights 0, output 0
    total = 0.0
    out = tl.zeros([DVP], tl.float32)
    for s0 in range(0, S, SC):
        splits = s0 + tl.arange(0, SC)  # [SC]
        in_range = splits < S
        weight = tl.exp(tl.load(m_ptr + base + splits, mask=in_range, other=float("-inf")) - m_safe)  # 0: empty
        total += tl.sum(weight * tl.load(l_ptr + base + splits, mask=in_range, other=0.0), 0)
        used = in_range & (weight > 0)  # empty splits wrote no partial output: not read
        acc = tl.load(acc_ptr + (base + splits)[:, None] * DVP + dims_v[None, :], mask=used[:, None], other=0.0)
        out += tl.sum(weight[:, None] * acc, 0)  # [DVP]
    out = out / tl.where(total == 0.0, 1.0, total)
    b = bh // HKV
    h = bh % HKV
    tl.store(out_ptr + b * stride_ob + h * stride_oh + g * stride_og + dims_v, out.to(out_ptr.dtype.element_ty),
             mask=dims_v < DV)


def splits_for(pairs: int, length: int, num_sms: int) -> tuple[int, int]:
    """(S splits, SPLIT keys per split: a multiple of BLOCK_N, at most MAX_SPLIT)."""
    wanted = max(1, min(triton.cdiv(PROGRAMS_PER_SM * num_sms, pairs), triton.cdiv(length, BLOCK_N)))
    split = min(MAX_SPLIT, triton.cdiv(triton.cdiv(length, wanted), BLOCK_N) * BLOCK_N)
    return triton.cdiv(length, split), split


def decode_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """query [B, Hkv, G, D], key [B, Hkv, L, D], value [B, Hkv, L, Dv], mask [B, L] bool (True: attend) or None
    -> [B, Hkv, G, Dv] in the query's dtype; the last dims contiguous."""
    batch, kv_heads, groups, dim = query.shape
    length, dim_v = key.shape[2], value.shape[3]
    padded = max(16, triton.next_power_of_2(groups))
    dim_padded, dim_v_padded = (max(16, triton.next_power_of_2(d)) for d in (dim, dim_v))
    pairs = batch * kv_heads
    num_sms = torch.cuda.get_device_properties(query.device).multi_processor_count if query.is_cuda else 8
    splits, split = splits_for(pairs, length, num_sms)
    acc = torch.empty(pairs * groups * splits * dim_v_padded, device=query.device, dtype=torch.float32)
    m, l = (torch.empty(pairs * groups * splits, device=query.device, dtype=torch.float32) for _ in range(2))
    out = torch.empty(batch, kv_heads, groups, dim_v, device=query.device, dtype=query.dtype)
    mask_strides = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    _split_kernel[(pairs, splits)](
        query, key, value, mask if mask is not None else query, acc, m, l,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), *mask_strides, kv_heads, groups, length, dim, dim_v, split,
        splits, scale, GP=padded, DP=dim_padded, DVP=dim_v_padded, BN=BLOCK_N, HAS_MASK=mask is not None,
        IEEE=query.dtype == torch.float32)
    _combine_kernel[(pairs * groups,)](acc, m, l, out, out.stride(0), out.stride(1), out.stride(2), kv_heads,
                                       groups, splits, dim_v, DVP=dim_v_padded, SC=COMBINE_CHUNK)
    return out
