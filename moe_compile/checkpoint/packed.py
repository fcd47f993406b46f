"""Checkpoints of fused blocks whose experts are packed (`PackedExperts`: FP8, 2:4 or FP8 + 2:4).

Such a block saves no dense `w13` / `w2`; its state holds `packed.w13`, `packed.w2` (float8_e4m3fn, or the 2:4
compressed values in the model dtype), `packed.w13_scale` / `packed.w2_scale` (fp32 [E, N]) and
`packed.w13_meta` / `packed.w2_meta` (uint8 2:4 metadata), whichever the format has. The manifest's block entry
records `weight_format`, and the manifest's `format_version` is 2 when any block is packed (a version-1 reader
refuses it cleanly instead of failing on missing dense weights); dense checkpoints stay version 1.

FP8 linears (`quant.fp8_linear.FP8Linear`, the attention projections after `quantize_linears_fp8`) save under their
own names: `<name>.weight` (float8_e4m3fn [N, K]), `<name>.weight_scale` (fp32 [N]) and `<name>.bias` (original
dtype) where there is one. The weight file says which they are (an e4m3 `.weight` beside a `.weight_scale`), so the
load turns those `nn.Linear` modules of the rebuilt model into empty `FP8Linear`s before the strict weight load
(`restore_fp8_linears`). Checkpoints with FP8 linears are `format_version` 3 (an older reader refuses them).

Dimension legend: E = experts, H = hidden, I = expert intermediate size, N = output channels, K = reduction dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_compile.errors import CheckpointError
from moe_compile.spec import MoESpec

FP8_LINEAR_FORMAT_VERSION = 3  # manifests of models with FP8 linears (attention)
PACKED_FORMAT_VERSION = 2  # manifests with packed blocks
DENSE_FORMAT_VERSION = 1
WEIGHT_FORMATS = ("dense", "fp8", "sparse24", "fp8+sparse24")
_PACKED_KEYS = ("w13", "w2", "w13_scale", "w2_scale", "w13_meta", "w2_meta")


def weight_format(block: nn.Module) -> str:
    packed = getattr(block, "packed", None)
    return "dense" if packed is None else packed.weight_format


def format_version_for(blocks: list[dict[str, Any]], model: nn.Module | None = None) -> int:
    """The manifest version the block entries (and `model`'s FP8 linears) need: 3 with FP8 linears, else 2 once any
    block is packed, else 1."""
    if model is not None and fp8_linear_names(model):
        return FP8_LINEAR_FORMAT_VERSION
    packed = any(entry.get("weight_format", "dense") != "dense" for entry in blocks)
    return PACKED_FORMAT_VERSION if packed else DENSE_FORMAT_VERSION


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the `FP8Linear` modules of `model`."""
    from moe_compile.quant.fp8_linear import FP8Linear

    return [name for name, module in model.named_modules() if isinstance(module, FP8Linear)]


def restore_fp8_linears(model: nn.Module, header: dict) -> list[str]:
    """Make every module that the weight file `header` stores as an FP8 linear an empty `FP8Linear` of the saved
    shapes (in place; filled by the strict weight load that follows); returns their names."""
    from moe_compile.quant.fp8 import FP8_DTYPE
    from moe_compile.quant.fp8_linear import FP8Linear

    restored = []
    for key, (shape, dtype) in header.items():
        name, _, attr = key.rpartition(".")
        if attr != "weight_scale" or header.get(f"{name}.weight", (None, None))[1] != FP8_DTYPE:
            continue
        n, k = header[f"{name}.weight"][0]
        if tuple(shape) != (n,) or dtype != torch.float32:
            raise CheckpointError(f"{key} has shape {tuple(shape)} and dtype {dtype} in the weight file; an FP8 linear "
                                  f"of weight [{n}, {k}] needs fp32 [{n}]; the checkpoint is inconsistent")
        bias = header.get(f"{name}.bias")
        try:
            current = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"the model has no module {name!r}, which the checkpoint holds as an FP8 linear; "
                                  f"is this the architecture it was exported from?") from exc
        if isinstance(current, FP8Linear):  # a skeleton already optimized: only check it
            if (current.out_features, current.in_features) != (n, k):
                raise CheckpointError(f"FP8 linear {name!r} of the given model is [{current.out_features}, "
                                      f"{current.in_features}], the checkpoint's [{n}, {k}]")
            continue
        if type(current) is not nn.Linear or (current.out_features, current.in_features) != (n, k):
            raise CheckpointError(f"the checkpoint holds {name!r} as an FP8 linear [{n}, {k}], but the model's module "
                                  f"there is {type(current).__name__}"
                                  + (f" [{current.out_features}, {current.in_features}]"
                                     if isinstance(current, nn.Linear) else "")
                                  + "; is this the architecture it was exported from?")
        if (bias is None) != (current.bias is None):
            raise CheckpointError(f"{name}: the checkpoint's FP8 linear {'has' if bias else 'has no'} bias, the "
                                  f"model's nn.Linear {'has none' if bias else 'has one'}")
        parent_name, _, attr_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr_name, FP8Linear.empty(n, k, None if bias is None else bias[1]))
        restored.append(name)
    return restored


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
    (`Module.to` would cast float8 tensors too, as they are floating point). `FP8Linear` keeps its own (its
    `_apply` casts only its bias)."""
    from moe_compile.quant.packed import PackedExperts

    kept = []
    for module in model.modules():
        if isinstance(module, PackedExperts) and module.fp8:
            kept.append((module, {key: module._buffers[key] for key in _PACKED_KEYS
                                  if module._buffers.get(key) is not None and key not in ("w13_meta", "w2_meta")}))
    model.to(dtype)
    for module, buffers in kept:
        module._buffers.update(buffers)
