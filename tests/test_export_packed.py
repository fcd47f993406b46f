"""Checkpoints of models whose fused blocks hold packed experts (FP8, 2:4, FP8 + 2:4): export -> load gives the same
logits, the manifest records the weight format, the file keeps float8 / uint8 tensors, and a damaged manifest or
skeleton fails with a clear error. CPU, tiny Qwen3-MoE."""

from __future__ import annotations

import json

import pytest
import torch

import moe_compile as mc
from moe_compile.checkpoint import MANIFEST_NAME, WEIGHTS_NAME
from moe_compile.checkpoint.restore import read_header
from moe_compile.errors import CheckpointError
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.models import build_tiny_model
from moe_compile.passes.quantize_fp8 import quantize_fp8
from moe_compile.passes.sparsify_24 import sparsify_24
from moe_compile.quant import FP8_DTYPE

FORMATS = ["fp8", "sparse24", "fp8+sparse24"]


def packed_model(fmt: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = build_tiny_model("tiny-qwen3-moe", dtype=dtype)
    mc.optimize(model, "conservative", verify=False)
    if "sparse24" in fmt:
        sparsify_24(model)
    if "fp8" in fmt:
        quantize_fp8(model)
    return model


def blocks(model) -> list[FusedMoEBlock]:
    return [m for m in model.modules() if isinstance(m, FusedMoEBlock)]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_round_trip_gives_identical_logits(fmt, tmp_path):
    model = packed_model(fmt)
    out = mc.export(model, tmp_path / "ckpt")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 2 and [b["weight_format"] for b in manifest["blocks"]] == [fmt, fmt]
    header = read_header(out / WEIGHTS_NAME)
    name = manifest["blocks"][0]["name"]
    assert f"{name}.w13" not in header  # no dense copy is saved
    assert header[f"{name}.packed.w13"][1] == (FP8_DTYPE if "fp8" in fmt else torch.float32)
    if "sparse24" in fmt:
        assert header[f"{name}.packed.w13_meta"][1] == torch.uint8
    if "fp8" in fmt:
        assert header[f"{name}.packed.w13_scale"] == ((8, 48), torch.float32)
    loaded = mc.load(out)
    assert all(b.packed is not None and b.packed.weight_format == fmt and b.w13 is None for b in blocks(loaded))
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_load_in_another_dtype_keeps_fp8_weights_and_fp32_scales(tmp_path):
    model = packed_model("fp8+sparse24", torch.bfloat16)
    out = mc.export(model, tmp_path / "ckpt")
    loaded = mc.load(out, dtype=torch.float16)
    packed = blocks(loaded)[0].packed
    assert packed.w13.dtype == FP8_DTYPE and packed.w13_scale.dtype == torch.float32
    assert packed.w13_meta.dtype == torch.uint8 and blocks(loaded)[0].router_weight.dtype == torch.float16
    assert logits(loaded, IDS).dtype == torch.float16


def test_calibrated_fp8_model_round_trips_with_its_record(tmp_path):
    model = build_tiny_model("tiny-qwen3-moe")
    mc.optimize(model, "conservative", fp8=True, verify=False)  # ModelOpt calibration when installed, else max
    out = mc.export(model, tmp_path / "ckpt")
    loaded = mc.load(out)
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    expected = model.moe_compile.quality["fp8"]["calibration"]
    assert loaded.moe_compile.quality["fp8"]["calibration"] == expected


def test_dense_checkpoints_stay_version_1(tmp_path):
    model = build_tiny_model("tiny-qwen3-moe")
    mc.optimize(model, "conservative", verify=False)
    manifest = json.loads((mc.export(model, tmp_path / "ckpt") / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 1 and {b["weight_format"] for b in manifest["blocks"]} == {"dense"}


def test_manifest_format_that_does_not_match_the_weights_fails(tmp_path):
    out = mc.export(packed_model("fp8"), tmp_path / "ckpt")
    path = out / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["blocks"][0]["weight_format"] = "fp8+sparse24"
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="packed.w13 has shape .* 'fp8\\+sparse24' block"):
        mc.load(out)
    manifest["blocks"][0]["weight_format"] = "int4"
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unknown weight_format 'int4'.*upgrade moe_compile"):
        mc.load(out)


def test_skeleton_with_other_weight_format_fails(tmp_path):
    out = mc.export(packed_model("fp8"), tmp_path / "ckpt")
    skeleton = build_tiny_model("tiny-qwen3-moe", seed=123)
    mc.optimize(skeleton, "conservative", verify=False)  # fused, but dense
    with pytest.raises(CheckpointError, match="holds dense expert weights, the checkpoint fp8"):
        mc.load(out, model=skeleton)
    packed_skeleton = packed_model("fp8")
    assert torch.equal(logits(mc.load(out, model=packed_skeleton), IDS), logits(packed_model("fp8"), IDS))


def test_packed_blocks_still_refuse_onnx_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match="model.layers.0.mlp .*weights=fp8.* in this version to onnx"):
        mc.export(packed_model("fp8"), tmp_path / "ckpt", format="onnx",
                  example_input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert list(tmp_path.iterdir()) == []
