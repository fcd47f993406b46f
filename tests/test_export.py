"""Optimized checkpoints: export -> load round trips for every tiny family, damaged checkpoints, atomic writes, and
the torch-tensorrt emit up to the missing-dependency boundary. CPU, fp32."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import moe_compile as mc
from moe_compile.checkpoint import MANIFEST_NAME, WEIGHTS_NAME
from moe_compile.errors import CheckpointError, FeatureUnavailableError, MissingDependencyError
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.models import TINY_MODELS, build_tiny_model, tiny_model_names

REPO = Path(__file__).resolve().parents[1]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@functools.cache
def optimized(name: str) -> torch.nn.Module:
    """The tiny model `name`, optimized (conservative profile, no probe verification: these tests compare against
    the optimized model itself), built once per test session."""
    model = build_tiny_model(name)
    mc.optimize(model, "conservative", verify=False)
    return model


def is_hf(name: str) -> bool:
    return TINY_MODELS[name].builder is None


def skeleton(name: str) -> torch.nn.Module:
    """A freshly built model of the same architecture, different weights (what a user passes as `model=`)."""
    return build_tiny_model(name, seed=123)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def greedy(model: torch.nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    if is_hf(name):
        return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    from moe_compile.models.user_modules import greedy_generate

    return greedy_generate(model, ids, 6)


def _fused_or_skip(name: str) -> torch.nn.Module:
    model = optimized(name)
    if not model.moe_compile.fused:
        pytest.skip(f"{name}: optimize fuses no block ({model.moe_compile.skipped or 'no MoE block'})")
    return model


def forbid_proving(monkeypatch) -> None:
    """From here on, fail the test if anything proves a block (load must not re-prove)."""
    def refuse(*args, **kwargs):
        raise AssertionError("load must not prove blocks")

    import moe_compile.api
    import moe_compile.rewrite

    monkeypatch.setattr(moe_compile.rewrite, "prove", refuse)
    monkeypatch.setattr(moe_compile.api, "prove", refuse)


@pytest.mark.parametrize("name", tiny_model_names())
def test_roundtrip_matches_optimized_model(name, tmp_path, monkeypatch):
    model = _fused_or_skip(name)
    forbid_proving(monkeypatch)
    out = mc.export(model, tmp_path / "ckpt")
    files = {p.name for p in out.iterdir()}
    assert {MANIFEST_NAME, WEIGHTS_NAME} <= files
    assert not {p for p in files if Path(p).suffix in PICKLE_SUFFIXES}, files  # nothing pickled
    assert ("config.json" in files) == is_hf(name)

    loaded = mc.load(out) if is_hf(name) else mc.load(out, model=skeleton(name))
    assert loaded.moe_compile.fused == model.moe_compile.fused
    for block_name in model.moe_compile.fused:
        block, original = loaded.get_submodule(block_name), model.get_submodule(block_name)
        assert isinstance(block, FusedMoEBlock)
        assert block.spec == original.spec and block.source_class == original.source_class
    assert not loaded.training

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    expected, actual = logits(model, ids), logits(loaded, ids)
    assert (actual - expected).abs().max().item() <= 1e-5
    assert torch.equal(greedy(loaded, name, ids[:1]), greedy(model, name, ids[:1]))


def test_manifest_records_what_was_applied(tmp_path):
    model = optimized("tiny-qwen2-moe")
    out = mc.export(model, tmp_path / "ckpt")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["format"] == "moe_compile.checkpoint" and manifest["format_version"] == 1
    assert manifest["kind"] == "safetensors"
    assert set(manifest["versions"]) >= {"moe_compile", "torch", "transformers", "safetensors"}
    assert [b["name"] for b in manifest["blocks"]] == model.moe_compile.fused
    block = manifest["blocks"][0]
    assert block["spec"] == model.get_submodule(block["name"]).spec.to_dict()
    assert block["source_class"] == "Qwen2MoeSparseMoeBlock" and block["spec"]["shared_expert"] == "gated"
    assert block["shared_expert_class"] == "Qwen2MoeMLP" and block["shared_expert_gate_class"] == "Linear"
    assert manifest["optimize"]["profile"] == "conservative"
    assert manifest["optimize"]["passes"] == model.moe_compile.passes
    from moe_compile.checkpoint.manifest import sha256_file

    for file_name, info in manifest["files"].items():
        assert sha256_file(out / file_name) == info["sha256"]
    assert set(manifest["files"]) == {WEIGHTS_NAME, "config.json", "generation_config.json"}
    loaded = mc.load(out)
    assert loaded.moe_compile.profile == "conservative"
    assert loaded.moe_compile.passes[:-1] == model.moe_compile.passes
    assert loaded.moe_compile.passes[-1].startswith("load:")


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model = build_tiny_model("tiny-qwen3-moe", tie_word_embeddings=True)
    mc.optimize(model, "conservative", verify=False)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    out = mc.export(model, tmp_path / "ckpt")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["aliases"] in ({"lm_head.weight": "model.embed_tokens.weight"},
                                   {"model.embed_tokens.weight": "lm_head.weight"})
    loaded = mc.load(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 128, (1, 7))
    assert torch.allclose(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_load_into_an_optimized_skeleton_and_cast(tmp_path):
    model = optimized("tiny-qwen3-moe")
    out = mc.export(model, tmp_path / "ckpt")
    target = build_tiny_model("tiny-qwen3-moe", seed=7)
    mc.optimize(target, "conservative", verify=False)
    loaded = mc.load(out, model=target, dtype=torch.bfloat16)
    assert loaded is target
    assert loaded.get_submodule(model.moe_compile.fused[0]).w13.dtype == torch.bfloat16
    ids = torch.randint(0, 128, (1, 7))
    assert torch.allclose(logits(loaded, ids).float(), logits(model, ids), atol=0.1, rtol=0)


def test_cli_export_carries_the_report_and_rejects_reserved_names(tmp_path):
    from moe_compile.checkpoint import export_for_cli

    model = optimized("tiny-qwen3-moe")
    out = export_for_cli(model, tmp_path / "ckpt", report={"result": model.moe_compile.to_dict()})
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert "moe_compile_report.json" in manifest["files"]
    assert json.loads((out / "moe_compile_report.json").read_text())["result"]["fused"] == model.moe_compile.fused
    mc.load(out)
    with pytest.raises(CheckpointError, match="plain file name"):
        mc.export(model, tmp_path / "bad", extra_files={"config.json": {}})
    assert not (tmp_path / "bad").exists()


def test_non_hf_model_needs_a_skeleton(tmp_path):
    out = mc.export(_fused_or_skip("tiny-user-gpt-fast"), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="model=skeleton"):
        mc.load(out)


def test_wrong_skeleton_fails_with_key_report(tmp_path):
    out = mc.export(optimized("tiny-qwen3-moe"), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="has no module|do not fit"):
        mc.load(out, model=build_tiny_model("tiny-user-modulelist"))


def test_packed_blocks_refuse_onnx_before_writing(tmp_path):
    from moe_compile.passes.quantize_fp8 import quantize_fp8

    model = mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative", verify=False)
    assert quantize_fp8(model).count == 2
    with pytest.raises(CheckpointError, match="cannot export model.layers.0.mlp .*FP8/2:4 packed experts"):
        mc.export(model, tmp_path / "ckpt", format="onnx", example_input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert list(tmp_path.iterdir()) == []


def test_sharded_models_refuse_onnx_before_writing(tmp_path):
    """Sharded export works as safetensors (tests/parallel); ONNX is refused up front, on every rank alike."""
    from moe_compile.parallel.expert_parallel import ExpertParallelMoEBlock

    model = mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative", verify=False)
    shard = ExpertParallelMoEBlock.__new__(ExpertParallelMoEBlock)  # the type is what export checks first
    torch.nn.Module.__init__(shard)
    model.model.layers[1].mlp = shard
    with pytest.raises(CheckpointError, match="exports as safetensors only"):
        mc.export(model, tmp_path / "ckpt", format="onnx", example_input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert list(tmp_path.iterdir()) == []


# --- damaged checkpoints -----------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return mc.export(optimized("tiny-qwen3-moe"), tmp_path / "ckpt")


def test_truncated_weights_fail(checkpoint):
    weights = checkpoint / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        mc.load(checkpoint)


def test_tampered_weights_fail(checkpoint):
    weights = checkpoint / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's data: same size, still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        mc.load(checkpoint)


def test_missing_manifest_fails(checkpoint):
    (checkpoint / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"no {MANIFEST_NAME}"):
        mc.load(checkpoint)


def test_newer_manifest_version_fails(checkpoint):
    path = checkpoint / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format_version 99, newer .* upgrade moe_compile"):
        mc.load(checkpoint)


def test_missing_directory_and_unknown_format_fail(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        mc.load(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="unknown export format"):
        mc.export(optimized("tiny-qwen3-moe"), tmp_path / "x", format="pickle")
    assert not (tmp_path / "x").exists()


# --- atomic writes -----------------------------------------------------------------------------------------------


def _side_dirs(target: Path) -> list[Path]:
    return [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.moe_compile-")]


def test_existing_target_needs_force_and_is_replaced_whole(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="force=True"):
        mc.export(optimized("tiny-qwen3-moe"), target)
    assert (target / "keep.txt").read_text() == "user data"
    mc.export(optimized("tiny-qwen3-moe"), target, force=True)
    assert not (target / "keep.txt").exists() and (target / MANIFEST_NAME).is_file()
    assert _side_dirs(target) == []
    mc.load(target)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    from moe_compile.checkpoint import atomic

    def boom(path):
        if path.name == "config.json":
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(atomic, "after_file_written", boom)
    with pytest.raises(OSError, match="simulated"):
        mc.export(optimized("tiny-qwen3-moe"), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import moe_compile as mc
    from moe_compile.checkpoint import atomic
    from moe_compile.models import build_tiny_model

    def hook(path):
        print("WROTE", path, flush=True)
        time.sleep(60)

    model = build_tiny_model("tiny-user-gpt-fast")
    mc.optimize(model, "conservative", verify=False)
    atomic.after_file_written = hook
    mc.export(model, sys.argv[1])
""")


def test_killed_export_leaves_no_partial_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MOE_COMPILE_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 90
        line = ""
        while time.monotonic() < deadline and not line.startswith("WROTE"):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert line.startswith("WROTE"), f"the writer never wrote a file (exit code {proc.poll()})"
        assert Path(line.split(" ", 1)[1].strip()).is_file()  # the first file is on disk, in the temp dir
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not target.exists()  # no partial directory at the target
    stale = _side_dirs(target)
    assert len(stale) == 1 and ".moe_compile-tmp-" in stale[0].name  # only the killed writer's temp dir
    out = mc.export(_fused_or_skip("tiny-user-gpt-fast"), target)  # not blocked, and it cleans the dead one's dir
    assert _side_dirs(target) == []
    mc.load(out, model=skeleton("tiny-user-gpt-fast"))


# --- torch-tensorrt emit (torch-tensorrt cannot be installed here: up to that boundary) ----------------------------


def test_tensorrt_missing_dependency_names_the_extra(monkeypatch):
    from moe_compile.emit import tensorrt

    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # import of it raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'moe-compile\[tensorrt\]'"):
        tensorrt.import_torch_tensorrt()
    with pytest.raises(MissingDependencyError, match="moe-compile"):
        tensorrt.compile_tensorrt(torch.nn.Linear(2, 2), [torch.zeros(1, 2)])
    assert "moe-compile[tensorrt]" in tensorrt.unavailable_reason(torch.device("cuda"))
    assert "CUDA" in tensorrt.unavailable_reason(torch.device("cpu"))


def test_tensorrt_settings_keep_fused_moe_in_pytorch_with_cuda_graphs(monkeypatch):
    from moe_compile.emit import tensorrt

    model = optimized("tiny-qwen3-moe")
    settings = tensorrt.settings_for(model)
    kwargs = settings.compile_kwargs()
    assert kwargs["torch_executed_ops"] == {"torch.ops.moe_compile.fused_moe.default"}
    assert kwargs["ir"] == "dynamo" and kwargs["min_block_size"] == 1
    assert kwargs["enabled_precisions"] == {torch.float32}
    assert settings.cuda_graphs
    assert eval(next(iter(kwargs["torch_executed_ops"])), {"torch": torch}) is torch.ops.moe_compile.fused_moe.default

    calls = {}

    class FakeCudaGraphs:
        def __init__(self, module):
            calls["cudagraphs"] = module

        def __enter__(self):
            return lambda *a: ("graphed", calls["cudagraphs"](*a))

        def __exit__(self, *exc):
            calls["exited"] = True

    class FakeTRT:
        class runtime:
            enable_cudagraphs = FakeCudaGraphs

        @staticmethod
        def compile(module, arg_inputs, **kw):
            calls["compile"] = (module, arg_inputs, kw)
            return lambda *a: "trt-out"

    monkeypatch.setitem(sys.modules, "torch_tensorrt", FakeTRT)
    with pytest.raises(FeatureUnavailableError, match="CUDA"):  # CPU inputs stop before compiling
        tensorrt.compile_tensorrt(model, [torch.zeros(1, 4, dtype=torch.long)])
    assert "compile" not in calls
    monkeypatch.setattr(tensorrt, "_all_cuda", lambda inputs: True)  # no GPU here: pretend the inputs are on one
    compiled = tensorrt.compile_tensorrt(model, [torch.zeros(1, 4, dtype=torch.long)], settings)
    assert calls["compile"][0] is model and calls["compile"][2] == kwargs
    assert compiled(1) == ("graphed", "trt-out")
    compiled.close()
    assert calls["exited"]
