"""quantize_fp8: every fused MoE block's expert weights to FP8 e4m3 (module-level pass).

Per-output-channel scales (w13_scale [E, 2I], w2_scale [E, H] fp32, weights `torch.float8_e4m3fn`), and dynamic
per-token activation scales at run time. The weight scales are either computed here (max calibration:
amax over the input dim / 448) or passed in precomputed per block, e.g. calibrated by NVIDIA ModelOpt
(`moe_compile.quant.modelopt_calib`, which can also search them by MSE); weights beyond a given scale's range are
clamped to ±448. Router, shared expert and attention stay in high precision. Blocks already 2:4 sparse get their
compressed values quantized (FP8 + 2:4). The block then runs `fused_moe_packed`.
Counts the blocks it rewrote (`counters["moe_compile"]["quantize_fp8"]`); `result.undo()` puts the weights back.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

from torch import Tensor, nn

from moe_compile.counters import counters
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.quant.fp8 import quantize_per_channel, quantize_rows
from moe_compile.quant.packed import ModulePassResult, PackedExperts, convert_blocks

NAME = "quantize_fp8"
Scales = dict[str, tuple[Tensor, Tensor]]  # block name -> (w13_scale [E, 2I], w2_scale [E, H]) fp32


def quantize_with_scale(w: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """w [..., N, K] with a given scale [..., N] -> (q [..., N, K] float8_e4m3fn, scale fp32)."""
    if tuple(scale.shape) != tuple(w.shape[:-1]):
        raise ValueError(f"FP8 scale of shape {tuple(scale.shape)} does not fit weights {tuple(w.shape)} "
                         f"(expected {tuple(w.shape[:-1])}: one scale per output channel)")
    return quantize_rows(w, scale)


def fp8_experts(w13: Tensor, w2: Tensor, scales: Optional[tuple[Tensor, Tensor]] = None,
                w13_meta: Optional[Tensor] = None, w2_meta: Optional[Tensor] = None) -> PackedExperts:
    """Expert weights (dense, or 2:4-compressed values with their metadata) as FP8 `PackedExperts`, with the given
    per-output-channel `scales` (w13_scale [E, 2I], w2_scale [E, H]) or max scales. Shared by the module pass and
    the graph pass (`pack_weights_graph`)."""
    if scales is not None:
        (q13, s13), (q2, s2) = (quantize_with_scale(w, s) for w, s in zip((w13, w2), scales))
    else:
        (q13, s13), (q2, s2) = quantize_per_channel(w13), quantize_per_channel(w2)
    return PackedExperts(q13, q2, s13, s2, w13_meta, w2_meta)


def quantize_fp8(model: nn.Module, scales: Optional[Scales] = None, offload: Optional[bool] = None
                 ) -> ModulePassResult:
    """Quantize every fused block; `scales[name]` (optional, per block) replaces the built-in max scales.
    Blocks are converted one at a time (all or nothing); `offload` keeps the previous weights in host memory for
    undo (None: when the GPU lacks room for both, see `quant.packed.convert_blocks`)."""
    result = ModulePassResult(NAME)
    planned = []
    for name, block in model.named_modules():
        if not isinstance(block, FusedMoEBlock):
            continue
        packed = block.packed
        if packed is not None and packed.fp8:
            result.skipped[name] = "already FP8"
            continue
        planned.append((block, partial(_fp8_block, block, (scales or {}).get(name))))
    convert_blocks(result, planned, offload)
    counters["moe_compile"][NAME] += result.count
    return result


def _fp8_block(block: FusedMoEBlock, scales: Optional[tuple[Tensor, Tensor]]) -> PackedExperts:
    packed = block.packed
    w13, w2 = (block.w13, block.w2) if packed is None else (packed.w13, packed.w2)
    m13, m2 = (None, None) if packed is None else (packed.w13_meta, packed.w2_meta)
    return fp8_experts(w13, w2, scales, m13, m2)
