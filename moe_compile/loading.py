"""Turn the CLI's MODEL argument into a model: a local HF directory, a config.json, or a built-in tiny model name.

Nothing here reaches the network: directories load with `local_files_only=True` and hub ids are refused. A model
too large for this machine's memory can still be planned (`allow_meta=True`): it is then built on the meta device,
which gives its structure and sizes but no weights, so its blocks are detected but not proven.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_compile.errors import MissingDependencyError, ModelLoadError
from moe_compile.models import TINY_MODELS, build_tiny_model
from moe_compile.plan import human_bytes

MODEL_HELP = ("a local Hugging Face model directory (config.json + *.safetensors), a config.json file (random "
              "weights), or a built-in tiny model name (see `moe-compile list-models`)")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
MEMORY_FRACTION = 0.9  # of MemAvailable a model may take before we refuse to materialise it


@dataclass
class LoadedModel:
    model: nn.Module
    kind: str  # directory | config | tiny
    source: str  # what was loaded, for messages
    path: Path | None = None  # the directory or file read; None for a tiny model
    notes: list[str] = field(default_factory=list)
    materialized: bool = True  # False: built on the meta device (structure and sizes only)


def parse_dtype(name: str) -> torch.dtype | None:
    """`auto` -> None (keep the checkpoint's dtype), else one of DTYPES."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; use auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(name: str, dtype: str = "auto", trust_remote_code: bool = False, seed: int = 0,
               allow_meta: bool = False) -> LoadedModel:
    """Load MODEL as the CLI describes it (see MODEL_HELP); errors are ModelLoadError with a remedy."""
    target = parse_dtype(dtype)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_directory(path, target, trust_remote_code, allow_meta)
    if path.is_file():
        return _load_config(path, target, trust_remote_code, seed, allow_meta)
    if name in TINY_MODELS:
        model = build_tiny_model(name, dtype=target or torch.float32, seed=seed)
        return LoadedModel(model, "tiny", name, notes=[f"built-in tiny model with random weights (seed {seed})"])
    if "/" in name or name.endswith(".json") or path.suffix:
        raise ModelLoadError(f"no such file or directory: {name}; MODEL is {MODEL_HELP} (nothing is downloaded)")
    raise ModelLoadError(f"unknown model {name!r}: no such path and no built-in tiny model of that name "
                         f"(`moe-compile list-models` shows them); pass a local HF directory or a config.json")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError("loading Hugging Face models needs transformers: "
                                     "pip install 'moe-compile[hf]'") from exc
    return transformers


def _read_config(config_path: Path, trust_remote_code: bool) -> Any:
    try:
        json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_path} is not a readable JSON config: {exc}") from exc
    try:
        return _transformers().AutoConfig.from_pretrained(str(config_path), trust_remote_code=trust_remote_code,
                                                          local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(config_path, exc) from exc


def _load_error(path: Path, exc: Exception) -> ModelLoadError:
    message = " ".join(str(exc).split())
    if "trust_remote_code" in message:
        return ModelLoadError(f"{path} needs the model's own Python code; pass --trust-remote-code if you trust it")
    if "does not recognize this architecture" in message or "Unrecognized model" in message:
        return ModelLoadError(f"{path}: this transformers ({_transformers().__version__}) does not know its "
                              "model_type; upgrade transformers or pass --trust-remote-code for custom code")
    return ModelLoadError(f"could not load {path}: {message[:300]}")


def _auto_class(config: Any) -> Any:
    transformers = _transformers()
    remote = getattr(config, "auto_map", None) or {}
    if type(config) in transformers.AutoModelForCausalLM._model_mapping or "AutoModelForCausalLM" in remote:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def _load_directory(path: Path, dtype: torch.dtype | None, trust_remote_code: bool,
                    allow_meta: bool) -> LoadedModel:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{path} has no config.json, so it is not a Hugging Face model directory")
    weights = [f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern)]
    if not weights:
        raise ModelLoadError(f"no weights (*.safetensors) in {path}; to build random weights from its config, "
                             f"pass {config_path}")
    config = _read_config(config_path, trust_remote_code)
    size = sum(f.stat().st_size for f in weights)
    if size > MEMORY_FRACTION * _available_memory():
        if allow_meta:
            return _meta_model(config, dtype, trust_remote_code, "directory", path,
                               f"weights ({human_bytes(size)}) exceed this machine's free memory: not loaded")
        raise ModelLoadError(f"the weights in {path} ({human_bytes(size)}) exceed this machine's free memory "
                             f"({human_bytes(_available_memory())}); use --dry-run for a plan without loading them")
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": True, _dtype_kwarg(): dtype or "auto"}
    try:
        model = _auto_class(config).from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise _load_error(path, exc) from exc
    return LoadedModel(model.eval(), "directory", str(path), path, [f"weights loaded from {path}"])


def _dtype_kwarg() -> str:
    """transformers >= 4.56 takes `dtype`; older releases call it `torch_dtype`."""
    major, minor = (int(p) for p in _transformers().__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _config_dtype(config: Any, dtype: torch.dtype | None) -> torch.dtype:
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if dtype is not None:
        return dtype
    if isinstance(stored, torch.dtype):
        return stored
    return DTYPES.get(str(stored), torch.float32)


def _meta_model(config: Any, dtype: torch.dtype | None, trust_remote_code: bool, kind: str, path: Path,
                why: str) -> LoadedModel:
    with torch.device("meta"):
        model = _auto_class(config).from_config(config, trust_remote_code=trust_remote_code)
    model = model.to(_config_dtype(config, dtype)).eval()
    note = f"{why}; built on the meta device: blocks are detected from structure, not proven"
    return LoadedModel(model, kind, str(path), path, [note], materialized=False)


def _load_config(path: Path, dtype: torch.dtype | None, trust_remote_code: bool, seed: int,
                 allow_meta: bool) -> LoadedModel:
    if path.suffix != ".json":
        raise ModelLoadError(f"{path} is a file but not a config.json; MODEL is {MODEL_HELP}")
    config = _read_config(path, trust_remote_code)
    target = _config_dtype(config, dtype)
    probe = _meta_model(config, target, trust_remote_code, "config", path, "")
    size = sum(p.numel() for p in probe.model.parameters()) * target.itemsize
    if size > MEMORY_FRACTION * _available_memory():
        if allow_meta:
            probe.notes = [(f"random weights ({human_bytes(size)}) exceed this machine's free memory; built on the "
                            "meta device: blocks are detected from structure, not proven")]
            return probe
        raise ModelLoadError(f"random weights for {path} need {human_bytes(size)}, more than this machine's free "
                             "memory; use --dry-run for a plan, or a smaller config")
    from moe_compile.models.tiny import make_routing_decisive

    torch.manual_seed(seed)
    model = _auto_class(config).from_config(config, trust_remote_code=trust_remote_code)
    make_routing_decisive(model, seed)  # random routers with std 0.02 route almost uniformly: see models/tiny.py
    note = f"built from {path} with RANDOM weights (seed {seed}): a structural check, not the trained model"
    return LoadedModel(model.to(target).eval(), "config", str(path), path, [note])
