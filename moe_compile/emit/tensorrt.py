"""Optional emit through torch-tensorrt (dynamo path): TensorRT runs the dense parts, `fused_moe` stays a PyTorch op.

torch-tensorrt is imported lazily and never at package import: it pins one torch minor, pulls multi-GB TensorRT
libraries and currently fails to import on hosts without an NVIDIA driver (see notes/stack-facts.md §2). When it
is missing, `MissingDependencyError` names the extra that installs it.

What is passed to `torch_tensorrt.compile` (`TensorRTSettings.compile_kwargs`):
  ir="dynamo", min_block_size=1, enabled_precisions={model dtype},
  torch_executed_ops={"torch.ops.moe_compile.fused_moe.default"}  (no TensorRT converter exists for it: keep our
  kernel; the graph is partitioned into TensorRT engines around each MoE op), use_explicit_typing=False.
CUDA graphs are not a compile argument in torch-tensorrt (the design doc's `use_cuda_graph` does not exist in the
code): the compiled module is wrapped with `torch_tensorrt.runtime.enable_cudagraphs`, which captures the whole
forward (PyTorch-fallback subgraphs included) and re-records on each new input shape.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moe_compile.errors import FeatureUnavailableError, MissingDependencyError

EXTRA = "pip install 'moe-compile[tensorrt]'"
FUSED_MOE_OP = "torch.ops.moe_compile.fused_moe.default"


def import_torch_tensorrt() -> Any:
    """The `torch_tensorrt` module, or a clear error naming the extra (or why an installed one cannot load)."""
    try:
        return importlib.import_module("torch_tensorrt")
    except ImportError as exc:
        missing = getattr(exc, "name", None) or "torch_tensorrt"
        raise MissingDependencyError(f"the tensorrt emit needs torch-tensorrt ({missing} could not be imported: "
                                     f"{exc}); install it with {EXTRA} (it pins one torch minor and needs "
                                     f"TensorRT and a CUDA driver)") from exc
    except Exception as exc:  # e.g. CUDA queries at import on a driver-less host (pytorch/TensorRT#4504)
        raise FeatureUnavailableError(f"torch-tensorrt is installed but failed to import ({type(exc).__name__}: "
                                      f"{exc}); it needs an NVIDIA driver and a torch build matching its pin") from exc


def unavailable_reason(device: torch.device) -> str | None:
    """Why the tensorrt emit cannot run on `device`, or None (imports torch-tensorrt when it may be usable)."""
    if torch.device(device).type != "cuda":
        return "torch-tensorrt runs on CUDA devices only"
    try:
        import_torch_tensorrt()
    except (MissingDependencyError, FeatureUnavailableError) as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class TensorRTSettings:
    enabled_precisions: frozenset = frozenset({torch.bfloat16})
    torch_executed_ops: frozenset = frozenset({FUSED_MOE_OP})
    min_block_size: int = 1
    cuda_graphs: bool = True
    use_explicit_typing: bool = False
    sparse_weights: bool = False  # True lets TensorRT pick 2:4 kernels for layers whose weights already are 2:4
    extra: dict = field(default_factory=dict)  # any other torch_tensorrt.compile keyword, passed as is

    def compile_kwargs(self) -> dict[str, Any]:
        kwargs = {"ir": "dynamo", "enabled_precisions": set(self.enabled_precisions),
                  "torch_executed_ops": set(self.torch_executed_ops), "min_block_size": self.min_block_size,
                  "use_explicit_typing": self.use_explicit_typing, "sparse_weights": self.sparse_weights}
        kwargs.update(self.extra)
        return kwargs


def settings_for(model: nn.Module, cuda_graphs: bool = True, **extra: Any) -> TensorRTSettings:
    """Default settings for `model`: its floating dtype enabled, fused_moe left to PyTorch, CUDA graphs on."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()} or {torch.float32}
    return TensorRTSettings(enabled_precisions=frozenset(dtypes), cuda_graphs=cuda_graphs, extra=dict(extra))


class TensorRTModule(nn.Module):
    """The compiled module, run under torch-tensorrt's CUDA-graph wrapper when `cuda_graphs` (entered once)."""

    def __init__(self, compiled: nn.Module, runtime: Any = None):
        super().__init__()
        self.compiled = compiled
        self._context = None
        self._runner = compiled
        if runtime is not None:
            self._context = runtime.enable_cudagraphs(compiled)
            self._runner = self._context.__enter__()

    def forward(self, *args, **kwargs):
        return self._runner(*args, **kwargs)

    def close(self) -> None:
        """Leave the CUDA-graph mode (frees the captured graphs)."""
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None
            self._runner = self.compiled


def _all_cuda(inputs: list) -> bool:
    return bool(inputs) and all(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in inputs)


def compile_tensorrt(model: nn.Module, example_inputs: Sequence[torch.Tensor],
                     settings: TensorRTSettings | None = None) -> TensorRTModule:
    """Compile an optimized `model` (called as `model(*example_inputs)`) with torch-tensorrt.

    Every `fused_moe` node stays a PyTorch op (our kernel); TensorRT takes the rest. Raises MissingDependencyError
    without torch-tensorrt and FeatureUnavailableError off CUDA.
    """
    trt = import_torch_tensorrt()
    inputs = list(example_inputs)
    if not _all_cuda(inputs):
        raise FeatureUnavailableError("torch-tensorrt compiles for CUDA: move the model and example inputs to a GPU")
    settings = settings or settings_for(model)
    compiled = trt.compile(model, arg_inputs=inputs, **settings.compile_kwargs())
    return TensorRTModule(compiled, trt.runtime if settings.cuda_graphs else None)
