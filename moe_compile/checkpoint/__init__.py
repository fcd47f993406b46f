"""Optimized checkpoints: `export(model, out_dir)` and `load(out_dir)`.

A checkpoint directory holds
  model.safetensors           every parameter and persistent buffer of the optimized model (fused layout), no pickle
  config.json                 the HF config (HF models only), plus generation_config.json where the model has one
  moe_compile_manifest.json   format version, library versions, fused blocks with their specs, what optimize applied,
                              SHA-256 and size of every other file
It is written atomically (see `atomic.py`). `load` rebuilds the architecture from config.json (or loads into the
skeleton `model=` a caller passes), swaps in fused blocks from the saved specs, checks every file's hash and loads
the weights with strict key checking. Nothing is proven, calibrated or unpickled.

`export(..., format="onnx")` writes `model.onnx` instead (see `onnx_export.py`).
"""

from __future__ import annotations

import datetime
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from moe_compile.checkpoint import atomic
from moe_compile.checkpoint.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    block_entries,
    optimize_entry,
    read_manifest,
    record_file,
    result_from_manifest,
    verify_files,
    versions,
    write_manifest,
)
from moe_compile.checkpoint.packed import cast_keeping_packed, restore_fp8_linears
from moe_compile.checkpoint.restore import match_dtypes, read_header, restore_blocks
from moe_compile.errors import CheckpointError

log = logging.getLogger("moe_compile")

FORMATS = ("safetensors", "onnx")
PathLike = Union[str, Path]  # noqa: UP007 (a runtime alias)

__all__ = ["FORMATS", "FORMAT_VERSION", "MANIFEST_NAME", "WEIGHTS_NAME", "example_input_ids_for", "export",
           "export_for_cli", "load"]


def export(model: nn.Module, out_dir: PathLike, force: bool = False, format: str = "safetensors",
           example_input_ids: torch.Tensor | None = None, example_inputs: tuple | None = None,
           extra_files: dict[str, Any] | None = None, **onnx_options: Any) -> Path:
    """Write `model` (optimized or not) to the new directory `out_dir`, atomically; return its path.

    format="safetensors": weights + config + manifest, restored by `load`. format="onnx": `model.onnx` + manifest;
    needs `example_input_ids` (HF causal LMs) or `example_inputs` (any module), see `onnx_export.export_onnx`.
    An existing `out_dir` is replaced only with `force=True`. `extra_files`: name -> JSON-serialisable data, written
    beside the weights and hashed in the manifest (e.g. the CLI's report). A model sharded by
    `optimize(expert_parallel=N)` is exported by every rank at once (a collective): rank 0 writes the gathered
    experts and the manifest records the placement (`moe_compile.parallel.saved_placement` reads it back).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export expects a torch.nn.Module, got {type(model).__name__}")
    from moe_compile.parallel.gather import export_sharded, sharded_blocks

    if sharded_blocks(model):  # expert-parallel: a collective; rank 0 writes the gathered model + its placement
        return export_sharded(export, model, out_dir, force=force, format=format, example_input_ids=example_input_ids,
                              example_inputs=example_inputs, extra_files=extra_files, **onnx_options)
    refuse_unexportable(model, format)
    if format == "onnx":
        from moe_compile.checkpoint.onnx_export import export_onnx

        return export_onnx(model, out_dir, force=force, example_input_ids=example_input_ids,
                           example_inputs=example_inputs, extra_files=extra_files, **onnx_options)
    if format != "safetensors":
        raise CheckpointError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if onnx_options or example_input_ids is not None or example_inputs is not None:
        raise CheckpointError("example inputs and ONNX options apply to format='onnx' only")
    target = Path(out_dir).absolute()
    tensors, aliases = unique_state(model)
    with atomic.atomic_directory(target, force) as tmp:
        files: dict[str, Any] = {}
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "writer": "moe_compile"})
        atomic.file_written(tmp / WEIGHTS_NAME)
        record_file(files, tmp, WEIGHTS_NAME)
        for name in save_hf_configs(model, tmp) + write_extra_files(tmp, extra_files):
            record_file(files, tmp, name)
        manifest = base_manifest("safetensors", model)
        manifest.update(files=files, aliases=aliases, num_tensors=len(tensors), dtype=main_dtype(tensors))
        atomic.file_written(write_manifest(tmp, manifest))
    log.info("moe_compile: exported %s to %s", type(model).__name__, target)
    return target


def refuse_unexportable(model: nn.Module, format: str = "safetensors") -> None:
    """Raise `CheckpointError` naming the first block this version cannot export, before anything is written:
    FP8 / 2:4 packed experts (`FusedMoEBlock.packed` set) to ONNX. (Expert-parallel shards are gathered first:
    `export` hands them to `parallel.gather.export_sharded`.)"""
    from moe_compile.fused_block import FusedMoEBlock

    for name, module in model.named_modules():
        label = name or "the model"
        if isinstance(module, FusedMoEBlock) and format != "safetensors" and (
                module.packed is not None or module.w13 is None):
            fmt = getattr(module.packed, "weight_format", None)
            raise CheckpointError(f"cannot export {label} (FusedMoEBlock{f', weights={fmt}' if fmt else ''}): "
                                  f"FP8/2:4 packed experts are not exportable in this version to {format}; export "
                                  f"with format='safetensors', or with fp8 and sparsity_24 off "
                                  f"(e.g. --disable-fp8 --disable-sparsity-24)")


def base_manifest(kind: str, model: nn.Module) -> dict[str, Any]:
    from moe_compile.checkpoint.packed import format_version_for

    config = getattr(model, "config", None)
    blocks = block_entries(model)
    return {
        "format": FORMAT_NAME,
        "format_version": format_version_for(blocks, model),
        "kind": kind,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "model": {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "hf_config": bool(config is not None and hasattr(config, "save_pretrained")),
            "model_type": getattr(config, "model_type", None),
        },
        "blocks": blocks,
        "optimize": optimize_entry(model),
    }


def write_extra_files(directory: Path, extra_files: dict[str, Any] | None) -> list[str]:
    reserved = {MANIFEST_NAME, WEIGHTS_NAME, "config.json", "generation_config.json", "model.onnx"}
    written = []
    for name, data in (extra_files or {}).items():
        if Path(name).name != name or name in reserved or name.startswith("."):
            raise CheckpointError(f"extra file name {name!r} must be a plain file name other than {sorted(reserved)}")
        (directory / name).write_text(json.dumps(data, indent=2, default=str) + "\n")
        atomic.file_written(directory / name)
        written.append(name)
    return written


def example_input_ids_for(model: nn.Module, batch: int = 1, sequence: int = 8, seed: int = 0) -> torch.Tensor:
    """Random token ids [batch, sequence] in the model's vocabulary (for ONNX export from the CLI)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    vocab = getattr(config, "vocab_size", None) or 2
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(vocab), (batch, sequence), generator=generator)


def export_for_cli(model: nn.Module, out_dir: PathLike, format: str = "safetensors", force: bool = False,
                   report: dict[str, Any] | None = None, report_name: str = "moe_compile_report.json",
                   batch: int = 1, sequence: int = 8) -> Path:
    """What `moe-compile optimize --output DIR [--format onnx]` / `moe-compile export` should call after optimize:
    the checkpoint (or ONNX file) with the CLI's report inside it, hashed by the manifest."""
    extra = {report_name: report} if report is not None else None
    if format == "onnx":
        return export(model, out_dir, force=force, format="onnx", extra_files=extra,
                      example_input_ids=example_input_ids_for(model, batch, sequence))
    return export(model, out_dir, force=force, format=format, extra_files=extra)


def save_hf_configs(model: nn.Module, directory: Path) -> list[str]:
    """config.json (and generation_config.json) of an HF model into `directory`; the names written."""
    written = []
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(directory)
        written.append("config.json")
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(directory)
        written.append("generation_config.json")
    for name in written:
        atomic.file_written(directory / name)
    return written


def unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict as contiguous CPU tensors, each storage once: exact aliases (tied weights) are recorded as
    `alias -> kept name`; tensors overlapping some other way are copied apart."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            raise CheckpointError(f"{name} is on the meta device (no data); materialize the model before export")
        key = None
        if tensor.numel():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                   tuple(tensor.stride()), tensor.dtype, str(tensor.device))
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = tensor
    by_storage: dict[tuple, list[str]] = defaultdict(list)
    for name, tensor in tensors.items():
        if tensor.numel():
            by_storage[(tensor.untyped_storage().data_ptr(), str(tensor.device))].append(name)
    shared = {name for names in by_storage.values() if len(names) > 1 for name in names}
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        out[name] = tensor.clone(memory_format=torch.contiguous_format) if name in shared else tensor.contiguous()
    return out, aliases


def main_dtype(tensors: dict[str, torch.Tensor]) -> str | None:
    counts: dict[torch.dtype, int] = defaultdict(int)
    for tensor in tensors.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    return str(max(counts, key=counts.get)).removeprefix("torch.") if counts else None


def _build_hf(directory: Path, manifest: dict[str, Any], trust_remote_code: bool) -> nn.Module:
    if not manifest["model"].get("hf_config") or not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} holds a {manifest['model']['class']} without an HF config; pass the "
                              f"module to load into as load(..., model=skeleton)")
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        from moe_compile.errors import MissingDependencyError

        raise MissingDependencyError("loading an HF checkpoint needs transformers: pip install 'moe-compile[hf]'") \
            from exc
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
        cls = getattr(transformers, manifest["model"]["class"], None)
        init_ctx = getattr(getattr(transformers, "initialization", None), "no_init_weights", None)
        with (init_ctx() if init_ctx is not None else _null()):  # weights are loaded next: skip random init
            if isinstance(cls, type) and hasattr(cls, "_from_config"):
                model = cls._from_config(config)
            else:
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as exc:
        hint = "" if trust_remote_code else " (for custom-code models pass trust_remote_code=True)"
        raise CheckpointError(f"cannot rebuild the architecture from {directory / 'config.json'}: {exc}{hint}") \
            from exc
    if (directory / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def load(path: PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         model: nn.Module | None = None, trust_remote_code: bool = False,
         compile: bool | None = None) -> nn.Module:
    """Restore a model written by `export` (format safetensors): the optimized model, ready to run.

    HF checkpoints are rebuilt from their config; for other modules pass the skeleton `model=` (the original
    architecture, or an optimized one with the same blocks) to load into. `dtype` casts after loading (default:
    the saved dtypes). `compile`: apply the torch.compile emit step; default: as the manifest recorded, on CUDA only.
    Raises `CheckpointError` for a missing, damaged, tampered or too-new checkpoint, before any tensor is used.
    """
    directory = Path(path)
    manifest = read_manifest(directory)
    if manifest["kind"] != "safetensors":
        raise CheckpointError(f"{directory} is a {manifest['kind']!r} export, which load cannot restore as a torch "
                              f"module (run model.onnx with onnxruntime)")
    verify_files(directory, manifest)
    weights = directory / WEIGHTS_NAME
    header = read_header(weights)
    if model is None:
        model = _build_hf(directory, manifest, trust_remote_code)
    restore_blocks(model, manifest["blocks"], header)
    restore_fp8_linears(model, header)
    match_dtypes(model, header)
    _load_weights(model, weights, header, manifest.get("aliases", {}))
    model.to(device)
    if dtype is not None:
        cast_keeping_packed(model, dtype)  # FP8 expert weights and scales keep their format
    model.eval()
    result = result_from_manifest(manifest, str(directory))
    model.moe_compile = result
    want_compile = compile if compile is not None else bool(
        result.features.get("compile") and torch.device(device).type == "cuda")
    if want_compile:
        from moe_compile.emit import apply_emit

        apply_emit(model, {"compile": True}, result)
    return model


def _load_weights(model: nn.Module, weights: Path, header, aliases: dict[str, str]) -> None:
    from safetensors.torch import load_file

    expected = set(model.state_dict())
    saved = set(header)
    missing = sorted(expected - saved - set(aliases))
    unexpected = sorted(saved - expected)
    bad_alias = sorted(a for a, kept in aliases.items() if a not in expected or kept not in saved)
    if missing or unexpected or bad_alias:
        parts = []
        for label, keys in (("missing from the file", missing), ("not in the model", unexpected),
                            ("bad aliases", bad_alias)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''} ({len(keys)})")
        raise CheckpointError(f"the weights in {weights} do not fit {type(model).__name__}: " + "; ".join(parts))
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}") from exc
    for alias, kept in aliases.items():
        state[alias] = state[kept]
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
