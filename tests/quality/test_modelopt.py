"""FP8 calibration through the real NVIDIA ModelOpt (`moe_compile.quant.modelopt_calib`), on tiny Qwen3-MoE and
Mixtral models built from config: expert coverage, scales against the weight amax, the model left untouched on
failure, FP8 logits against fp32, and the missing-dependency paths (a subprocess where `modelopt` cannot be
imported). CPU; the last test runs the same calibration on CUDA."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import moe_compile as mc
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.models import build_tiny_model
from moe_compile.passes.quantize_fp8 import quantize_with_scale
from moe_compile.quant import FP8_DTYPE, dequantize_per_channel, modelopt_calib, quantize_per_channel
from tests.conftest import relative_error

# the dev extra installs nvidia-modelopt; without it only the missing-dependency test runs
needs_modelopt = pytest.mark.skipif(importlib.util.find_spec("modelopt") is None,
                                    reason="nvidia-modelopt not installed (pip install 'moe-compile[modelopt]')")

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ["tiny-qwen3-moe", "tiny-mixtral"]
SCALE_RTOL = 1e-6  # ModelOpt's amax / 448 vs ours: the same fp32 max, divided once (fp32 rounding at most)
# FP8 e4m3 weights (3 mantissa bits) + per-token activations vs the fp32 model, 2 MoE layers: measured 2.0e-3 (Qwen3)
# and 2.6e-3 (Mixtral) relative L2 error on the logits; the bound leaves ~8x room
FP8_LOGITS_MAX_REL_ERROR = 0.02


def fused(name: str) -> torch.nn.Module:
    model = build_tiny_model(name)
    return mc.optimize(model, "conservative", verify=False)


def blocks(model) -> dict[str, FusedMoEBlock]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FusedMoEBlock)}


def calibration_ids(n: int = 600, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@needs_modelopt
@pytest.mark.parametrize("name", FAMILIES)
def test_max_calibration_covers_every_expert_and_equals_weight_amax(name):
    model = fused(name)
    before = snapshot(model)
    calibration = modelopt_calib.calibrate_fp8(model, calibration_ids(), "max")
    assert_same_state(model, before)  # the model is only read
    assert all(not b._forward_pre_hooks for b in blocks(model).values())  # recording hooks removed
    assert calibration.blocks.keys() == blocks(model).keys()
    for block_name, block in blocks(model).items():
        record = calibration.blocks[block_name]
        expected13, expected2 = quantize_per_channel(block.w13)[1], quantize_per_channel(block.w2)[1]
        torch.testing.assert_close(record.w13_scale, expected13, rtol=SCALE_RTOL, atol=0)
        torch.testing.assert_close(record.w2_scale, expected2, rtol=SCALE_RTOL, atol=0)
        assert record.w13_scale.shape == block.w13.shape[:2] and record.w2_scale.dtype == torch.float32
        assert record.tokens == 512 and sum(record.expert_tokens) == 512 * block.spec.top_k  # 2 windows of 256
        assert all(v is not None and v > 0 for v in record.input_amax.values())  # static input amax recorded
    summary = calibration.record()
    experts = sum(b.spec.num_experts for b in blocks(model).values())
    assert summary["method"] == "modelopt" and summary["algorithm"] == "max"
    assert summary["experts_calibrated"] == f"{experts}/{experts}" and summary["min_routed_tokens"] > 0
    assert summary["input_amax"].keys() == calibration.blocks.keys()


@needs_modelopt
def test_24_sparse_blocks_calibrate_on_their_kept_values():
    from moe_compile.passes.sparsify_24 import sparsify_24

    model = fused("tiny-qwen3-moe")
    assert sparsify_24(model).count == 2
    calibration = modelopt_calib.calibrate_fp8(model, calibration_ids(), "max")
    for block_name, block in blocks(model).items():
        w13_scale, w2_scale = calibration.scales[block_name]
        torch.testing.assert_close(w13_scale, quantize_per_channel(block.packed.w13)[1], rtol=SCALE_RTOL, atol=0)
        torch.testing.assert_close(w2_scale, quantize_per_channel(block.packed.w2)[1], rtol=SCALE_RTOL, atol=0)


@needs_modelopt
def test_experts_the_router_skips_are_fed_tokens():
    model = fused("tiny-qwen3-moe")
    block = next(iter(blocks(model).values()))
    x = torch.randn(3, block.spec.hidden_size)  # 3 tokens x top-2: at most 6 of the 8 experts are routed
    groups, counts, forced = modelopt_calib.route_for_calibration(block, x)
    assert sum(n == 0 for n in counts) >= 2 and set(forced) >= {e for e, n in enumerate(counts) if n == 0}
    assert sorted(e for e, _, _ in groups) == list(range(block.spec.num_experts))  # every expert runs
    assert all(rows.numel() == 3 for _, rows, _ in groups)  # min(MIN_EXPERT_TOKENS, T) tokens each
    calibration = modelopt_calib.calibrate_block(modelopt_calib.import_mtq(), block, x, "max")
    assert calibration.forced_experts == forced and calibration.input_amax["w2"] > 0


@needs_modelopt
def test_mse_scales_lower_the_weight_error_in_every_channel():
    model = fused("tiny-mixtral")
    calibration = modelopt_calib.calibrate_fp8(model, None, "mse")  # weights only: no calibration tokens needed
    for block_name, block in blocks(model).items():
        for w, scale in zip((block.w13, block.w2), calibration.scales[block_name]):
            q, s = quantize_with_scale(w, scale)
            error_mse = (dequantize_per_channel(q, s) - w).pow(2).sum(-1)  # [E, N]
            q, s = quantize_per_channel(w)
            error_max = (dequantize_per_channel(q, s) - w).pow(2).sum(-1)
            assert bool((error_mse <= error_max * (1 + 1e-6)).all()) and error_mse.sum() < 0.9 * error_max.sum()
    assert calibration.record()["tokens_per_block"] == 0


@needs_modelopt
@pytest.mark.parametrize("name", FAMILIES)
def test_optimize_uses_modelopt_and_fp8_logits_stay_close(name):
    reference = build_tiny_model(name)
    model = build_tiny_model(name)
    mc.optimize(model, "conservative", fp8=True, calibration_text=calibration_ids(), verify=False,
                quality_thresholds={"fp8": 1.0}, fp8_attention=False)  # the experts' calibration alone
    record = model.moe_compile.quality["fp8"]
    assert record["applied"] and record["calibration"]["method"] == "modelopt"
    assert record["calibration"]["modelopt"] == modelopt_calib.modelopt_version()
    assert all(b.packed.w13.dtype == FP8_DTYPE for b in blocks(model).values())
    ids = calibration_ids(32, seed=1).reshape(2, 16)
    with torch.no_grad():
        assert relative_error(model(ids).logits, reference(ids).logits) < FP8_LOGITS_MAX_REL_ERROR


@needs_modelopt
def test_user_model_unchanged_when_calibration_fails_midway(monkeypatch):
    model = build_tiny_model("tiny-qwen3-moe")
    before = snapshot(model)
    original_classes = [type(layer.mlp) for layer in model.model.layers]
    real = modelopt_calib.calibrate_block
    calls = []

    def fail_on_second_block(*args, **kwargs):  # the real ModelOpt calibration, then an error on block 2
        calls.append(real(*args, **kwargs))
        if len(calls) == 2:
            raise RuntimeError("calibration failed midway")
        return calls[-1]

    monkeypatch.setattr(modelopt_calib, "calibrate_block", fail_on_second_block)
    with pytest.raises(RuntimeError, match="midway"):  # 2:4 is applied first, FP8 calibration then fails
        mc.optimize(model, "conservative", fp8=True, sparsity_24=True, fp8_calibration="modelopt", verify=False)
    assert len(calls) == 2
    assert [type(layer.mlp) for layer in model.model.layers] == original_classes
    assert_same_state(model, before)


def test_unknown_calibration_mode_is_refused():
    with pytest.raises(ValueError, match="fp8_calibration='best' is not one of"):
        mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative", fp8=True, fp8_calibration="best")


def run_without_modelopt(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where `import modelopt` fails (None in sys.modules: Python's own way to
    make a module unimportable)."""
    prelude = "import sys; sys.modules['modelopt'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_without_modelopt_auto_falls_back_with_a_clear_log_line_and_forced_modelopt_fails():
    done = run_without_modelopt("""
        import moe_compile as mc
        from moe_compile.errors import MissingDependencyError
        from moe_compile.models import build_tiny_model
        model = mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative", fp8=True, verify=False)
        print("RECORD", model.moe_compile.quality["fp8"]["calibration"])
        try:
            mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative", fp8=True, fp8_calibration="modelopt")
        except MissingDependencyError as exc:
            print("ERROR", exc)
        try:
            mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative", sparsity_24=True, sparse_linears=True)
        except MissingDependencyError as exc:
            print("ERROR", exc)
    """)
    assert done.returncode == 0, done.stderr
    assert "pip install 'moe-compile[modelopt]'" in done.stderr  # the warning log line
    assert "built-in max calibration" in done.stderr
    assert "RECORD {'method': 'max'" in done.stdout
    assert "ERROR FP8 calibration with ModelOpt needs nvidia-modelopt: pip install 'moe-compile[modelopt]'" \
        in done.stdout
    assert "ERROR 2:4 sparsity of the dense linears needs nvidia-modelopt: pip install 'moe-compile[modelopt]'" \
        in done.stdout


@needs_modelopt
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
def test_modelopt_calibration_and_fp8_model_on_cuda():
    reference = build_tiny_model("tiny-qwen3-moe", dtype=torch.bfloat16).cuda()
    model = build_tiny_model("tiny-qwen3-moe", dtype=torch.bfloat16).cuda()
    mc.optimize(model, "conservative", verify=False)
    calibration = modelopt_calib.calibrate_fp8(model, calibration_ids().cuda(), "max")
    for block_name, block in blocks(model).items():
        torch.testing.assert_close(calibration.blocks[block_name].w13_scale, quantize_per_channel(block.w13)[1],
                                   rtol=SCALE_RTOL, atol=0)
        assert calibration.blocks[block_name].w13_scale.is_cuda
    mse = modelopt_calib.calibrate_fp8(model, calibration_ids().cuda(), "mse")  # fake quant on CUDA
    assert mse.record()["experts_calibrated"] == "16/16"
    mc.optimize(model, "conservative", fp8=True, calibration_text=calibration_ids(), verify=False,
                quality_thresholds={"fp8": 1.0}, fp8_attention=False)  # the experts' calibration alone
    assert model.moe_compile.quality["fp8"]["calibration"]["method"] == "modelopt"
    ids = calibration_ids(32, seed=1).reshape(2, 16).cuda()
    with torch.no_grad():
        assert relative_error(model(ids).logits, reference(ids).logits) < FP8_LOGITS_MAX_REL_ERROR
