"""`moe_compile_manifest.json`: what a checkpoint holds and how it was made (style anchor L15).

The manifest is the first file `load` reads and the last one `export` writes. It records the format version, the
library versions, every fused block with its `MoESpec` and source class, what `optimize` applied, and a SHA-256 per
data file so that a truncated or altered file is caught before any tensor is used.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_compile.errors import CheckpointError
from moe_compile.report import OptimizeResult
from moe_compile.spec import MoESpec

MANIFEST_NAME = "moe_compile_manifest.json"
FORMAT_NAME = "moe_compile.checkpoint"
FORMAT_VERSION = 3  # bump on any change an older `load` would misread; `load` refuses versions above its own
# (2: blocks with packed FP8 / 2:4 experts; 3: FP8 linears (attention); checkpoints without them are still written
# as version 1 or 2, see packed.py)
WEIGHTS_NAME = "model.safetensors"
_HASH_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str | None]:
    import moe_compile

    found: dict[str, str | None] = {"moe_compile": moe_compile.__version__, "torch": torch.__version__,
                                       "python": platform.python_version()}
    for name in ("transformers", "safetensors", "onnx", "onnxruntime", "onnxscript"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        found[name] = getattr(module, "__version__", None)
    return found


def block_entries(model: nn.Module) -> list[dict[str, Any]]:
    from moe_compile.checkpoint.packed import weight_format

    entries = []
    from moe_compile.fused_block import fused_blocks

    for name, block in fused_blocks(model).items():
        entries.append({
            "name": name,
            "source_class": block.source_class,
            "backend": block.backend,
            "spec": block.spec.to_dict(),
            "weight_format": weight_format(block),  # dense | fp8 | sparse24 | fp8+sparse24 (PackedExperts)
            "shared_expert_class": None if block.shared_expert is None else type(block.shared_expert).__name__,
            "shared_expert_gate_class": (None if block.shared_expert_gate is None
                                         else type(block.shared_expert_gate).__name__),
        })
    return entries


def optimize_entry(model: nn.Module) -> dict[str, Any] | None:
    result = getattr(model, "moe_compile", None)
    return result.to_dict() if isinstance(result, OptimizeResult) else None


def result_from_manifest(manifest: dict[str, Any], source: str) -> OptimizeResult:
    """The `OptimizeResult` recorded at export (or one rebuilt from the block list), with the load appended."""
    data = dict(manifest.get("optimize") or {})
    known = set(OptimizeResult.__dataclass_fields__)
    data = {k: v for k, v in data.items() if k in known}
    data.setdefault("profile", "unknown")
    data.setdefault("device", "unknown")
    data.setdefault("backend", "auto")
    result = OptimizeResult(**data)
    result.fused = [b["name"] for b in manifest["blocks"]]
    result.specs = {b["name"]: MoESpec.from_dict(b["spec"]) for b in manifest["blocks"]}
    result.passes = list(result.passes) + [f"load:{source}"]
    return result


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; expected a checkpoint written by moe_compile.export")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST_NAME}: not a moe_compile checkpoint, or an incomplete "
                              f"one; re-export it with moe_compile.export")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a moe_compile manifest (format {manifest.get('format')!r})"
                              if isinstance(manifest, dict) else f"{path} is not a moe_compile manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        writer = (manifest.get("versions") or {}).get("moe_compile", "a newer version")
        raise CheckpointError(f"{path} has format_version {version}, newer than the {FORMAT_VERSION} this moe_compile "
                              f"reads (written by moe_compile {writer}); upgrade moe_compile to load it")
    for key in ("files", "blocks", "kind"):
        if key not in manifest:
            raise CheckpointError(f"{path} lacks the field {key!r}; the checkpoint is damaged")
    return manifest


def record_file(files: dict[str, Any], directory: Path, name: str) -> None:
    path = directory / name
    files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists with its recorded size and SHA-256."""
    for name, info in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{path} has {size} bytes, the manifest records {info['bytes']}: the file is "
                                  f"truncated or was replaced; re-export the checkpoint")
        digest = sha256_file(path)
        if digest != info["sha256"]:
            raise CheckpointError(f"{path} fails its SHA-256 check (manifest {info['sha256'][:16]}..., file "
                                  f"{digest[:16]}...): the file was modified or corrupted; re-export the checkpoint")
