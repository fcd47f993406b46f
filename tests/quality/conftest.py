"""Named limits for the quality suite (L8: SQNR for FP8 and 2:4; perplexity gates) and shared fixtures."""

from __future__ import annotations

import pytest
import torch

QUALITY_LIMITS = {
    "fp8_block_min_sqnr_db": 25.0,  # FP8 (weights + per-token activations) vs bf16, fused block outputs
    "fp8_weight_min_sqnr_db": 28.0,  # e4m3 per-channel weight round trip (3 mantissa bits: ~30 dB)
    "fp8_random_op_min_sqnr_db": 20.0,  # random Gaussian weights and router: 4 quantized GEMM operands (~23.5 dB)
    "fp8_max_ppl_increase": 0.01,  # the design's target: FP8 perplexity within 1% of bf16
    "trained_max_ppl": 12.0,  # the shipped model learned something (random init: ~256)
}
EVAL_BYTES = 8192  # held-out bytes for the perplexity tests (the bench default is 16384)


@pytest.fixture(scope="module")
def fused_quality_model():
    """The shipped quality model (bf16), fused with the conservative profile."""
    import moe_compile as mc
    from moe_compile.quality import load_quality_model

    return mc.optimize(load_quality_model(torch.bfloat16), "conservative", verify=False)
