"""emit: how the rewritten model runs — eager (CPU default) or torch.compile with the moe_compile backend."""

from __future__ import annotations

import logging

from torch import nn

from moe_compile.report import OptimizeResult

log = logging.getLogger("moe_compile")


def apply_emit(model: nn.Module, enabled: dict[str, bool], result: OptimizeResult) -> None:
    """Compile the model in place when the plan says so; `nn.Module.compile` keeps the same object."""
    if not enabled.get("compile"):
        result.passes.append("emit:eager")
        return
    from moe_compile.backend import register_compile_backend

    register_compile_backend()
    model.compile(backend="moe_compile", dynamic=True)
    result.passes.append("emit:torch.compile(backend=moe_compile)")
