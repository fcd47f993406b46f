"""Rebuild the fused blocks of a checkpoint in a freshly built model, without proving or calibrating anything.

Each block named in the manifest is replaced by a `FusedMoEBlock` built from its saved spec, with empty tensors of
the shapes and dtypes the weight file's header records (the weights are loaded afterwards, strictly); a block saved
with packed experts (`weight_format` fp8 / sparse24 / fp8+sparse24) gets an empty `PackedExperts` instead of dense
expert weights (see `packed.py`). The shared expert and its gate are the original block's own child modules:
structural detection (no forward) names them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_compile.errors import CheckpointError
from moe_compile.spec import MoESpec

Header = dict[str, tuple[tuple[int, ...], torch.dtype]]  # tensor name -> (shape, dtype) from the weight file

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(path) -> Header:
    """Shapes and dtypes of every tensor in a safetensors file, without reading the data."""
    from safetensors import safe_open

    header: Header = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                sliced = handle.get_slice(key)
                header[key] = (tuple(sliced.get_shape()), _DTYPES[sliced.get_dtype()])
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    return header


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _empty(header: Header, key: str, required: bool) -> torch.Tensor | None:
    if key not in header:
        if required:
            raise CheckpointError(f"the weight file has no tensor {key!r}, which the manifest's spec requires")
        return None
    shape, dtype = header[key]
    return torch.empty(shape, dtype=dtype, requires_grad=dtype.is_floating_point)


def _check_shapes(name: str, spec: MoESpec, tensors: dict[str, torch.Tensor | None]) -> None:
    e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
    expected = {"router_weight": (e, h), "w13": (e, 2 * i if spec.gated else i, h), "w2": (e, h, i),
                "router_bias": (e,), "correction_bias": (e,), "b13": (e, 2 * i if spec.gated else i), "b2": (e, h)}
    for key, tensor in tensors.items():
        if tensor is not None and tuple(tensor.shape) != expected[key]:
            raise CheckpointError(f"{name}.{key} has shape {tuple(tensor.shape)} in the weight file, but its spec "
                                  f"implies {expected[key]}; the checkpoint is inconsistent")


def _shared_modules(model: nn.Module, name: str, block: nn.Module, spec: MoESpec,
                    candidates: dict[str, Any]) -> tuple[nn.Module | None, nn.Module | None]:
    if spec.shared_expert == "none":
        return None, None
    from moe_compile.detect import get_path

    candidate = candidates.get(name)
    if candidate is None or candidate.shared_expert_path is None:
        raise CheckpointError(f"block {name!r} ({type(block).__name__}) has a shared expert in the checkpoint, but "
                              f"detection finds none in the rebuilt model; is this the architecture it was "
                              f"exported from?")
    shared = get_path(block, candidate.shared_expert_path)
    gate = None
    if spec.shared_expert == "gated":
        if candidate.shared_gate_path is None:
            raise CheckpointError(f"block {name!r}: the checkpoint has a gated shared expert, the rebuilt model's "
                                  f"block has no shared-expert gate")
        gate = get_path(block, candidate.shared_gate_path)
    return shared, gate


def restore_blocks(model: nn.Module, blocks: list[dict[str, Any]], header: Header) -> None:
    """Replace each manifest block of `model` by an empty `FusedMoEBlock` of the saved spec (in place)."""
    from moe_compile.api import model_config
    from moe_compile.checkpoint.packed import empty_packed_experts, placeholder_dense, weight_format
    from moe_compile.detect import CanonicalWeights, find_candidates
    from moe_compile.fused_block import FusedMoEBlock
    from moe_compile.quant.packed import install

    candidates = None
    for entry in blocks:
        name = entry["name"]
        try:
            spec = MoESpec.from_dict(entry["spec"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"block {name!r}: invalid spec in the manifest ({exc})") from exc
        try:
            current = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"the model has no module {name!r}, which the checkpoint fused; is this the "
                                  f"architecture it was exported from?") from exc
        if isinstance(current, FusedMoEBlock):  # a skeleton that is already optimized
            if current.spec != spec:
                raise CheckpointError(f"block {name!r} of the given model has spec {current.spec}, the checkpoint "
                                      f"{spec}")
            if weight_format(current) != entry.get("weight_format", "dense"):
                raise CheckpointError(f"block {name!r} of the given model holds {weight_format(current)} expert "
                                      f"weights, the checkpoint {entry.get('weight_format', 'dense')}; pass a "
                                      f"skeleton optimized the same way, or the unoptimized architecture")
            continue
        if candidates is None and any(b["spec"].get("shared_expert", "none") != "none" for b in blocks):
            candidates = {c.name: c for c in find_candidates(model, model_config(model))}
        shared, gate = _shared_modules(model, name, current, spec, candidates or {})
        fmt = entry.get("weight_format", "dense")
        tensors = {
            "router_weight": _empty(header, f"{name}.router_weight", True),
            "router_bias": _empty(header, f"{name}.router_bias", spec.router_bias),
            "correction_bias": _empty(header, f"{name}.correction_bias", spec.correction_bias),
            "w13": _empty(header, f"{name}.w13", True) if fmt == "dense" else None,
            "w2": _empty(header, f"{name}.w2", True) if fmt == "dense" else None,
            "b13": _empty(header, f"{name}.b13", spec.expert_bias),
            "b2": _empty(header, f"{name}.b2", spec.expert_bias),
        }
        _check_shapes(name, spec, tensors)
        packed = None
        if fmt != "dense":
            packed = empty_packed_experts(name, spec, fmt, header)
            tensors["w13"], tensors["w2"] = placeholder_dense(spec, tensors["router_weight"].dtype)
        weights = CanonicalWeights(tensors["w13"], tensors["w2"], tensors["b13"], tensors["b2"])
        fused = FusedMoEBlock(spec, tensors["router_weight"], tensors["router_bias"], tensors["correction_bias"],
                              weights, shared, gate, entry.get("source_class", ""), entry.get("backend", "auto"))
        if packed is not None:
            install(fused, packed)
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, fused)


def match_dtypes(model: nn.Module, header: Header) -> None:
    """Give every parameter and buffer the dtype it has in the weight file (a model built in one dtype may have
    been saved with some tensors kept in another, e.g. fp32 routers in a bf16 model)."""
    for key, (_, dtype) in header.items():
        module_name, _, attr = key.rpartition(".")
        try:
            module = model.get_submodule(module_name) if module_name else model
        except AttributeError:
            continue  # reported by the strict key check
        tensor = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
        if tensor is not None and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)
