"""The plan behind `moe-compile optimize --dry-run`: features, passes and a memory estimate for a target device.

The plan is computed, never applied: it reads the profile and the model and writes nothing. The memory estimate
counts the weights in the target dtype exactly; activations and the KV cache depend on batch and context, so the
plan gives the KV cache per token from the config and leaves activations as a note.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.markup import escape
from rich.table import Table
from torch import nn

from moe_compile.profiles import FEATURES, Profile, resolve_features

# What nvidia-smi reports for an H100 80GB HBM3 (81559 MiB): the card a plan for `cuda` assumes on a machine
# without CUDA, since that is the card this project targets (DESIGN.md).
ASSUMED_CARD = ("NVIDIA H100 80GB HBM3 (assumed: no CUDA device on this machine)", 81559 * 2**20)


@dataclass
class FeatureRow:
    name: str
    setting: str  # true | false | auto, after overrides
    decision: str  # on | off | unavailable
    detail: str


@dataclass
class MemoryEstimate:
    device: str
    device_name: str
    capacity_bytes: int | None
    dtype: str
    weights_bytes: int
    kv_bytes_per_token: int | None  # per token of context, per sequence, all layers
    notes: list[str] = field(default_factory=list)

    @property
    def free_after_weights(self) -> int | None:
        return None if self.capacity_bytes is None else self.capacity_bytes - self.weights_bytes


@dataclass
class Plan:
    profile: str
    backend: str
    device: str
    features: list[FeatureRow]
    passes: list[str]
    memory: MemoryEstimate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def feature_rows(profile: Profile, device: torch.device) -> list[FeatureRow]:
    """One row per feature; raises FeatureUnavailableError when one is forced on that `device` lacks."""
    resolved = resolve_features(profile, device)
    rows = []
    for name, value in profile.features.items():
        what, why_not, _ = FEATURES[name]
        reason = why_not(device)
        setting = "auto" if value == "auto" else str(value).lower()
        if name in resolved.unavailable:
            rows.append(FeatureRow(name, setting, "unavailable", resolved.unavailable[name]))
            continue
        detail = what
        if not resolved.enabled[name]:
            detail += f" ({reason})" if reason else (f" (auto: not used on {device.type})" if value == "auto" else "")
        rows.append(FeatureRow(name, setting, "on" if resolved.enabled[name] else "off", detail))
    return rows


def planned_passes(enabled: dict[str, bool], verify: bool = True, generative: bool = False,
                   gqa_layers: int = 0) -> list[str]:
    """The stages `optimize` runs for these decisions, in order (mirrors `api.optimize` and `emit.apply_emit`):
    fusion, the quality-gated weight passes (2:4 before FP8), then the emit steps. generative: a transformers model
    with `generate`, where `cuda_graphs` emits CUDA-graph decode (and `compile` then compiles its prefill), with
    the grouped-query decode attention on `gqa_layers` layers."""
    fused = bool(enabled.get("fuse_moe"))
    passes = (["detect", "prove", "rewrite"] + (["verify"] if verify else [])) if fused else []
    if fused:
        passes += [f"{name} (quality-gated)" for feature, name in (("sparsity_24", "sparsify_24"),
                                                                   ("fp8", "quantize_fp8")) if enabled.get(feature)]
    graph_decode = bool(enabled.get("cuda_graphs")) and generative
    if graph_decode:
        prefill = "; prefill compiled by moe_compile" if enabled.get("compile") else ""
        passes.append(f"emit:generate with CUDA-graph decode per batch bucket{prefill}")
        passes += [f"emit:gqa_decode_attention ({gqa_layers} layers)"] if gqa_layers else []
    elif enabled.get("compile"):
        passes.append("emit:torch.compile(backend=moe_compile, dynamic=True)")
    else:
        passes.append("emit:eager")
    return passes


def weights_bytes(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Bytes of parameters and buffers once floating tensors are in `dtype` (shared tensors counted once)."""
    total, seen = 0, set()
    for _, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        itemsize = dtype.itemsize if dtype is not None and tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * itemsize
    return total


def kv_bytes_per_token(config: Any, itemsize: int) -> int | None:
    """K and V cached per token by HF's cache, summed over layers; None when the config does not say."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not layers or not heads:
        return None
    if getattr(config, "kv_lora_rank", None):  # MLA (DeepSeek): HF caches the decompressed per-head K and V
        k_dim = (getattr(config, "qk_nope_head_dim", 0) or 0) + (getattr(config, "qk_rope_head_dim", 0) or 0)
        per_layer = heads * (k_dim + (getattr(config, "v_head_dim", 0) or 0))
    else:
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        per_layer = 2 * kv_heads * head_dim
    return layers * per_layer * itemsize


def _memory_total() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def device_capacity(device: torch.device) -> tuple[str, int | None, bool]:
    """(name, bytes, assumed) of the memory that would hold the model on `device`."""
    if device.type == "cpu":
        return "CPU memory (this machine)", _memory_total(), False
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device.index or 0)
        return props.name, props.total_memory, False
    if device.type == "cuda":
        return ASSUMED_CARD[0], ASSUMED_CARD[1], True
    return f"{device.type} (capacity unknown)", None, False


def memory_estimate(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> MemoryEstimate:
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    target = dtype or (first.dtype if first is not None else torch.float32)
    name, capacity, _ = device_capacity(device)
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    kv = kv_bytes_per_token(text_config, target.itemsize) if text_config is not None else None
    notes = ["activations grow with batch x sequence length and are not counted"]
    if kv is not None:
        notes.insert(0, f"KV cache: {human_bytes(kv * 1000)} per 1,000 tokens of context per sequence")
    return MemoryEstimate(str(device), name, capacity, str(target).replace("torch.", ""), weights_bytes(model, target),
                          kv, notes)


def build_plan(model: nn.Module, profile: Profile, device: torch.device, dtype: torch.dtype | None) -> Plan:
    rows = feature_rows(profile, device)
    enabled = {row.name: row.decision == "on" for row in rows}
    from moe_compile.emit.attention import gqa_layers_served
    from moe_compile.emit.generate import is_hf_generative

    passes = planned_passes(enabled, generative=is_hf_generative(model), gqa_layers=gqa_layers_served(model))
    return Plan(profile.name, profile.backend, str(device), rows, passes, memory_estimate(model, device, dtype))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def features_table(rows: list[FeatureRow], title: str) -> Table:
    table = Table(title=title)
    for column in ("feature", "setting", "decision", "detail"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.name, row.setting, row.decision, escape(row.detail))
    return table


def memory_lines(memory: MemoryEstimate) -> list[str]:
    lines = [f"weights in {memory.dtype}: {human_bytes(memory.weights_bytes)} on {memory.device_name}"]
    if memory.capacity_bytes is not None:
        free = memory.free_after_weights
        share = 100 * memory.weights_bytes / memory.capacity_bytes
        lines[0] += f" of {human_bytes(memory.capacity_bytes)} ({share:.1f}%)"
        if free < 0:
            lines.append("the weights do NOT fit: use a smaller dtype, FP8 or more devices")
        else:
            per_token = memory.kv_bytes_per_token
            tokens = f", about {free // per_token:,} tokens of KV cache" if per_token else ""
            lines.append(f"left for KV cache and activations: {human_bytes(free)}{tokens}")
    return lines + memory.notes
