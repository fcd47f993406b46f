"""Experts for routing decided elsewhere: rows already assigned to experts, no router in the call.

Expert parallelism routes on the token's rank and runs the experts on the rank that hosts them; that rank gets
rows plus the local slot of each. `experts_for_rows` runs them on the best kernel available for the device: the
Triton grouped GEMM on CUDA (one launch per projection, no host synchronisation, whatever the row counts), the
reference loop elsewhere. Both take the reference's `torch_experts` arguments and return its result.

Dimension legend: T = rows, K = experts per row, H = hidden, I = intermediate, E = experts (local slots).
"""

from __future__ import annotations

import logging
from typing import Optional

from torch import Tensor

from moe_compile.kernels import reference
from moe_compile.kernels.op import BackendUnsupported, _warn_once, available_backends

log = logging.getLogger("moe_compile")


def experts_for_rows(
    x: Tensor,
    weights: Tensor,
    ids: Tensor,
    w13: Tensor,
    w2: Tensor,
    b13: Optional[Tensor],
    b2: Optional[Tensor],
    weight_on_input: bool,
    activation: str,
    alpha: float,
    limit: float,
    backend: str = "auto",
) -> Tensor:
    """x [T, H], weights [T, K] fp32, ids [T, K] (indices into w13 [E, 2I, H] / w2 [E, H, I]) -> [T, H] in x's dtype:
    sum over k of weights[t, k] * expert_{ids[t, k]}(x[t]) (the weight on the input instead when weight_on_input).

    backend: "auto" (Triton on CUDA when it is installed, else the reference), "triton" or "reference"."""
    args = (x, weights, ids, w13, w2, b13, b2, weight_on_input, activation, alpha, limit)
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"experts_for_rows: unknown backend {backend!r} (auto, triton, reference)")
    use_triton = backend == "triton" or (backend == "auto" and x.is_cuda and "triton" in available_backends())
    if not use_triton:
        return reference.torch_experts(*args)
    from moe_compile.kernels.triton_moe import triton_experts

    try:
        return triton_experts(*args)
    except BackendUnsupported as exc:
        if backend == "triton":
            raise
        _warn_once(f"experts_for_rows: triton cannot run this case ({exc}); running the reference instead")
        return reference.torch_experts(*args)
