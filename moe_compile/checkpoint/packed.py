"""Checkpoints of fused blocks whose experts are packed (`PackedExperts`: FP8, 2:4 or FP8 + 2:4).

Such a block saves no dense `w13` / `w2`; its state holds `packed.w13`, `packed.w2` (float8_e4m3fn, or the 2:4
compressed values in the model dtype), `packed.w13_scale` / `packed.w2_scale` (fp32 [E, N]) and
`packed.w13_meta` / `packed.w2_meta` (uint8 2:4 metadata), whichever the format has. The manifest's block entry
records `weight_format`, and the manifest's `format_version` is 2 when any block is packed (a version-1 reader
refuses it cleanly instead of failing on missing dense weights); dense checkpoints stay version 1.

Dimension legend: E = experts, H = hidden, I = expert intermediate size, N = output channels, K = reduction dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_compile.errors import CheckpointError
from moe_compile.spec import MoESpec

PACKED_FORMAT_VERSION = 2  # manifests with packed blocks
DENSE_FORMAT_VERSION = 1
WEIGHT_FORMATS = ("dense", "fp8", "sparse24", "fp8+sparse24")
_PACKED_KEYS = ("w13", "w2", "w13_scale", "w2_scale", "w13_meta", "w2_meta")


def weight_format(block: nn.Module) -> str:
    packed = getattr(block, "packed", None)
    return "dense" if packed is None else packed.weight_format


def format_version_for(blocks: list[dict[str, Any]]) -> int:
    """The manifest version the block entries need: 2 once any block is packed."""
    packed = any(entry.get("weight_format", "dense") != "dense" for entry in blocks)
    return PACKED_FORMAT_VERSION if packed else DENSE_FORMAT_VERSION


def expected_packed_shapes(spec: MoESpec, fmt: str) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a packed block of `spec` stores in format `fmt`."""
    e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
    n13 = 2 * i if spec.gated else i
    sparse, fp8 = "sparse24" in fmt, fmt.startswith("fp8")
    shapes = {"w13": (e, n13, h // 2 if sparse else h), "w2": (e, h, i // 2 if sparse else i)}
    if fp8:
        shapes.update(w13_scale=(e, n13), w2_scale=(e, h))
    if sparse:
        shapes.update(w13_meta=(e, n13, -(-h // 8)), w2_meta=(e, h, -(-i // 8)))
    return shapes


def empty_packed_experts(name: str, spec: MoESpec, fmt: str, header: dict) -> nn.Module:
    """A `PackedExperts` of empty tensors with the shapes and dtypes the weight file's header records (filled by
    the strict weight load that follows)."""
    from moe_compile.quant.fp8 import FP8_DTYPE
    from moe_compile.quant.packed import PackedExperts

    if fmt not in WEIGHT_FORMATS[1:]:
        raise CheckpointError(f"block {name!r}: unknown weight_format {fmt!r} in the manifest (this moe_compile "
                              f"reads {', '.join(WEIGHT_FORMATS)}); upgrade moe_compile")
    shapes = expected_packed_shapes(spec, fmt)
    tensors: dict[str, torch.Tensor | None] = {}
    for key in _PACKED_KEYS:
        full = f"{name}.packed.{key}"
        if key not in shapes:
            if full in header:
                raise CheckpointError(f"the weight file has {full!r}, which a {fmt!r} block does not have; the "
                                      f"checkpoint is inconsistent")
            tensors[key] = None
            continue
        if full not in header:
            raise CheckpointError(f"the weight file has no tensor {full!r}, which the manifest's {fmt!r} block "
                                  f"requires; the checkpoint is incomplete")
        shape, dtype = header[full]
        if tuple(shape) != shapes[key]:
            raise CheckpointError(f"{full} has shape {tuple(shape)} in the weight file, but a {fmt!r} block of its "
                                  f"spec has {shapes[key]}; the checkpoint is inconsistent")
        tensors[key] = torch.empty(shape, dtype=dtype)
    if (tensors["w13"].dtype == FP8_DTYPE) != fmt.startswith("fp8"):
        raise CheckpointError(f"{name}.packed.w13 is {tensors['w13'].dtype} in the weight file, which does not "
                              f"match the manifest's weight_format {fmt!r}")
    return PackedExperts(**tensors)


def placeholder_dense(spec: MoESpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense w13 / w2 on the meta device (no memory) to build a `FusedMoEBlock` that packed weights then replace."""
    n13 = 2 * spec.intermediate_size if spec.gated else spec.intermediate_size
    w13 = torch.empty(spec.num_experts, n13, spec.hidden_size, dtype=dtype, device="meta")
    w2 = torch.empty(spec.num_experts, spec.hidden_size, spec.intermediate_size, dtype=dtype, device="meta")
    return w13, w2


def cast_keeping_packed(model: nn.Module, dtype: torch.dtype) -> None:
    """`model.to(dtype)`, except that FP8 expert weights and their fp32 scales keep their storage format
    (`Module.to` would cast float8 tensors too, as they are floating point)."""
    from moe_compile.quant.packed import PackedExperts

    kept = []
    for module in model.modules():
        if isinstance(module, PackedExperts) and module.fp8:
            kept.append((module, {key: module._buffers[key] for key in _PACKED_KEYS
                                  if module._buffers.get(key) is not None and key not in ("w13_meta", "w2_meta")}))
    model.to(dtype)
    for module, buffers in kept:
        module._buffers.update(buffers)
