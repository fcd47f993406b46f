"""2:4 of the dense linears through the real NVIDIA ModelOpt (`passes/sparsify_linears_24.py`) and its gated step
(`sparse_linears=True`, `quality["sparsity_24_linears"]`): which linears are pruned and which are left alone, the
exact undo, and the gate's budget shared with the experts' 2:4. CPU, tiny models built from config and the shipped
quality model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import moe_compile as mc
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.models import build_tiny_model
from moe_compile.quant import is_24_sparse

pytestmark = pytest.mark.skipif(importlib.util.find_spec("modelopt") is None,
                                reason="nvidia-modelopt not installed (pip install 'moe-compile[modelopt]')")


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_prunes_dense_linears_only_and_undoes_exactly(name):
    from moe_compile.passes.sparsify_linears_24 import MODELOPT_STATE_ATTRIBUTES, sparsify_linears_24

    model = mc.optimize(build_tiny_model(name), "conservative")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = sparsify_linears_24(model)
    linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    pruned = [n for n in linears if n not in result.skipped]
    assert result.count == len(pruned) > 0 and "lm_head" in result.skipped
    for n in pruned:
        weight = linears[n].weight
        assert is_24_sparse(weight) and not torch.equal(weight, before[f"{n}.weight"])
    assert torch.equal(model.lm_head.weight, before["lm_head.weight"])
    for block_name, block in model.named_modules():  # experts and routers are sparsify_24's, not ModelOpt's
        if isinstance(block, FusedMoEBlock):
            assert torch.equal(block.w13, before[f"{block_name}.w13"])
    result.undo()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(a in model.__dict__ for a in MODELOPT_STATE_ATTRIBUTES)


def test_sparsegpt_from_calibration_tokens_differs_from_magnitude():
    """Given token ids, ModelOpt's SparseGPT picks (and adjusts) the kept weights from the linears' inputs."""
    from moe_compile.passes.sparsify_linears_24 import sparsify_linears_24

    magnitude = mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative")
    calibrated = mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative")
    sparsify_linears_24(magnitude)
    result = sparsify_linears_24(calibrated, torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(0)))
    assert result.count > 0
    weight, reference = (m.model.layers[0].self_attn.q_proj.weight for m in (calibrated, magnitude))
    assert is_24_sparse(weight) and not torch.equal(weight, reference)


@pytest.fixture(scope="module")
def quality_model():
    from moe_compile.quality import load_quality_model

    return lambda: load_quality_model(torch.bfloat16)


def test_gate_measures_the_linears_step_against_the_model_before_any_24(quality_model):
    model = mc.optimize(quality_model(), "aggressive", sparsity_24=True, sparse_linears=True, verify=False,
                        quality_thresholds={"sparsity_24": 1.0})
    q = model.moe_compile.quality
    experts, linears = q["sparsity_24"], q["sparsity_24_linears"]
    assert experts["applied"] and linears["applied"] and linears["gated"] and linears["linears"] > 0
    assert linears["ppl_base"] == experts["ppl_base"]  # one budget for the feature's two steps
    assert linears["ppl"] > experts["ppl"] and linears["threshold"] == 1.0
    assert experts["calibration"]["method"] == "sparsegpt"  # auto: the quality model calibrates on training text
    assert linears["calibration"] == {"method": "modelopt sparsegpt", "calibration": "training text"}
    assert model.moe_compile.pass_counts["sparsify_linears_24"] == linears["linears"]
    assert "quality gate sparsity_24_linears" in str(model.moe_compile)
    attention = model.model.layers[0].self_attn.q_proj.weight
    assert is_24_sparse(attention)


def test_a_rejected_linears_step_is_undone_alone(quality_model):
    original = quality_model()
    reference = original.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = mc.optimize(original, "aggressive", sparsity_24=True, sparse_linears=True, verify=False,
                        quality_thresholds={"sparsity_24": 1.0, "sparsity_24_linears": 0.0})
    r = model.moe_compile
    assert r.quality["sparsity_24"]["applied"] and r.features["sparsity_24"] is True
    assert not r.quality["sparsity_24_linears"]["applied"] and "quality gate" in r.quality["sparsity_24_linears"][
        "reason"]
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, reference)
    assert "sparsify_linears_24" not in r.pass_counts


def test_off_by_default_and_not_run_when_the_experts_24_is_rejected(quality_model):
    model = mc.optimize(quality_model(), "aggressive", sparsity_24=True, verify=False,
                        quality_thresholds={"sparsity_24": 1.0})
    assert "sparsity_24_linears" not in model.moe_compile.quality
    model = mc.optimize(quality_model(), "aggressive", sparsity_24=True, sparse_linears=True, verify=False,
                        quality_thresholds={"sparsity_24": 0.0})
    record = model.moe_compile.quality["sparsity_24_linears"]
    assert not record["applied"] and "not applied" in record["reason"]
