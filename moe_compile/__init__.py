"""moe_compile: a compiler for Mixture-of-Experts models."""

__version__ = "0.1.0"

from moe_compile import kernels  # noqa: F401  (registers torch.ops.moe_compile.fused_moe)
