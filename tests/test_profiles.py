"""Profiles as data: built-ins, user YAML files, overrides, and `auto` resolved per device."""

from __future__ import annotations

import pytest
import torch

import moe_compile as mc
from moe_compile.errors import FeatureUnavailableError, ProfileError
from moe_compile.models import build_tiny_model
from moe_compile.profiles import FEATURES, builtin_profiles, load_profile, resolve_features
from moe_compile.kernels import available_backends

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU to be resolved against


def test_builtin_profiles_load_and_name_every_feature():
    assert {"conservative", "balanced", "aggressive"} <= set(builtin_profiles())
    for name in builtin_profiles():
        profile = load_profile(name)
        assert profile.name == name and profile.description
        assert set(profile.features) == set(FEATURES)
        assert profile.features["fuse_moe"] is True
    assert load_profile("conservative").features["compile"] is False
    assert load_profile("aggressive").features["fp8"] == "auto"


def test_a_user_yaml_profile_works_end_to_end(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ndescription: fused, eager\nfeatures:\n  compile: false\nbackend: reference\n")
    profile = load_profile(str(path))
    assert (profile.name, profile.backend, profile.source) == ("mine", "reference", str(path))
    assert profile.features["compile"] is False and profile.features["fp8"] == "auto"  # unnamed features: auto

    model = mc.optimize(build_tiny_model("tiny-mixtral"), profile=str(path))
    assert model.moe_compile.profile == "mine" and model.moe_compile.backend == "reference"
    assert len(model.moe_compile.fused) == 2


@pytest.mark.parametrize("text, expected", [
    ("features: [compile, fp8\n", "not valid YAML"),  # YAML syntax error
    ("features: 3\n", "'features' mapping"),  # wrong shape
    ("feature:\n  fp8: false\n", "unknown keys"),  # a typo in a top-level key
    ("features:\n  fp8: maybe\n", "true, false or auto"),  # a value that is not a decision
    ("features:\n  fp9: false\n", "unknown option 'fp9'"),  # a feature that does not exist
    ("backend: tpu\n", "backend must be one of"),
])
def test_a_malformed_profile_names_the_file(tmp_path, text, expected):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=expected) as info:
        load_profile(str(path))
    assert str(path) in str(info.value)


def test_an_unknown_profile_lists_the_builtins():
    with pytest.raises(ProfileError, match="balanced"):
        load_profile("fastest")
    with pytest.raises(ProfileError, match="unknown profile"):
        load_profile("missing.yaml")  # a path that does not exist is not silently a built-in


def test_overrides_apply_on_top_and_are_checked():
    profile = load_profile("conservative").with_overrides({"compile": True, "backend": "reference"})
    assert profile.features["compile"] is True and profile.backend == "reference"
    assert load_profile("conservative").features["compile"] is False  # the original is untouched
    with pytest.raises(ProfileError, match="valid options"):
        profile.with_overrides({"fp9": True})
    with pytest.raises(ProfileError, match="true, false or auto"):
        profile.with_overrides({"compile": "yes"})

    model = mc.optimize(build_tiny_model("tiny-olmoe"), "conservative", fuse_moe=False)
    assert model.moe_compile.fused == [] and "rewrite" not in model.moe_compile.passes


def test_auto_resolves_per_device():
    balanced = load_profile("balanced")
    on_cpu = resolve_features(balanced, CPU)
    assert on_cpu.enabled["fuse_moe"] and not on_cpu.enabled["compile"]
    assert on_cpu.unavailable == {}  # auto features that are not useful on CPU are simply off

    on_gpu = resolve_features(balanced, CUDA)
    assert on_gpu.enabled["compile"]
    assert set(on_gpu.unavailable) <= {"cuda_graphs", "specialize_phase"}  # both need a GPU backend on the machine
    if "triton" in available_backends():
        assert on_gpu.enabled["cuda_graphs"]
    else:
        assert "triton" in on_gpu.unavailable["cuda_graphs"]
    if {"triton", "cuda"} & set(available_backends()):
        assert on_gpu.enabled["specialize_phase"]
    else:
        assert "needs a GPU fused_moe backend" in on_gpu.unavailable["specialize_phase"]
    assert all(reason and not on_gpu.enabled[name] for name, reason in on_gpu.unavailable.items())

    aggressive = resolve_features(load_profile("aggressive"), CUDA)
    assert {"sparsity_24", "fuse_shared_expert"} <= set(aggressive.unavailable)
    assert not any(aggressive.enabled[name] for name in aggressive.unavailable)
    from moe_compile.kernels.op import available_packed_backends

    if "triton" in available_packed_backends() and torch.cuda.get_device_capability() >= (8, 9):
        assert aggressive.enabled["fp8"]  # real kernels: auto asks for it (the quality gate decides)
    else:
        assert "fp8" in aggressive.unavailable and not aggressive.enabled["fp8"]


def test_forcing_an_unavailable_feature_raises_with_the_remedy():
    profile = load_profile("balanced").with_overrides({"fuse_shared_expert": True})
    for device in (CPU, CUDA):
        with pytest.raises(FeatureUnavailableError, match="--disable-fuse-shared-expert"):
            resolve_features(profile, device)
    # phase specialisation exists on GPUs; on CPU the reference is the only backend, and forcing it says so
    with pytest.raises(FeatureUnavailableError, match="only fused_moe backend"):
        resolve_features(load_profile("balanced").with_overrides({"specialize_phase": True}), CPU)
    with pytest.raises(FeatureUnavailableError, match="specialize_phase"):
        mc.optimize(build_tiny_model("tiny-qwen3-moe"), "balanced", specialize_phase=True)


def test_forcing_an_emulated_feature_runs_it_with_a_note():
    """Without FP8 kernels (CPU; a plan for a GPU on a machine without one) `auto` leaves FP8 off, saying why where
    it would have applied, and `true` applies it emulated with a note; 2:4 (no speedup anywhere) likewise."""
    from moe_compile.kernels.op import available_packed_backends

    devices = [CPU] + ([] if "triton" in available_packed_backends() else [CUDA])
    for device in devices:
        plan = resolve_features(load_profile("balanced").with_overrides({"fp8": True, "sparsity_24": True}), device)
        assert plan.enabled["fp8"] and "emulated" in plan.notes["fp8"] and "no speedup" in plan.notes["fp8"]
        assert plan.enabled["sparsity_24"] and "no speedup" in plan.notes["sparsity_24"]
        auto = resolve_features(load_profile("aggressive"), device)
        assert not auto.enabled["fp8"] and not auto.enabled["sparsity_24"]
        assert "slower than the dense" in auto.unavailable["sparsity_24"]
        if device.type == "cuda":
            assert "triton" in auto.unavailable["fp8"]


def test_the_dry_run_plan_lists_the_stages_optimize_runs():
    """build_plan (moe-compile optimize --dry-run) names the stages `optimize` then runs, the quality-gated weight
    passes included (2:4 before FP8), on the same model and features."""
    from moe_compile.plan import build_plan

    profile = load_profile("conservative").with_overrides({"fp8": True, "sparsity_24": True})
    plan = build_plan(build_tiny_model("tiny-qwen3-moe"), profile, torch.device("cpu"), None)
    model = mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative", fp8=True, sparsity_24=True)
    assert [p.removesuffix(" (quality-gated)") for p in plan.passes] == model.moe_compile.passes
    assert plan.passes.index("sparsify_24 (quality-gated)") < plan.passes.index("quantize_fp8 (quality-gated)")


def test_planned_emit_for_generative_models_on_a_gpu():
    """With cuda_graphs on a transformers generative model: CUDA-graph decode (prefill compiled with `compile`) and
    the grouped-query decode attention where the model has grouped-query layers; else the plain compile."""
    from moe_compile.plan import planned_passes

    enabled = {"fuse_moe": True, "cuda_graphs": True, "compile": True}
    passes = planned_passes(enabled, generative=True, gqa_layers=2)
    assert passes[-2:] == ["emit:generate with CUDA-graph decode per batch bucket; prefill compiled by moe_compile",
                           "emit:gqa_decode_attention (2 layers)"]
    assert planned_passes(enabled, generative=False)[-1] == "emit:torch.compile(backend=moe_compile, dynamic=True)"
    assert planned_passes({"fuse_moe": False}) == ["emit:eager"]
