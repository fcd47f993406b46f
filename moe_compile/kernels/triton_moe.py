"""The `triton` backend of `fused_moe`: routing in fp32 torch ops, experts in Triton grouped GEMMs.

Steps, none of which synchronises with the host (so a CUDA graph captures them and replays correctly when the
routing changes): router logits and top-k (`reference.route`, torch ops on the device) -> rows sorted by expert
into BLOCK_M tiles (`triton.align`) -> gate_up GEMM with the activation fused (-> inter [P, I]) -> down GEMM with
the routing weight fused, accumulated into [T, H] fp32 -> cast to x's dtype. Tile shapes depend on the token
count (`triton.configs`): a decode regime split across all SMs, and a prefill regime.

Importing this module raises ImportError when Triton or a CUDA device is missing (`TRITON_INTERPRET=1` lets the
kernels run on CPU tensors through Triton's interpreter, for testing logic without a GPU).

Dimension legend: T = tokens, K = top_k, N = T*K routed rows, E = experts, H = hidden, I = intermediate,
P = padded slots.
"""

from __future__ import annotations

import os
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
from moe_compile.kernels.op import register_backend  # noqa: E402
from moe_compile.kernels.triton.align import align_by_expert  # noqa: E402
from moe_compile.kernels.triton.configs import MoEConfig, select_config  # noqa: E402
from moe_compile.kernels.triton.experts import ACTIVATIONS, down_kernel, gate_up_kernel  # noqa: E402

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The prefix pass keeps one register vector of E (next power of two) counts; Triton caps a tensor at 2^20
# elements and its 2-D temporaries at 16 x E, so E stays well under that.
MAX_EXPERTS = 1 << 15
FALLBACK = "use fused_moe(..., backend='reference'), which runs any case on any device"


class UnsupportedByTriton(ValueError):
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
    logits = reference.router_logits(x, router_weight, router_bias)  # [T, E]
    weights, ids = reference.route(logits, correction_bias, top_k, scoring, renormalize, n_group, topk_group,
                                   routed_scaling)  # [T, K] fp32, [T, K] int64
    return triton_experts(x, weights, ids, w13, w2, b13, b2, weight_on_input, activation, alpha, limit)


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
    tokens, hidden = x.shape
    num_experts, inter = w2.shape[0], w2.shape[2]
    n = ids.numel()
    if n == 0:
        return torch.zeros_like(x)
    cfg = config or select_config(n, num_experts, hidden, inter, x.device.index or 0)
    sorted_rows, tile_expert, num_tiles = align_by_expert(ids, num_experts, cfg.block_m)  # [P], [B]
    topk_w = weights.reshape(-1).to(torch.float32).contiguous()  # [N]
    act = _gate_up(x, w13, b13, topk_w, sorted_rows, tile_expert, num_tiles, inter, ids.shape[1], cfg,
                   weight_on_input, activation, alpha, limit)  # [P, I]
    return _down(act, w2, b2, topk_w, sorted_rows, tile_expert, num_tiles, tokens, ids.shape[1], cfg,
                 weight_on_input).to(x.dtype)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision products (tf32 would cost ~3e-4 relative error); 16-bit inputs ignore it
    return "ieee" if dtype == torch.float32 else "tf32"


def _gate_up(x, w13, b13, topk_w, sorted_rows, tile_expert, num_tiles, inter, top_k, cfg, weight_on_input,
             activation, alpha, limit) -> Tensor:
    gated = w13.shape[1] == 2 * inter  # gate rows then up rows; else [E, I, H] and act(up)
    act = torch.empty(num_tiles * cfg.block_m, inter, dtype=x.dtype, device=x.device)  # [P, I]
    g = cfg.gate_up
    bias = b13.contiguous() if b13 is not None else topk_w  # any pointer when absent (never read)
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


def _down(act, w2, b2, topk_w, sorted_rows, tile_expert, num_tiles, tokens, top_k, cfg, weight_on_input) -> Tensor:
    n, hidden, inter = topk_w.numel(), w2.shape[1], w2.shape[2]
    d = cfg.down
    atomic = cfg.atomic_combine or d.split_k > 1
    if atomic:
        out = torch.zeros(tokens, hidden, dtype=torch.float32, device=act.device)  # [T, H]
    else:
        out = torch.empty(n, hidden, dtype=act.dtype, device=act.device)  # [N, H], summed over K below
    bias = b2.contiguous() if b2 is not None else topk_w
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
