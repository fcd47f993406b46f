"""The `triton` backend of `fused_moe`: routing in one Triton launch, experts in Triton grouped GEMMs / GEMVs.

Steps, none of which synchronises with the host (so a CUDA graph captures them and replays correctly when the
routing changes): router logits (`reference.router_logits`, one cuBLAS GEMV: the reference's bits) -> scores,
grouped top-k, renormalisation, scaling and the zeroing of the fp32 output, one program per token
(`triton.routing`; at one token it also writes the expert tiles) -> rows sorted by expert into BLOCK_M tiles
(`triton.align`, one launch at decode) -> gate_up with the activation fused (-> inter [P, I]) -> down with the
routing weight fused, accumulated into [T, H] fp32 -> cast to x's dtype. At one token that is five launches.
Kernels depend on the rows per expert (`triton.configs`): fp32-FMA GEMVs at a few rows, tensor-core tiles split
across all SMs up to 16 rows, and a prefill regime.

Importing this module raises ImportError when Triton or a CUDA device is missing (`TRITON_INTERPRET=1` lets the
kernels run on CPU tensors through Triton's interpreter, for testing logic without a GPU).

Dimension legend: T = tokens, K = top_k, N = T*K routed rows, E = experts, H = hidden, I = intermediate,
P = padded slots.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

try:
    import triton
except ImportError as exc:  # backends.py records the reason and keeps going
    raise ImportError(f"the triton backend needs triton: {exc}") from exc

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or _INTERPRET):
    raise ImportError("the triton backend needs a CUDA device (none visible)")

from moe_compile.kernels import reference  # noqa: E402
from moe_compile.kernels.op import BackendUnsupported, register_backend  # noqa: E402
from moe_compile.kernels.triton.align import align_by_expert  # noqa: E402
from moe_compile.kernels.triton.configs import MoEConfig, select_config  # noqa: E402
from moe_compile.kernels.triton.experts import (  # noqa: E402
    ACTIVATIONS,
    down_gemv_kernel,
    down_kernel,
    gate_up_gemv_kernel,
    gate_up_kernel,
)
from moe_compile.kernels.triton.routing import ACCURATE_EXP, route_kernel  # noqa: E402

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The prefix pass keeps one register vector of E (next power of two) counts; Triton caps a tensor at 2^20
# elements and its 2-D temporaries at 16 x E, so E stays well under that.
MAX_EXPERTS = 1 << 15
# The routing kernel keeps one token's E scores in registers and unrolls its K selection steps; past these, routing
# runs as torch ops (reference.route) and only the experts run in Triton.
ROUTE_MAX_EXPERTS = 8192
ROUTE_MAX_K = 64
FALLBACK = "use fused_moe(..., backend='reference'), which runs any case on any device"


class UnsupportedByTriton(BackendUnsupported):
    """A case outside the Triton kernels' limits; the message names the fallback."""


def check_supported(x: Tensor, w13: Tensor, w2: Tensor, activation: str) -> None:
    """Every real limit of the kernels, checked before any launch."""
    problems = []
    if x.dim() != 2:
        problems.append(f"x must be [T, H], got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        problems.append(f"dtype {x.dtype} (kernels: bf16, fp16, fp32)")
    if not (w13.dtype == w2.dtype == x.dtype):
        problems.append(f"expert weights {w13.dtype}/{w2.dtype} differ from x {x.dtype}")
    if activation not in ACTIVATIONS:
        problems.append(f"activation {activation!r}")
    if w13.shape[0] > MAX_EXPERTS:
        problems.append(f"{w13.shape[0]} experts (> {MAX_EXPERTS})")
    if not (x.is_cuda or _INTERPRET):
        problems.append(f"device {x.device}")
    if problems:
        raise UnsupportedByTriton("triton fused_moe cannot run this case: " + "; ".join(problems) + f". {FALLBACK}")


def triton_fused_moe(
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
    """Same contract as `reference.torch_fused_moe`: [T, H] -> [T, H] in x's dtype."""
    check_supported(x, w13, w2, activation)
    tokens, hidden = x.shape
    num_experts = w2.shape[0]
    if tokens == 0:
        return torch.zeros_like(x)
    logits = reference.router_logits(x, router_weight, router_bias)  # [T, E], cuBLAS: the reference's bits
    cfg = _config(x, w13, w2, tokens * top_k)
    route_args = (correction_bias, top_k, scoring, renormalize, n_group, topk_group, routed_scaling)
    if not _route_in_triton(logits, top_k):  # beyond the routing kernel's limits: torch ops, then align
        weights, ids = reference.route(logits, *route_args)
        return triton_experts(x, weights, ids, w13, w2, b13, b2, weight_on_input, activation, alpha, limit, cfg)
    out = torch.empty(tokens, hidden, dtype=torch.float32, device=x.device) if cfg.atomic_combine else None
    fused_align = tokens == 1
    weights, ids, aligned = _route(logits, *route_args, out, cfg.block_m if fused_align else 0)
    if not fused_align:
        aligned = align_by_expert(ids, num_experts, cfg.block_m)
    return _experts(x, weights.reshape(-1), aligned, w13, w2, b13, b2, weight_on_input, activation, alpha, limit,
                    top_k, cfg, out)


def triton_experts(
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
    config: Optional[MoEConfig] = None,
) -> Tensor:
    """Experts and combine for given routing (the reference's `torch_experts`): weights [T, K] fp32, ids [T, K]."""
    check_supported(x, w13, w2, activation)
    n = ids.numel()
    if n == 0:
        return torch.zeros_like(x)
    cfg = config or _config(x, w13, w2, n)
    aligned = align_by_expert(ids, w2.shape[0], cfg.block_m)  # sorted_rows [P], tile_expert [B], B
    topk_w = weights.reshape(-1).to(torch.float32).contiguous()  # [N]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if cfg.atomic_combine or cfg.gemv else None
    return _experts(x, topk_w, aligned, w13, w2, b13, b2, weight_on_input, activation, alpha, limit, ids.shape[1],
                    cfg, out)


def _config(x: Tensor, w13: Tensor, w2: Tensor, num_rows: int) -> MoEConfig:
    num_experts, hidden, inter = w2.shape
    cfg = select_config(num_rows, num_experts, hidden, inter, x.device.index or 0)
    if cfg.gemv and not (x.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1):
        # the GEMV kernels step along a contiguous K axis; other layouts take the tensor-core decode kernels
        cfg = select_config(num_rows, num_experts, hidden, inter, x.device.index or 0, allow_gemv=False)
    if x.element_size() == 4 and not cfg.gemv:
        # the tile shapes are sized for 2-byte operands: fp32 tiles of the same BLOCK_K would exceed shared memory
        # (a BLOCK_M 16 decode tile at 4 stages: 240 KB of 227)
        cfg = replace(cfg, gate_up=replace(cfg.gate_up, block_k=max(16, cfg.gate_up.block_k // 2)),
                      down=replace(cfg.down, block_k=max(16, cfg.down.block_k // 2)))
    return cfg


def _route_in_triton(logits: Tensor, top_k: int) -> bool:
    return logits.dtype != torch.float64 and logits.shape[1] <= ROUTE_MAX_EXPERTS and top_k <= ROUTE_MAX_K


def _route(logits, correction_bias, top_k, scoring, renormalize, n_group, topk_group, routed_scaling,
           zero_out: Optional[Tensor], fused_block_m: int):
    """One launch: logits [T, E] -> weights [T, K] fp32, ids [T, K] int32; zeroes zero_out [T, H] fp32 if given;
    with fused_block_m (T = 1 only) also the expert tiles (sorted_rows, tile_expert, K) of that BLOCK_M."""
    tokens, num_experts = logits.shape
    dev = logits.device
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=dev)
    grouped = n_group > 1 and topk_group < n_group
    group_size = num_experts // n_group if grouped else num_experts
    groups = n_group if grouped else 1
    aligned = None
    if fused_block_m:
        aligned = (torch.empty(top_k * fused_block_m, dtype=torch.int32, device=dev),
                   torch.empty(top_k, dtype=torch.int32, device=dev), top_k)
    dummy = weights  # any pointer for an absent tensor (never read or written)
    corr = correction_bias.contiguous() if correction_bias is not None else dummy
    e_pow2 = triton.next_power_of_2(num_experts)
    route_kernel[(tokens,)](
        logits, corr, weights, ids,
        zero_out if zero_out is not None else dummy,
        aligned[0] if aligned else ids, aligned[1] if aligned else ids,
        logits.stride(0), zero_out.shape[1] if zero_out is not None else 0, float(routed_scaling),
        TOP_K=top_k, K_POW2=triton.next_power_of_2(top_k), SOFTMAX=scoring == "softmax",
        HAS_CORR=correction_bias is not None, RENORM=renormalize, GROUPED=grouped, N_GROUP=groups,
        GROUP_SIZE=group_size, G_POW2=triton.next_power_of_2(groups), GS_POW2=triton.next_power_of_2(group_size),
        TOPK_GROUP=topk_group if grouped else 1, TOP2=group_size >= 2,
        ZERO_OUT=zero_out is not None, ZERO_BLOCK=1024, FUSED_ALIGN=bool(fused_block_m),
        BLOCK_M=max(fused_block_m, 1), ACCURATE_EXP=ACCURATE_EXP, num_warps=4 if e_pow2 <= 1024 else 8,
    )
    return weights, ids, aligned


def _experts(x, topk_w, aligned, w13, w2, b13, b2, weight_on_input, activation, alpha, limit, top_k, cfg,
             out: Optional[Tensor]) -> Tensor:
    """gate_up then down over aligned rows; out: the zeroed fp32 [T, H] accumulator (atomic combine) or None."""
    sorted_rows, tile_expert, num_tiles = aligned
    inter = w2.shape[2]
    act = _gate_up(x, w13, b13, topk_w, sorted_rows, tile_expert, num_tiles, inter, top_k, cfg,
                   weight_on_input, activation, alpha, limit)  # [P, I]
    return _down(act, w2, b2, topk_w, sorted_rows, tile_expert, num_tiles, x.shape[0], top_k, cfg,
                 weight_on_input, out).to(x.dtype)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision products (tf32 would cost ~3e-4 relative error); 16-bit inputs ignore it
    return "ieee" if dtype == torch.float32 else "tf32"


def _gate_up(x, w13, b13, topk_w, sorted_rows, tile_expert, num_tiles, inter, top_k, cfg, weight_on_input,
             activation, alpha, limit) -> Tensor:
    gated = w13.shape[1] == 2 * inter  # gate rows then up rows; else [E, I, H] and act(up)
    act = torch.empty(num_tiles * cfg.block_m, inter, dtype=x.dtype, device=x.device)  # [P, I]
    g = cfg.gate_up
    bias = b13.contiguous() if b13 is not None else topk_w  # any pointer when absent (never read)
    if cfg.gemv:
        grid = (num_tiles * triton.cdiv(inter, g.block_n),)
        gate_up_gemv_kernel[grid](
            x, w13, bias, topk_w, sorted_rows, tile_expert, act,
            topk_w.numel(), x.shape[1], inter,
            x.stride(0), w13.stride(0), w13.stride(1), bias.stride(0), act.stride(0),
            float(alpha), float(limit),
            TOP_K=top_k, GATED=gated, HAS_BIAS=b13 is not None, SCALE_INPUT=weight_on_input,
            ACT=ACTIVATIONS[activation], EVEN_K=x.shape[1] % g.block_k == 0,
            BLOCK_M=cfg.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k,
            num_warps=g.num_warps, num_stages=g.num_stages,
        )
        return act
    grid = (num_tiles * triton.cdiv(inter, g.block_n),)
    gate_up_kernel[grid](
        x, w13, bias, topk_w, sorted_rows, tile_expert, act,
        topk_w.numel(), x.shape[1], inter, num_tiles,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), bias.stride(0), act.stride(0),
        float(alpha), float(limit),
        TOP_K=top_k, GATED=gated, HAS_BIAS=b13 is not None, SCALE_INPUT=weight_on_input,
        ACT=ACTIVATIONS[activation], DOT_PRECISION=_dot_precision(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k, GROUP_M=cfg.group_m,
        num_warps=g.num_warps, num_stages=g.num_stages,
    )
    return act


def _down(act, w2, b2, topk_w, sorted_rows, tile_expert, num_tiles, tokens, top_k, cfg, weight_on_input,
          out: Optional[Tensor] = None) -> Tensor:
    """out: a zeroed fp32 [T, H] to accumulate into (atomic combine), or None to allocate one here."""
    n, hidden, inter = topk_w.numel(), w2.shape[1], w2.shape[2]
    d = cfg.down
    atomic = cfg.atomic_combine or d.split_k > 1 or cfg.gemv
    if atomic:
        if out is None:
            out = torch.zeros(tokens, hidden, dtype=torch.float32, device=act.device)  # [T, H]
    else:
        out = torch.empty(n, hidden, dtype=act.dtype, device=act.device)  # [N, H], summed over K below
    bias = b2.contiguous() if b2 is not None else topk_w
    if cfg.gemv:
        grid = (num_tiles * triton.cdiv(hidden, d.block_n),)
        down_gemv_kernel[grid](
            act, w2, bias, topk_w, sorted_rows, tile_expert, out,
            n, hidden, inter,
            act.stride(0), w2.stride(0), w2.stride(1), bias.stride(0), out.stride(0),
            TOP_K=top_k, HAS_BIAS=b2 is not None, SCALE_OUTPUT=not weight_on_input, EVEN_K=inter % d.block_k == 0,
            BLOCK_M=cfg.block_m, BLOCK_N=d.block_n, BLOCK_K=d.block_k,
            num_warps=d.num_warps, num_stages=d.num_stages,
        )
        return out
    grid = (num_tiles * triton.cdiv(hidden, d.block_n), d.split_k)
    down_kernel[grid](
        act, w2, bias, topk_w, sorted_rows, tile_expert, out,
        n, hidden, inter, num_tiles,
        act.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), bias.stride(0), out.stride(0),
        TOP_K=top_k, HAS_BIAS=b2 is not None, SCALE_OUTPUT=not weight_on_input, ATOMIC=atomic,
        DOT_PRECISION=_dot_precision(act.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=d.block_n, BLOCK_K=d.block_k, SPLIT_K=d.split_k, GROUP_M=cfg.group_m,
        num_warps=d.num_warps, num_stages=d.num_stages,
    )
    if atomic:
        return out
    return out.view(tokens, top_k, hidden).sum(dim=1, dtype=torch.float32)  # [T, H]


register_backend("triton", triton_fused_moe)
