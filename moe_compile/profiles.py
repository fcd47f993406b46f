"""Profiles are data: YAML files naming each feature `true`, `false` or `auto`, plus the kernel backend.

Built-in profiles live in `moe_compile/profile_data/*.yaml`; a user passes their own file path the same way
(`optimize(model, profile="my.yaml")`, `moe-compile optimize --profile my.yaml`). Overrides (`fp8=False`,
`--enable-compile`) apply on top. `resolve_features` turns the result into on/off decisions for one device: `auto`
means on where the feature is available and useful there; `true` for a feature this version lacks is an error
that names the reason, never a silent claim. FP8 and 2:4 exist only emulated (`EMULATED`): `auto` leaves them off
(reported in `.unavailable`), `true` runs the emulation behind the quality gate and says so in `.notes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import yaml

from moe_compile.errors import FeatureUnavailableError, ProfileError

FeatureValue = Union[bool, str]  # True, False or "auto"
BACKENDS = ("auto", "reference", "triton", "cuda")


def _never(reason: str) -> Callable[[torch.device], Optional[str]]:
    return lambda device: reason


def _always(device: torch.device) -> Optional[str]:
    return None


def _cuda_graphs(device: torch.device) -> Optional[str]:
    """Capture needs a CUDA device and a fused-op backend with no host synchronisation (triton)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (the model is on {device.type})"
    from moe_compile.kernels import available_backends

    if "triton" not in available_backends():
        from moe_compile.kernels.backends import UNAVAILABLE

        return f"CUDA graphs need the graph-safe triton backend, unavailable here: {UNAVAILABLE.get('triton')}"
    return None


def _specialize_phase(device: torch.device) -> Optional[str]:
    """Phase specialisation picks between GPU kernels in compiled graphs: it needs CUDA and a GPU backend."""
    if device.type != "cuda":
        return (f"prefill/decode specialisation chooses between GPU kernels; on {device.type} the reference is the "
                "only fused_moe backend")
    from moe_compile.kernels import available_backends

    if not {"triton", "cuda"} & set(available_backends()):
        return "prefill/decode specialisation needs a GPU fused_moe backend (triton or cuda), none is available"
    return None


FP8_EMULATED = ("fp8=True runs FP8 emulated (dequantize + matmul in the activation dtype) to measure quality: no "
                "speedup")


def _fp8(device: torch.device) -> Optional[str]:
    """FP8 kernels (kernels/triton_packed.py) need a CUDA GPU with FP8 tensor cores (sm_89+: Ada, Hopper)."""
    if device.type != "cuda":
        return f"FP8 kernels run on CUDA GPUs with FP8 tensor cores (sm_89+); on {device.type} {FP8_EMULATED}"
    from moe_compile.kernels.op import available_packed_backends

    if "triton" not in available_packed_backends():  # also where this machine has no GPU (a plan for one)
        from moe_compile.kernels.backends import UNAVAILABLE

        return f"the FP8 kernels need the triton backend, unavailable here: {UNAVAILABLE.get('triton_packed')}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"this GPU ({torch.cuda.get_device_name(device)}, sm_{major}{minor}) has no FP8 tensor cores "
                f"(sm_89+: Ada, Hopper); {FP8_EMULATED}")
    return None


def _tensorrt(device: torch.device) -> Optional[str]:
    """torch-tensorrt needs example inputs to compile, which `optimize` does not have: it is an explicit call."""
    from moe_compile.emit.tensorrt import unavailable_reason

    reason = unavailable_reason(device)
    if reason:
        return reason
    return ("torch-tensorrt emission is an explicit step after optimize: "
            "moe_compile.emit.tensorrt.compile_tensorrt(model, example_inputs)")


# feature -> (what it does, why it is unavailable on a device or None, whether `auto` turns it on there)
FEATURES: dict[str, tuple[str, Callable[[torch.device], Optional[str]], Callable[[torch.device], bool]]] = {
    "fuse_moe": ("rewrite proven MoE blocks to one fused op", _always, lambda d: True),
    "compile": ("torch.compile with the moe_compile backend (Inductor)", _always, lambda d: d.type == "cuda"),
    "cuda_graphs": ("decode steps replayed from captured CUDA graphs", _cuda_graphs, lambda d: d.type == "cuda"),
    "specialize_phase": ("separate decode and prefill kernels", _specialize_phase, lambda d: d.type == "cuda"),
    "fuse_shared_expert": ("shared expert computed inside the fused op",
                           _never("shared-expert fusion is not in this version of moe_compile"), lambda d: True),
    "fp8": ("FP8 expert weights (W8A8, per-channel weight and per-token activation scales; quality-gated)", _fp8,
            lambda d: d.type == "cuda"),
    "sparsity_24": ("2:4 sparse expert weights (quality-gated; no speedup in this version)",
                    _never("the 2:4 kernels are slower than the dense ones at every measured size (H100, "
                           "benchmarks/results/moe_layer_*_packed.csv), so auto leaves 2:4 off; sparsity_24=True "
                           "applies it (behind the quality gate) for its smaller weights"), lambda d: True),
    "tensorrt": ("torch-tensorrt emission", _tensorrt, lambda d: False),
}


@dataclass
class Profile:
    name: str
    features: dict[str, FeatureValue]
    backend: str = "auto"
    description: str = ""
    source: str = ""

    def with_overrides(self, overrides: dict[str, Any]) -> "Profile":
        features = dict(self.features)
        backend = self.backend
        for key, value in overrides.items():
            if key == "backend":
                backend = _check_backend(value)
            elif key in FEATURES:
                features[key] = _check_value(key, value)
            else:
                valid = ", ".join(sorted([*FEATURES, "backend"]))
                raise ProfileError(f"unknown option {key!r}; valid options: {valid}")
        return Profile(self.name, features, backend, self.description, self.source)


# Features that run without their fast kernels where those are missing (FP8 off CUDA / without FP8 tensor cores,
# 2:4 everywhere): `auto` does not turn them on there (their `why_not` says why); forcing them on applies them
# anyway, for quality measurements or smaller weights, and records this note.
EMULATED: dict[str, str] = {
    "fp8": "FP8 runs emulated (dequantize + matmul in the activation dtype): real FP8 numerics, no speedup",
    "sparsity_24": ("2:4 runs on the triton kernels on CUDA (slower than dense) and emulated elsewhere: real 2:4 "
                    "numerics and 0.56x the expert bytes, no speedup"),
}


@dataclass
class FeaturePlan:
    enabled: dict[str, bool] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # asked for with `auto`, not applied, and why
    notes: dict[str, str] = field(default_factory=dict)  # forced on and applied with a caveat (EMULATED)


def builtin_profiles() -> list[str]:
    folder = resources.files("moe_compile").joinpath("profile_data")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: Union[str, Path]) -> Profile:
    text, source = _profile_text(str(name_or_path))
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ProfileError(f"profile {source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("features", {}), dict):
        raise ProfileError(f"profile {source} must be a mapping with a 'features' mapping")
    unknown = set(data) - {"name", "description", "features", "backend"}
    if unknown:
        raise ProfileError(f"profile {source}: unknown keys {sorted(unknown)} (valid: name, description, features, "
                           "backend)")
    base = Profile(str(data.get("name", Path(source).stem)), {k: "auto" if k != "fuse_moe" else True for k in FEATURES},
                   description=str(data.get("description", "")), source=source)
    try:
        return base.with_overrides({**data.get("features", {}), "backend": data.get("backend", "auto")})
    except ProfileError as exc:  # name the file: the same check serves overrides, which have none
        raise ProfileError(f"profile {source}: {exc}") from exc


def _profile_text(name: str) -> tuple[str, str]:
    if name in builtin_profiles():
        text = resources.files("moe_compile").joinpath("profile_data").joinpath(f"{name}.yaml").read_text()
        return text, f"built-in '{name}'"
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.read_text(), str(path)
    raise ProfileError(f"unknown profile {name!r}: use one of {builtin_profiles()} or a path to a .yaml file")


def _check_value(key: str, value: Any) -> FeatureValue:
    if isinstance(value, bool) or value == "auto":
        return value
    raise ProfileError(f"feature {key!r} must be true, false or auto, got {value!r}")


def _check_backend(value: Any) -> str:
    if value not in BACKENDS:
        raise ProfileError(f"backend must be one of {BACKENDS}, got {value!r}")
    return value


def resolve_features(profile: Profile, device: torch.device) -> FeaturePlan:
    plan = FeaturePlan()
    for name, value in profile.features.items():
        _, why_not, auto_on = FEATURES[name]
        reason = why_not(device)
        if value is True and reason and name in EMULATED:
            plan.notes[name] = EMULATED[name]
            plan.enabled[name] = True
            continue
        if value is True and reason:
            raise FeatureUnavailableError(f"feature {name!r} was forced on, but {reason}; "
                                          f"turn it off (--disable-{name.replace('_', '-')} or {name}=False)")
        if value == "auto" and reason and auto_on(device):
            plan.unavailable[name] = reason
        plan.enabled[name] = bool(value is True or (value == "auto" and not reason and auto_on(device)))
    return plan
