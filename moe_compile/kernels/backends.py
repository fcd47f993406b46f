"""Registers the GPU backends that this machine can run; each one is optional and says why when it is absent."""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger("moe_compile")

# name -> (module that registers it on import, what the user needs for it)
OPTIONAL_BACKENDS = {
    "triton": ("moe_compile.kernels.triton_moe", "a CUDA GPU and `pip install triton`"),
    "triton_packed": ("moe_compile.kernels.triton_packed", "a CUDA GPU and `pip install triton` (FP8 / 2:4 kernels)"),
    "cuda": ("moe_compile.kernels.cuda_moe", "a Hopper GPU and nvcc (csrc/, built on first use)"),
}
UNAVAILABLE: dict[str, str] = {}


def load_optional_backends() -> None:
    for name, (module, needs) in OPTIONAL_BACKENDS.items():
        try:
            importlib.import_module(module)
        except ImportError as exc:  # missing module or missing dependency: record the reason, keep going
            UNAVAILABLE[name] = f"{exc} (needs {needs})"
            log.debug("fused_moe backend %r unavailable: %s", name, exc)
