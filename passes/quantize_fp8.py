"""quantize_fp8: every fused MoE block's expert weights to FP8 e4m3 (module-level pass).

Per-output-channel scales (w13_scale [E, 2I], w2_scale [E, H] fp32, weights `torch.float8_e4m3fn`), and dynamic
per-token activation scales at run time, so no calibration is needed (ModelOpt cannot calibrate fused 3-D experts
behind our op; see docs/quality.md). Router, shared expert and attention stay in high precision. Blocks already 2:4
sparse get their compressed values quantized (FP8 + 2:4). The block then runs `fused_moe_packed`; emulated in this
version (dequantize + matmul in the activation dtype): quality is real, speed is not.
Counts the blocks it rewrote (`counters["moe_compile"]["quantize_fp8"]`); `result.undo()` puts the weights back.
"""

from __future__ import annotations

from torch import nn

from moe_compile.counters import counters
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.quant.fp8 import quantize_per_channel
from moe_compile.quant.packed import ModulePassResult, PackedExperts, install

NAME = "quantize_fp8"


def quantize_fp8(model: nn.Module) -> ModulePassResult:
    result = ModulePassResult(NAME)
    for name, block in model.named_modules():
        if not isinstance(block, FusedMoEBlock):
            continue
        packed = block.packed
        if packed is not None and packed.fp8:
            result.skipped[name] = "already FP8"
            continue
        w13, w2 = (block.w13, block.w2) if packed is None else (packed.w13, packed.w2)
        m13, m2 = (None, None) if packed is None else (packed.w13_meta, packed.w2_meta)
        q13, s13 = quantize_per_channel(w13)
        q2, s2 = quantize_per_channel(w2)
        result.record(block)
        install(block, PackedExperts(q13, q2, s13, s2, m13, m2))
    counters["moe_compile"][NAME] += result.count
    return result
