"""The fused MoE op and its backends. Importing this package registers `torch.ops.moe_compile.fused_moe`."""

from moe_compile.kernels import reference
from moe_compile.kernels.op import available_backends, fused_moe, register_backend, select_backend
from moe_compile.kernels.backends import load_optional_backends

load_optional_backends()

__all__ = ["available_backends", "fused_moe", "reference", "register_backend", "select_backend"]
