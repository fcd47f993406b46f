"""The `triton` backend of `fused_moe_packed`: FP8 W8A8, 2:4 sparse and FP8 + 2:4 expert weights on the GPU.

Same contract as `reference.torch_fused_moe_packed` (the emulated ground truth): routing in high precision; with
FP8 weights (e4m3, per-output-channel scales) each expert GEMM's input is quantized per routed row to e4m3 with a
dynamic scale, like the reference does, and the dot runs e4m3 x e4m3 on the tensor cores; 2:4 weights stream
compressed (values + metadata) and are expanded in registers (`triton.packed`). Routing, alignment and tile configs
are the `triton` backend's (`triton_moe`): the same launches, none of them synchronises with the host, so CUDA graph
capture and replay stay correct when the routing changes.

Launches at one token: router logits, route (+ expert tiles, + zeroed output), [FP8: quantize x + zero the inter
row maxima], gate_up, [FP8 at decode: quantize inter], down, cast. Dense 16-bit weights go to
`triton_moe.triton_fused_moe` unchanged.

Dimension legend: T = tokens, K = top_k, N = T*K routed rows, E = experts, H = hidden, I = intermediate,
P = padded slots.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from moe_compile.kernels import reference
from moe_compile.kernels import triton_moe  # raises ImportError without Triton or a CUDA device
from moe_compile.kernels.op import BackendUnsupported, register_packed_backend
from moe_compile.kernels.triton.align import align_by_expert
from moe_compile.kernels.triton.configs import (
    GemmConfig,
    MoEConfig,
    split_k,
    expected_tiles,
    num_sms,
    select_config,
)
from moe_compile.kernels.triton.experts import ACTIVATIONS
from moe_compile.kernels.triton.packed import (
    packed_down_kernel,
    packed_gate_up_kernel,
    quantize_inter_kernel,
    quantize_rows_kernel,
)

import triton  # noqa: E402  (after triton_moe, which turns a missing Triton into a clear ImportError)

FP8_DTYPE = torch.float8_e4m3fn
_ACT_DTYPES = (torch.bfloat16, torch.float16)
_ACT_QUANTS = ("none", "fp8_per_token")
FALLBACK = "use fused_moe_packed(..., backend='reference'), which runs any packed case on any device"
QUANT_BLOCK_MAX = 4096  # columns a program of quantize_rows_kernel handles per step
QUANT_INTER_BLOCK = 512  # columns a program of quantize_inter_kernel handles (x BLOCK_M rows)
DECODE_BLOCK_M = 16  # the tensor-core decode regime of `configs.select_config`
# Decode tiles of the packed kernels (SWAP_AB: BN is the wgmma M side, so at least 64 for 4 warps). BK counts
# dense K positions: 256 e4m3 = 256 B a row a stage, like the 16-bit 128. Swept on an H100, graph replay
# (benchmarks/results/sweep_packed_H100_2026-11-26_v5.txt, benchmarks/NOTES.md version 5).
DECODE_BLOCK_N = 64
DECODE_BLOCK_K_FP8 = 256
DECODE_BLOCK_K_16BIT = 128
DECODE_STAGES = 4
FP8_DECODE_STAGES = 3  # FP8 alone: 3 stages beat 4 by 3% at Qwen3 8 / 32 tokens, within 1% elsewhere
# 2:4 with 16-bit values takes the swapped tiles only up to this many routed rows per expert: beyond it the plain
# mma.sync tiles of the 16-bit backend were 9-12% faster (Qwen3 8 / 32 tokens, Mixtral 8 / 32), below it the
# swapped ones 4-15% (Qwen3, Mixtral at one token).
SPARSE24_SWAP_MAX_ROWS_PER_EXPERT = 0.25


@dataclass(frozen=True)
class PackedConfig(MoEConfig):
    """A `MoEConfig` with the packed kernels' own choices: swap_ab runs both GEMMs as w x a^T (wgmma at BM 16);
    quantize_inter quantizes inter to e4m3 once (FP8) instead of in every down program."""
    swap_ab: bool = False
    quantize_inter: bool = False


class UnsupportedPacked(BackendUnsupported):
    """A packed case outside the Triton kernels' limits; the message names the fallback."""


@dataclass(frozen=True)
class PackedFormat:
    fp8: bool
    sparse: bool
    hidden: int  # H (dense)
    inter: int  # I (dense)

    @property
    def name(self) -> str:
        return "+".join(n for n, on in (("fp8", self.fp8), ("sparse24", self.sparse)) if on) or "dense"


def _shape_problems(x: Tensor, w13: Tensor, w2: Tensor, w13_scale: Optional[Tensor], w2_scale: Optional[Tensor],
                    w13_meta: Optional[Tensor], w2_meta: Optional[Tensor], fmt: PackedFormat) -> list[str]:
    """Shapes of the packed tensors against x [T, H]; 2:4 needs H and I multiples of 4 (quant.sparse24)."""
    problems = []
    shrink = 2 if fmt.sparse else 1
    e, rows13 = w13.shape[0], w13.shape[1]
    hidden, inter = fmt.hidden, fmt.inter
    if w13.shape[2] * shrink != hidden or w2.shape[1] != hidden or rows13 not in (inter, 2 * inter):
        problems.append(f"w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not fit x {tuple(x.shape)} "
                        f"as {fmt.name} weights")
    if fmt.sparse and (hidden % 4 or inter % 4):
        problems.append(f"2:4 needs H and I multiples of 4, got H={hidden}, I={inter}")
    if fmt.sparse:
        for name, meta, (n, k) in (("w13_meta", w13_meta, (rows13, hidden)), ("w2_meta", w2_meta, (hidden, inter))):
            if meta.dtype != torch.uint8 or tuple(meta.shape) != (e, n, (k + 7) // 8):
                problems.append(f"{name} must be uint8 [{e}, {n}, {(k + 7) // 8}], got {meta.dtype} "
                                f"{tuple(meta.shape)}")
    if fmt.fp8:
        for name, scale, n in (("w13_scale", w13_scale, rows13), ("w2_scale", w2_scale, hidden)):
            if scale.dtype != torch.float32 or tuple(scale.shape) != (e, n):
                problems.append(f"{name} must be fp32 [{e}, {n}] (per output channel), got {scale.dtype} "
                                f"{tuple(scale.shape)}")
    return problems


def check_supported(x: Tensor, w13: Tensor, w2: Tensor, w13_scale: Optional[Tensor], w2_scale: Optional[Tensor],
                    w13_meta: Optional[Tensor], w2_meta: Optional[Tensor], activation: str, act_quant: str,
                    weight_on_input: bool) -> PackedFormat:
    """Every real limit of the packed kernels, checked before any launch; -> the weight format."""
    problems = []
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise UnsupportedPacked(f"triton fused_moe_packed needs x [T, H] and 3-D expert weights, got x "
                                f"{tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}. {FALLBACK}")
    fp8 = w13.dtype == FP8_DTYPE
    sparse = w13_meta is not None
    if (w2.dtype == FP8_DTYPE) != fp8 or (w13_scale is None) == fp8 or (w2_scale is None) == fp8:
        problems.append("w13 and w2 must both be float8_e4m3fn with both scales, or both 16-bit without scales")
    if (w2_meta is None) == sparse:
        problems.append("2:4 metadata must be given for both w13 and w2 or for neither")
    if x.dtype not in _ACT_DTYPES:
        problems.append(f"activation dtype {x.dtype} (kernels: bf16, fp16)")
    if not fp8 and w13.dtype != x.dtype:
        problems.append(f"16-bit weights {w13.dtype} differ from x {x.dtype}")
    if act_quant not in _ACT_QUANTS:
        problems.append(f"act_quant {act_quant!r} (known: {', '.join(_ACT_QUANTS)})")
    elif fp8 != (act_quant == "fp8_per_token"):
        problems.append("the kernels run W8A8 (FP8 weights with act_quant='fp8_per_token') or 16-bit weights with "
                        f"act_quant='none'; got {'FP8' if fp8 else '16-bit'} weights with act_quant={act_quant!r}")
    if fp8 and weight_on_input:
        problems.append("weight_on_input with FP8 activations")
    if activation not in ACTIVATIONS:
        problems.append(f"activation {activation!r}")
    if not (x.is_cuda or triton_moe._INTERPRET):
        problems.append(f"device {x.device}")
    shrink = 2 if sparse else 1
    fmt = PackedFormat(fp8, sparse, x.shape[1], w2.shape[2] * shrink)
    if not problems:
        problems += _shape_problems(x, w13, w2, w13_scale, w2_scale, w13_meta, w2_meta, fmt)
    if problems:
        raise UnsupportedPacked("triton fused_moe_packed cannot run this case: " + "; ".join(problems)
                                + f". {FALLBACK}")
    return fmt


def packed_config(num_rows: int, num_experts: int, fmt: PackedFormat, device_index: int) -> PackedConfig:
    """The `triton` backend's tile config for these sizes, adapted to packed weights: at decode (BLOCK_M 16) the
    swapped tiles of `swapped_decode_config` (FP8 always; 2:4 with 16-bit values up to
    SPARSE24_SWAP_MAX_ROWS_PER_EXPERT), else the 16-bit tiles, FP8 ones twice as deep (same bytes a stage) and 2:4
    ones at the 16-bit K (expanded in registers)."""
    cfg = select_config(num_rows, num_experts, fmt.hidden, fmt.inter, device_index, allow_gemv=False)
    if cfg.block_m == DECODE_BLOCK_M and (fmt.fp8 or num_rows / num_experts <= SPARSE24_SWAP_MAX_ROWS_PER_EXPERT):
        return swapped_decode_config(num_rows, num_experts, fmt, device_index, quantize_inter=fmt.fp8)
    cfg = as_packed_config(cfg)
    if fmt.fp8 and not fmt.sparse:
        cfg = replace(cfg, gate_up=replace(cfg.gate_up, block_k=min(256, 2 * cfg.gate_up.block_k)),
                      down=replace(cfg.down, block_k=min(256, 2 * cfg.down.block_k)))
    return cfg


def swapped_decode_config(num_rows: int, num_experts: int, fmt: PackedFormat, device_index: int,
                          quantize_inter: bool) -> PackedConfig:
    """Decode tiles (BLOCK_M 16) run as w x a^T: DECODE_BLOCK_N weight columns a program (wgmma), the down GEMM
    split along I until ~PROGRAMS_PER_SM programs per SM stream weights; FP8 inter quantized once if asked."""
    block_k = DECODE_BLOCK_K_FP8 if fmt.fp8 else DECODE_BLOCK_K_16BIT
    stages = FP8_DECODE_STAGES if fmt.fp8 and not fmt.sparse else DECODE_STAGES
    tiles = expected_tiles(num_rows, num_experts, DECODE_BLOCK_M)
    split = split_k(fmt.hidden, fmt.inter, DECODE_BLOCK_N, block_k, tiles, num_sms(device_index))
    return PackedConfig(DECODE_BLOCK_M, GemmConfig(DECODE_BLOCK_N, block_k, 4, stages),
                        GemmConfig(DECODE_BLOCK_N, block_k, 4, stages, split), group_m=1, atomic_combine=True,
                        swap_ab=True, quantize_inter=quantize_inter and fmt.fp8)


def as_packed_config(cfg: MoEConfig) -> PackedConfig:
    """A plain `MoEConfig` (sweeps, callers of the 16-bit backend) as the packed kernels' config: no swap, FP8
    inter quantized in the down kernel."""
    if isinstance(cfg, PackedConfig):
        return cfg
    return PackedConfig(**{f: getattr(cfg, f) for f in ("block_m", "gate_up", "down", "group_m", "atomic_combine",
                                                         "gemv")})


def triton_fused_moe_packed(
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
    config: Optional[MoEConfig] = None,
) -> Tensor:
    """Same contract as `reference.torch_fused_moe_packed`: [T, H] -> [T, H] in x's dtype. `config` (a
    `PackedConfig`, or a plain `MoEConfig`: no swap, no inter pass) overrides the tile config (benchmarks, sweeps)."""
    fmt = check_supported(x, w13, w2, w13_scale, w2_scale, w13_meta, w2_meta, activation, act_quant, weight_on_input)
    scalars = (top_k, scoring, renormalize, n_group, topk_group, routed_scaling)
    if not (fmt.fp8 or fmt.sparse):  # dense 16-bit weights: the plain triton backend
        return triton_moe.triton_fused_moe(x, router_weight, router_bias, correction_bias, w13, w2, b13, b2,
                                           *scalars, weight_on_input, activation, alpha, limit)
    tokens, hidden = x.shape
    if tokens == 0:
        return torch.zeros_like(x)
    num_experts = w13.shape[0]
    cfg = as_packed_config(config) if config is not None else packed_config(tokens * top_k, num_experts, fmt,
                                                                             x.device.index or 0)
    logits = reference.router_logits(x, router_weight, router_bias)  # [T, E], cuBLAS: the reference's bits
    route_args = (correction_bias, *scalars)
    if triton_moe._route_in_triton(logits, top_k):
        out = torch.empty(tokens, hidden, dtype=torch.float32, device=x.device)  # [T, H], zeroed by the router
        fused_align = tokens == 1
        weights, ids, aligned = triton_moe._route(logits, *route_args, out, cfg.block_m if fused_align else 0)
        if not fused_align:
            aligned = align_by_expert(ids, num_experts, cfg.block_m)
    else:  # beyond the routing kernel's limits: torch ops, then align
        weights, ids = reference.route(logits, *route_args)
        out = torch.zeros(tokens, hidden, dtype=torch.float32, device=x.device)
        aligned = align_by_expert(ids, num_experts, cfg.block_m)
    topk_w = weights.reshape(-1).to(torch.float32).contiguous()  # [N]
    packed = [None if t is None else t.contiguous() for t in (w13, w2, w13_scale, w2_scale, w13_meta, w2_meta)]
    _packed_experts(x.contiguous(), topk_w, aligned, *packed, b13, b2, fmt, weight_on_input, activation, alpha,
                    limit, top_k, cfg, out)
    return out.to(x.dtype)


def _quantize_x(x: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
    """x [T, H] -> (e4m3 [T, H], scales [T] fp32), one program a row; the same launch zeroes `zero` [P] fp32."""
    tokens, hidden = x.shape
    q = torch.empty(tokens, hidden, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(tokens, dtype=torch.float32, device=x.device)
    quantize_rows_kernel[(tokens,)](
        x, q, scale, zero, hidden, x.stride(0), q.stride(0), zero.numel(), triton.cdiv(zero.numel(), tokens),
        BLOCK=min(QUANT_BLOCK_MAX, triton.next_power_of_2(hidden)), ZERO_BLOCK=128, num_warps=4,
    )
    return q, scale


def _quantize_inter(act: Tensor, inter_amax: Tensor, sorted_rows: Tensor, tile_expert: Tensor, num_tiles: int,
                    num_rows: int, block_m: int) -> Tensor:
    """inter [P, I] -> e4m3 [P, I], each used row with its own scale inter_amax / 448 (rows of pad slots unset)."""
    slots, inter = act.shape
    q = torch.empty(slots, inter, dtype=FP8_DTYPE, device=act.device)
    quantize_inter_kernel[(num_tiles, triton.cdiv(inter, QUANT_INTER_BLOCK))](
        act, inter_amax, q, sorted_rows, tile_expert, num_rows, inter, act.stride(0), q.stride(0),
        BLOCK_M=block_m, BLOCK=QUANT_INTER_BLOCK, num_warps=4,
    )
    return q


def _packed_experts(x, topk_w, aligned, w13, w2, w13_scale, w2_scale, w13_meta, w2_meta, b13, b2, fmt,
                    weight_on_input, activation, alpha, limit, top_k, cfg, out) -> None:
    """gate_up then down over aligned rows, adding into out [T, H] fp32 (zeroed)."""
    sorted_rows, tile_expert, num_tiles = aligned
    slots = num_tiles * cfg.block_m
    inter, hidden = fmt.inter, fmt.hidden
    dummy = topk_w  # any pointer for an absent tensor (never read)
    act = torch.empty(slots, inter, dtype=x.dtype, device=x.device)  # [P, I]
    inter_amax = torch.empty(slots, dtype=torch.float32, device=x.device) if fmt.fp8 else dummy  # [P]
    a_in, x_scale = _quantize_x(x, inter_amax) if fmt.fp8 else (x, dummy)
    s13, s2 = (w13_scale, w2_scale) if fmt.fp8 else (dummy.view(1, -1), dummy.view(1, -1))
    m13, m2 = (w13_meta, w2_meta) if fmt.sparse else (dummy.view(1, 1, -1), dummy.view(1, 1, -1))
    bias13 = b13.contiguous() if b13 is not None else dummy.view(1, -1)
    bias2 = b2.contiguous() if b2 is not None else dummy.view(1, -1)
    common = dict(TOP_K=top_k, FP8=fmt.fp8, SPARSE=fmt.sparse, W_BITS=8 * w13.element_size(), SWAP_AB=cfg.swap_ab,
                  BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m)
    if fmt.sparse:  # the kernels read each 2:4 group's two values as one word
        word = torch.int32 if w13.element_size() == 2 else torch.int16
        w13, w2 = w13.view(word), w2.view(word)
    g = cfg.gate_up
    packed_gate_up_kernel[(num_tiles * triton.cdiv(inter, g.block_n),)](
        a_in, x_scale, w13, s13, m13, bias13, topk_w, sorted_rows, tile_expert, act, inter_amax,
        topk_w.numel(), hidden, inter, num_tiles, m13.shape[-1],
        a_in.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), m13.stride(0), m13.stride(1), bias13.stride(0),
        act.stride(0), float(alpha), float(limit),
        GATED=w13.shape[1] == 2 * inter, HAS_BIAS=b13 is not None, SCALE_INPUT=weight_on_input,
        ACT=ACTIVATIONS[activation], BLOCK_N=g.block_n, BLOCK_K=g.block_k,
        num_warps=g.num_warps, num_stages=g.num_stages, **common,
    )
    a_e4m3 = fmt.fp8 and cfg.quantize_inter
    if a_e4m3:
        act = _quantize_inter(act, inter_amax, sorted_rows, tile_expert, num_tiles, topk_w.numel(), cfg.block_m)
    d = cfg.down
    packed_down_kernel[(num_tiles * triton.cdiv(hidden, d.block_n), d.split_k)](
        act, inter_amax, w2, s2, m2, bias2, topk_w, sorted_rows, tile_expert, out,
        topk_w.numel(), hidden, inter, num_tiles, m2.shape[-1],
        act.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), m2.stride(0), m2.stride(1), bias2.stride(0),
        out.stride(0),
        HAS_BIAS=b2 is not None, SCALE_OUTPUT=not weight_on_input, A_E4M3=a_e4m3, BLOCK_N=d.block_n,
        BLOCK_K=d.block_k, SPLIT_K=d.split_k, num_warps=d.num_warps, num_stages=d.num_stages, **common,
    )


register_packed_backend("triton", triton_fused_moe_packed)
