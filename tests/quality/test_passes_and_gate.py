"""The quantize_fp8 / sparsify_24 module passes, FP8 SQNR on the trained model's blocks, and the quality gate."""

from __future__ import annotations

import pytest
import torch

import moe_compile as mc
from moe_compile.counters import counters
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.models import build_tiny_model
from moe_compile.passes.quantize_fp8 import quantize_fp8
from moe_compile.passes.sparsify_24 import sparsify_24
from moe_compile.quant import FP8_DTYPE, is_24_sparse, sqnr
from moe_compile.quality import encode
from tests.quality.conftest import QUALITY_LIMITS


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, FusedMoEBlock)]


def _block_inputs(model, text=b"import os\nimport sys\n\ndef main(argv=None):\n    return 0\n" * 4):
    """The hidden states each fused block sees on real text: {block: [T, H]}."""
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.setdefault(m, args[0].detach()))
             for b in _blocks(model)]
    with torch.no_grad():
        model(input_ids=encode(text).unsqueeze(0))
    for hook in hooks:
        hook.remove()
    return seen


def test_fp8_block_outputs_sqnr(fused_quality_model):
    model = fused_quality_model
    inputs = _block_inputs(model)
    with torch.no_grad():
        expected = {b: b(x) for b, x in inputs.items()}
        result = quantize_fp8(model)
        try:
            for block, x in inputs.items():
                packed = block.packed
                assert packed.w13.dtype == FP8_DTYPE and packed.w13_scale.shape == packed.w13.shape[:2]
                assert block.w13 is None and block.router_weight.dtype == torch.bfloat16  # router stays high precision
                got = block(x)
                assert sqnr(expected[block], got) > QUALITY_LIMITS["fp8_block_min_sqnr_db"]
        finally:
            result.undo()
        for block, x in inputs.items():  # undo restores the exact bf16 weights
            assert block.packed is None and torch.equal(block(x), expected[block])


def test_pass_counters_order_and_skips():
    model = mc.optimize(build_tiny_model("tiny-qwen2-moe"), "conservative")  # shared expert: stays dense
    n = len(_blocks(model))
    before = dict(counters["moe_compile"])
    sparse = sparsify_24(model)
    fp8 = quantize_fp8(model)
    assert sparse.count == fp8.count == n == 2
    assert counters["moe_compile"]["sparsify_24"] - before.get("sparsify_24", 0) == n
    assert counters["moe_compile"]["quantize_fp8"] - before.get("quantize_fp8", 0) == n
    for block in _blocks(model):
        assert block.packed.weight_format == "fp8+sparse24"
        assert block.shared_expert.gate_proj.weight.dtype == torch.float32  # shared expert untouched
        assert is_24_sparse(block.packed.dense(torch.float32)[0])
    assert quantize_fp8(model).count == 0 and sparsify_24(model).count == 0  # nothing left to do: negative case
    fp8.undo()
    sparse.undo()
    assert all(b.packed is None and b.w13 is not None for b in _blocks(model))
    fp8_only = quantize_fp8(model)
    with pytest.raises(ValueError, match="before quantize_fp8"):  # the order the design fixes
        sparsify_24(model)
    fp8_only.undo()


def test_a_failing_block_undoes_the_blocks_converted_before_it():
    """Blocks convert one at a time; a bad scale on the last one puts the earlier ones back (all or nothing)."""
    model = mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative")
    names = [name for name, m in model.named_modules() if isinstance(m, FusedMoEBlock)]
    last = model.get_submodule(names[-1])
    bad = {names[-1]: (torch.ones(last.w13.shape[0], 3), torch.ones(last.w2.shape[:2]))}
    weights = [(b.w13, b.w2) for b in _blocks(model)]
    with pytest.raises(ValueError, match="does not fit weights"):
        quantize_fp8(model, scales=bad)
    for block, (w13, w2) in zip(_blocks(model), weights):  # the same parameters back, and no packed weights
        assert block.w13 is w13 and block.w2 is w2 and block.packed is None


def test_gate_accepts_fp8_and_rejects_24_at_a_tight_threshold(fused_quality_model):
    from moe_compile.quality import load_quality_model

    model = load_quality_model(torch.bfloat16)
    mc.optimize(model, "aggressive", fp8=True, sparsity_24=True, verify=False,
                quality_thresholds={"fp8": 0.01, "sparsity_24": 0.001})
    r = model.moe_compile
    q24, q8 = r.quality["sparsity_24"], r.quality["fp8"]
    assert q24["gated"] and not q24["applied"] and q24["increase"] > 0.001
    assert q8["gated"] and q8["applied"] and q8["increase"] <= 0.01 and q8["threshold"] == 0.01
    assert r.features["fp8"] is True and r.features["sparsity_24"] is False
    assert "quality gate" in r.unavailable["sparsity_24"]
    assert "emulated" in r.notes["fp8"] and "no speedup" in r.notes["fp8"]
    assert r.pass_counts["quantize_fp8"] == 4 and "sparsify_24" not in r.pass_counts
    assert all(b.packed.weight_format == "fp8" for b in _blocks(model))  # 2:4 rolled back, FP8 kept
    assert "quality gate fp8" in str(r)


def test_auto_never_claims_emulated_features():
    """On the CPU FP8 has no kernels and 2:4 no speedup: `aggressive` leaves both off."""
    model = build_tiny_model("tiny-qwen3-moe")
    mc.optimize(model, "aggressive")
    r = model.moe_compile
    assert r.features["fp8"] is False and r.features["sparsity_24"] is False
    assert "slower than the dense" in r.unavailable["sparsity_24"]
    assert r.quality == {} and all(b.packed is None for b in _blocks(model))


def test_auto_features_without_calibration_text_are_dropped_not_applied_ungated():
    """Where FP8 has kernels `auto` enables it, but only the gate may apply it: no text to measure on, no FP8."""
    from moe_compile.quant.gate import apply_quality_gated
    from moe_compile.report import OptimizeResult

    model = mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative")
    enabled = {"fp8": True, "sparsity_24": False}
    result = OptimizeResult(profile="aggressive", device="cuda", backend="auto", features=dict(enabled))
    assert apply_quality_gated(model, enabled, result, calibration=None, auto_features={"fp8"}) == []
    assert not enabled["fp8"] and result.features["fp8"] is False
    assert "calibration_text" in result.unavailable["fp8"] and all(b.packed is None for b in _blocks(model))


def test_forced_without_calibration_is_applied_ungated():
    model = build_tiny_model("tiny-qwen3-moe")
    mc.optimize(model, "conservative", fp8=True)
    q = model.moe_compile.quality["fp8"]
    assert q["applied"] and not q["gated"] and "calibration" in q["reason"]
    with pytest.raises(ValueError, match="token ids"):
        mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative", fp8=True, calibration_text="some text")
    ids = torch.randint(0, 128, (2, 300))
    model = build_tiny_model("tiny-qwen3-moe")
    mc.optimize(model, "conservative", fp8=True, calibration_text=ids, quality_thresholds={"fp8": 1.0})
    assert model.moe_compile.quality["fp8"]["gated"]
