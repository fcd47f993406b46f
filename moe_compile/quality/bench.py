"""The perplexity table behind `moe-compile bench --quality`: the shipped quality model's held-out perplexity with
its expert weights in bf16, FP8, 2:4 and FP8 + 2:4, 2:4 both by magnitude and by SparseGPT (calibrated on the
training text), and 2:4 of the whole model (SparseGPT experts, ModelOpt's 2:4 of the dense linears); emulated
numerics (see docs/quality.md)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

VARIANTS = ("bf16", "fp8", "2:4", "fp8+2:4", "2:4 sparsegpt", "fp8+2:4 sparsegpt")
# 2:4 of the whole model: the experts by our SparseGPT, the dense linears by NVIDIA ModelOpt's (where installed),
# both calibrated on the training text
MODELOPT_VARIANTS = ("2:4 sparsegpt + linears",)


def variants() -> tuple[str, ...]:
    """The rows `quality_table` measures here: the ModelOpt ones only where ModelOpt is installed."""
    import importlib.util

    return VARIANTS + (MODELOPT_VARIANTS if importlib.util.find_spec("modelopt") is not None else ())


@dataclass
class QualityRow:
    variant: str
    perplexity: float
    increase: float  # relative to the bf16 row
    bits_per_byte: float
    expert_bytes: int  # storage of the fused blocks' expert weights (values + scales + metadata)
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def expert_bytes(model: nn.Module) -> int:
    from moe_compile.fused_block import FusedMoEBlock
    from moe_compile.quant.packed import expert_weight_bytes

    return expert_weight_bytes([block for block in model.modules() if isinstance(block, FusedMoEBlock)])


def quality_table(max_bytes: int = 16384, dtype: torch.dtype = torch.bfloat16) -> list[QualityRow]:
    """Load the shipped model, fuse it (`conservative`), then measure each variant (passes applied, then undone)."""
    import moe_compile as mc
    from moe_compile.passes.quantize_fp8 import quantize_fp8
    from moe_compile.passes.sparsify_24 import sparsify_24
    from moe_compile.passes.sparsify_linears_24 import sparsify_linears_24
    from moe_compile.quality import load_quality_model, perplexity

    model = mc.optimize(load_quality_model(dtype), "conservative", verify=False)
    pruned: dict = {}  # SparseGPT's 2:4 weights, computed once (calibrated on the training text, not held-out)

    def sparsegpt(m: nn.Module):
        if not pruned:
            from moe_compile.quant.gate import sparsity_pruned

            pruned.update({name: prune() for name, prune in sparsity_pruned(m, None, "sparsegpt")[0].items()})
        return sparsify_24(m, dict(pruned))  # a copy: sparsify_24 takes its entries out as it uses them

    def sparsegpt_linears(m: nn.Module):
        from moe_compile.quant.gate import sparsity_calibration

        return sparsify_linears_24(m, sparsity_calibration(m, None)[0])  # the experts' SparseGPT text

    steps = {"bf16": [], "fp8": [quantize_fp8], "2:4": [sparsify_24], "fp8+2:4": [sparsify_24, quantize_fp8],
             "2:4 sparsegpt": [sparsegpt], "fp8+2:4 sparsegpt": [sparsegpt, quantize_fp8],
             "2:4 sparsegpt + linears": [sparsegpt, sparsegpt_linears]}
    rows: list[QualityRow] = []
    base = None
    for variant in variants():
        applied = [run(model) for run in steps[variant]]
        start = time.perf_counter()
        ppl = perplexity(model, max_bytes=max_bytes)
        seconds = time.perf_counter() - start
        base = ppl if base is None else base
        rows.append(QualityRow(variant, ppl, ppl / base - 1.0, math.log2(ppl), expert_bytes(model), seconds))
        for result in reversed(applied):
            result.undo()
    return rows
