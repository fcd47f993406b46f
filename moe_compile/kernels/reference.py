"""The reference implementation of `fused_moe`: plain torch, any device, the ground truth for tests and benchmarks.

Routing: logits are computed like the transformers blocks compute them (the input cast to the router weight's
dtype, so bf16 routers give bf16 logits and fp32 routers fp32 logits), then every routing step runs in fp32.
Experts: matmuls in the activation dtype, the weighted combine accumulated in fp32.

Dimension legend: T = tokens, E = experts, K = top_k, H = hidden, I = expert intermediate, G = expert groups.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and narrower dtypes, fp64 for fp64 (the prover and gradcheck run in fp64)."""
    return torch.promote_types(dtype, torch.float32)


RENORM_EPS = 1e-20  # DeepSeek-V3's epsilon; invisible next to softmax sums, which are O(1e-3) or more in fp32


def router_logits(x: Tensor, router_weight: Tensor, router_bias: Optional[Tensor]) -> Tensor:
    """[T, H] -> [T, E] logits in the router weight's dtype, as the transformers routers compute them."""
    bias = None if router_bias is None else router_bias.to(router_weight.dtype)
    return F.linear(x.to(router_weight.dtype), router_weight, bias)


def _group_limited_mask(choice: Tensor, n_group: int, topk_group: int) -> Tensor:
    """Mask (-inf) the experts outside each token's `topk_group` best groups; a group scores its top-2 sum."""
    tokens, experts = choice.shape
    grouped = choice.view(tokens, n_group, experts // n_group)  # [T, G, E/G]
    group_scores = grouped.topk(min(2, experts // n_group), dim=-1).values.sum(dim=-1)  # [T, G]
    keep_groups = group_scores.topk(topk_group, dim=-1).indices  # [T, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)  # [T, G]
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape(tokens, experts)  # [T, E]
    return choice.masked_fill(~keep, float("-inf"))


def route(
    logits: Tensor,
    correction_bias: Optional[Tensor],
    top_k: int,
    scoring: str,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    routed_scaling: float,
) -> tuple[Tensor, Tensor]:
    """[T, E] logits -> (weights [T, K] fp32, expert ids [T, K] int64), sorted by selection score."""
    logits = logits.to(acc_dtype(logits.dtype))
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()  # [T, E]
    choice = scores if correction_bias is None else scores + correction_bias.to(scores.dtype)  # selection only
    if n_group > 1 and topk_group < n_group:
        choice = _group_limited_mask(choice, n_group, topk_group)
    ids = choice.topk(top_k, dim=-1).indices  # [T, K]
    weights = scores.gather(1, ids)  # [T, K], unbiased scores
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    if routed_scaling != 1.0:
        weights = weights * routed_scaling
    return weights, ids


def apply_activation(h: Tensor, intermediate: int, gated: bool, activation: str, alpha: float, limit: float) -> Tensor:
    """[N, 2I] (gated: gate columns then up columns) or [N, I] -> [N, I]."""
    if not gated:
        return _act(h, activation, alpha)
    gate, up = h[:, :intermediate], h[:, intermediate:]
    if activation == "swiglu_oai":  # GPT-OSS: clamped SwiGLU with (up + 1)
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * gate * torch.sigmoid(gate * alpha)
    return _act(gate, activation, alpha) * up


def _act(h: Tensor, activation: str, alpha: float) -> Tensor:
    if activation == "silu":
        return F.silu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return F.relu(h)
    if activation == "swiglu_oai":
        return h * torch.sigmoid(h * alpha)
    raise ValueError(f"unknown activation {activation!r}")


def expert_forward(
    x: Tensor,
    w13: Tensor,
    w2: Tensor,
    b13: Optional[Tensor],
    b2: Optional[Tensor],
    activation: str,
    alpha: float,
    limit: float,
    gemm_input: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """One expert on its rows: x [N, H], w13 [2I or I, H], w2 [H, I] -> [N, H] in x's dtype.
    `gemm_input` transforms each GEMM's input (the emulated FP8 path quantizes activations there)."""
    prepare = gemm_input or (lambda t: t)
    intermediate = w2.shape[1]
    h = F.linear(prepare(x), w13, b13)  # [N, 2I]
    a = apply_activation(h, intermediate, w13.shape[0] == 2 * intermediate, activation, alpha, limit)  # [N, I]
    return F.linear(prepare(a), w2, b2)  # [N, H]


def torch_fused_moe(
    x: Tensor,
    router_weight: Tensor,
    router_bias: Optional[Tensor],
    correction_bias: Optional[Tensor],
    w13: Tensor,
    w2: Tensor,
    b13: Optional[Tensor],
    b2: Optional[Tensor],
    top_k: int,
    scoring: str,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    routed_scaling: float,
    weight_on_input: bool,
    activation: str,
    alpha: float,
    limit: float,
) -> Tensor:
    """The whole MoE layer, [T, H] -> [T, H]: route, run each selected expert on its tokens, combine in fp32."""
    logits = router_logits(x, router_weight, router_bias)  # [T, E]
    weights, ids = route(logits, correction_bias, top_k, scoring, renormalize, n_group, topk_group, routed_scaling)
    return torch_experts(x, weights, ids, w13, w2, b13, b2, weight_on_input, activation, alpha, limit)


def torch_experts(
    x: Tensor,
    weights: Tensor,
    ids: Tensor,
    w13: Tensor,
    w2: Tensor,
    b13: Optional[Tensor],
    b2: Optional[Tensor],
    weight_on_input: bool,
    activation: str,
    alpha: float,
    limit: float,
    gemm_input: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """Experts and combine for given routing: weights [T, K] fp32, ids [T, K] -> [T, H] in x's dtype.

    Loops over the experts that received tokens (data-dependent: fine for the reference, never used where a
    CUDA graph is captured).
    """
    out = torch.zeros(x.shape, dtype=acc_dtype(x.dtype), device=x.device)  # [T, H]
    flat_ids = ids.reshape(-1)  # [T*K]
    order = flat_ids.argsort(stable=True)  # routed rows sorted by expert
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()  # [E]
    token_of_row = order // ids.shape[1]  # [T*K]
    flat_weights = weights.reshape(-1)[order]  # [T*K]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        start += count
        tokens = token_of_row[rows]  # [n]
        w = flat_weights[rows].unsqueeze(1).to(out.dtype)  # [n, 1]
        xin = x[tokens]  # [n, H]
        if weight_on_input:
            xin = (xin * w).to(x.dtype)
        b13_e = None if b13 is None else b13[expert]
        b2_e = None if b2 is None else b2[expert]
        y = expert_forward(xin, w13[expert], w2[expert], b13_e, b2_e, activation, alpha, limit,
                           gemm_input).to(out.dtype)  # [n, H]
        out.index_add_(0, tokens, y if weight_on_input else y * w)
    return out.to(x.dtype)


# ---- packed weights (FP8 e4m3 per-channel and/or 2:4 compressed): the emulated path of `fused_moe_packed` ----


def fp8_dequant_reference(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(q [..., N, K] float8_e4m3fn, scale [..., N] fp32) -> [..., N, K] in `dtype`."""
    from moe_compile.quant.fp8 import dequantize_per_channel

    return dequantize_per_channel(q, scale, dtype)


def sparse24_decompress_reference(values: Tensor, meta: Tensor) -> Tensor:
    """(values [..., K/2], meta [..., ceil(K/8)] uint8) -> dense [..., K] with zeros at pruned positions."""
    from moe_compile.quant.sparse24 import decompress_24

    return decompress_24(values, meta)


def torch_fused_moe_packed(
    x: Tensor,
    router_weight: Tensor,
    router_bias: Optional[Tensor],
    correction_bias: Optional[Tensor],
    w13: Tensor,
    w2: Tensor,
    b13: Optional[Tensor],
    b2: Optional[Tensor],
    w13_scale: Optional[Tensor],
    w2_scale: Optional[Tensor],
    w13_meta: Optional[Tensor],
    w2_meta: Optional[Tensor],
    top_k: int,
    scoring: str,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    routed_scaling: float,
    weight_on_input: bool,
    activation: str,
    alpha: float,
    limit: float,
    act_quant: str,
) -> Tensor:
    """`torch_fused_moe` with packed expert weights, emulated: unpack (dequantize, decompress) the weights to x's
    dtype; with `act_quant="fp8_per_token"` quantize-dequantize each expert GEMM's input per token (e4m3, dynamic
    scales). Routing stays in high precision (the router input is not quantized)."""
    from moe_compile.quant.fp8 import fake_quant_per_token
    from moe_compile.quant.packed import unpack_weight

    if act_quant not in ("none", "fp8_per_token"):
        raise ValueError(f"unknown act_quant {act_quant!r} (none, fp8_per_token)")
    dense13 = unpack_weight(w13, w13_scale, w13_meta, x.dtype)  # [E, 2I, H]
    dense2 = unpack_weight(w2, w2_scale, w2_meta, x.dtype)  # [E, H, I]
    logits = router_logits(x, router_weight, router_bias)  # [T, E]
    weights, ids = route(logits, correction_bias, top_k, scoring, renormalize, n_group, topk_group, routed_scaling)
    qdq = fake_quant_per_token if act_quant == "fp8_per_token" else None
    return torch_experts(x, weights, ids, dense13, dense2, b13, b2, weight_on_input, activation, alpha, limit, qdq)
