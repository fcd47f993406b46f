"""Routing in one Triton launch per layer: scores, correction bias, group-limited top-k, top-k, renormalisation and
scaling (the reference's `route`), one program per token. At one token the same program also writes the expert
tiles of the GEMMs (what `align.align_by_expert` computes), and any program can zero one row of the fp32 output
that the down GEMM accumulates into, so the smallest decode step needs no other routing or memset launch.

Logits come in already computed (the caller runs `reference.router_logits`, one GEMV through cuBLAS, so the
logits are the reference's bit for bit, bf16 for a bf16 router). Selection then matches `torch.topk` on the same
scores: ties go to the lowest expert index, like CUDA topk. Scores use libdevice's accurate exp (as torch does),
so only values within an ulp of each other after the correction bias can order differently.

Dimension legend: T = tokens, E = experts, K = top_k, G = expert groups, GS = experts per group, H = hidden,
BM = BLOCK_M slots per tile of the expert GEMMs.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# libdevice's exp is torch's expf; Triton's CPU interpreter has no libdevice (there tl.exp is numpy's exp)
ACCURATE_EXP = os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def _exp(v, ACCURATE: tl.constexpr):
    if ACCURATE:
        out = libdevice.exp(v)
    else:
        out = tl.exp(v)
    return out


@triton.jit
def route_kernel(
    logits_ptr, corr_ptr, weights_ptr, ids_ptr, zero_ptr, sorted_rows_ptr, tile_expert_ptr,
    stride_logits, zero_cols, routed_scaling,
    TOP_K: tl.constexpr, K_POW2: tl.constexpr, SOFTMAX: tl.constexpr, HAS_CORR: tl.constexpr,
    RENORM: tl.constexpr, GROUPED: tl.constexpr, N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
    G_POW2: tl.constexpr, GS_POW2: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP2: tl.constexpr,
    ZERO_OUT: tl.constexpr, ZERO_BLOCK: tl.constexpr, FUSED_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
    ACCURATE_EXP: tl.constexpr,
):
    """Token t = program 0..T-1: logits [T, E] -> weights [T, K] fp32, ids [T, K] int32 (by descending score).

    Experts are held as [G_POW2, GS_POW2] (group, position in group); without groups G = 1 and GS = E.
    ZERO_OUT: zero_ptr[t, :zero_cols] = 0 (fp32). FUSED_ALIGN (T = 1 only): tiles of the K distinct experts in
    ascending expert order, one tile each, the token's row first and the sentinel K in the other BM - 1 slots.
    """
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G_POW2)[:, None]  # [G_POW2, 1]
    j = tl.arange(0, GS_POW2)[None, :]  # [1, GS_POW2]
    e = g * GROUP_SIZE + j  # [G_POW2, GS_POW2] expert index
    ok = (g < N_GROUP) & (j < GROUP_SIZE)
    logit = tl.load(logits_ptr + t * stride_logits + e, mask=ok, other=float("-inf")).to(tl.float32)
    if SOFTMAX:  # exp(l - max) / sum, like torch's softmax
        p = tl.where(ok, _exp(logit - tl.max(logit), ACCURATE_EXP), 0.0)
        scores = p / tl.sum(p)
    else:  # 1 / (1 + exp(-l)), like torch's sigmoid
        scores = 1.0 / (1.0 + _exp(-logit, ACCURATE_EXP))
    choice = scores
    if HAS_CORR:  # selection only
        choice = choice + tl.load(corr_ptr + e, mask=ok, other=0.0).to(tl.float32)
    choice = tl.where(ok, choice, float("-inf"))
    if GROUPED:  # a group scores the sum of its top-2 choices; keep the TOPK_GROUP best groups
        gidx = tl.arange(0, G_POW2)  # [G_POW2]
        m1 = tl.max(choice, axis=1)  # [G_POW2]
        if TOP2:
            i1 = tl.min(tl.where(choice == m1[:, None], j, GS_POW2), axis=1)
            m2 = tl.max(tl.where(j == i1[:, None], float("-inf"), choice), axis=1)
            gscore = m1 + m2
        else:
            gscore = m1
        gscore = tl.where(gidx < N_GROUP, gscore, float("-inf"))
        keep = gidx < 0  # all False
        for _ in tl.static_range(TOPK_GROUP):
            cand = tl.where(keep | (gidx >= N_GROUP), float("-inf"), gscore)
            best = tl.max(cand)
            pick = tl.min(tl.where((cand == best) & ~keep & (gidx < N_GROUP), gidx, G_POW2))
            keep = keep | (gidx == pick)
        choice = tl.where(keep[:, None], choice, float("-inf"))
    kidx = tl.arange(0, K_POW2)  # [K_POW2]
    sel_ids = tl.zeros([K_POW2], dtype=tl.int32)
    sel_w = tl.zeros([K_POW2], dtype=tl.float32)
    taken = e < 0  # all False
    for k in tl.static_range(TOP_K):  # iterative argmax, lowest index on ties
        free = ok & ~taken
        cand = tl.where(free, choice, float("-inf"))
        best = tl.max(cand)
        pick = tl.min(tl.where(free & (cand == best), e, GS_POW2 * G_POW2))
        hit = e == pick
        taken = taken | hit
        sel_ids = tl.where(kidx == k, pick, sel_ids)
        sel_w = tl.where(kidx == k, tl.sum(tl.where(hit, scores, 0.0)), sel_w)
    kmask = kidx < TOP_K
    if RENORM:
        sel_w = sel_w / (tl.sum(tl.where(kmask, sel_w, 0.0)) + 1e-20)  # reference.RENORM_EPS
    sel_w = sel_w * routed_scaling
    tl.store(weights_ptr + t * TOP_K + kidx, sel_w, mask=kmask)
    tl.store(ids_ptr + t * TOP_K + kidx, sel_ids, mask=kmask)
    if ZERO_OUT:
        for h0 in range(0, zero_cols, ZERO_BLOCK):
            offs = h0 + tl.arange(0, ZERO_BLOCK)
            tl.store(zero_ptr + t * zero_cols + offs, tl.zeros([ZERO_BLOCK], dtype=tl.float32), mask=offs < zero_cols)
    if FUSED_ALIGN:  # one token: K routed rows 0..K-1, K distinct experts, tile b = the b-th smallest expert
        lower = (sel_ids[None, :] < sel_ids[:, None]) & kmask[None, :]  # [K_POW2, K_POW2]
        rank = tl.sum(lower.to(tl.int32), axis=1)  # [K_POW2] tile of each choice
        tl.store(tile_expert_ptr + rank, sel_ids, mask=kmask)
        s = tl.arange(0, BLOCK_M)[None, :]  # [1, BM]
        rows = tl.where(s == 0, kidx[:, None], TOP_K)  # [K_POW2, BM] the row, then the sentinel N = K
        tl.store(sorted_rows_ptr + rank[:, None] * BLOCK_M + s, rows, mask=kmask[:, None])
