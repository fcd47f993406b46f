"""`torch.ops.moe_compile.fused_moe`: one MoE layer as one op, with a fake kernel, autograd and a backend switch.

The op is pure (no mutation) and its output has the shape of its input, so export, dynamo and Inductor see it as an
opaque node with a trivially known output. Weights are op arguments, so graph passes can see and rewrite them.

Backends are plain functions with the reference's signature, registered by name (`register_backend`); `auto` picks
the best one available for the device and token count (`select_backend`).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import Tensor

from moe_compile.kernels import reference

log = logging.getLogger("moe_compile")

BackendFn = Callable[..., Tensor]
_BACKENDS: dict[str, BackendFn] = {"reference": reference.torch_fused_moe}
# Backends that can serve a device type, best first. `auto` takes the first one registered.
_PREFERENCE = {"cuda": ["cuda", "triton", "reference"], "cpu": ["reference"]}


class BackendUnsupported(ValueError):
    """Raised by a backend, before any launch, for a case outside its limits; the message names the fallback.
    Under `backend="auto"` the op then runs the reference instead (logged once per case)."""


def register_backend(name: str, fn: BackendFn) -> None:
    """Make `fn` (same signature as `reference.torch_fused_moe`) available as backend `name`."""
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def select_backend(requested: str, device: torch.device) -> str:
    """The backend that runs: `requested` if registered, else the best for the device (logged)."""
    return _choose(requested, device, _BACKENDS, _PREFERENCE, "fused_moe")


def _choose(requested: str, device: torch.device, registry: dict[str, BackendFn], preference: dict[str, list[str]],
            op_name: str) -> str:
    """`requested` if `registry` has it, else the first registered of the device's preference (logged once)."""
    if requested in registry:
        return requested
    chosen = next(name for name in preference.get(device.type, ["reference"]) if name in registry)
    if requested != "auto":
        _warn_once(f"{op_name} backend {requested!r} is not available here; using {chosen!r}")
    return chosen


@torch.library.custom_op("moe_compile::fused_moe", mutates_args=())
def fused_moe(
    x: Tensor,
    router_weight: Tensor,
    router_bias: Optional[Tensor],
    correction_bias: Optional[Tensor],
    w13: Tensor,
    w2: Tensor,
    b13: Optional[Tensor],
    b2: Optional[Tensor],
    top_k: int,
    scoring: str,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    routed_scaling: float,
    weight_on_input: bool,
    activation: str,
    alpha: float,
    limit: float,
    backend: str = "auto",
) -> Tensor:
    """x [T, H], router_weight [E, H], w13 [E, 2I, H] (gate rows then up rows; [E, I, H] if not gated),
    w2 [E, H, I], b13 [E, 2I], b2 [E, H], router_bias / correction_bias [E] -> [T, H] in x's dtype."""
    args = (x, router_weight, router_bias, correction_bias, w13, w2, b13, b2,
            top_k, scoring, renormalize, n_group, topk_group, routed_scaling, weight_on_input, activation, alpha, limit)
    name = select_backend(backend, x.device)
    try:
        return _BACKENDS[name](*args)
    except BackendUnsupported as exc:
        if backend != "auto" or name == "reference":
            raise
        _warn_fallback(name, str(exc))
        return _BACKENDS["reference"](*args)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Log `message` the first time only: the op runs once per layer per step."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def _warn_fallback(name: str, reason: str) -> None:
    _warn_once(f"fused_moe: backend {name!r} cannot run this case ({reason}); running the reference instead")


@fused_moe.register_fake
def _fused_moe_fake(x, *args, **kwargs):
    return torch.empty_like(x)


# ---- autograd: the backward is itself an op (opaque to tracing), recomputing the reference under autograd ----

_DIFFERENTIABLE = ("x", "router_weight", "router_bias", "w13", "w2", "b13", "b2")


def _autograd_inside_op():
    """Re-enable autograd inside an op implementation (the dispatcher excludes it there) to recompute the forward.

    Only the autograd keys are lifted; autocast stays excluded as the dispatcher set it.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradOther, torch._C.DispatchKey.AutogradNestedTensor):
        exclude = exclude.remove(key)
    exclude = exclude.remove(torch._C.DispatchKey.AutogradFunctionality)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op("moe_compile::fused_moe_backward", mutates_args=())
def fused_moe_backward(
    grad_out: Tensor,
    x: Tensor,
    router_weight: Tensor,
    router_bias: Optional[Tensor],
    correction_bias: Optional[Tensor],
    w13: Tensor,
    w2: Tensor,
    b13: Optional[Tensor],
    b2: Optional[Tensor],
    top_k: int,
    scoring: str,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    routed_scaling: float,
    weight_on_input: bool,
    activation: str,
    alpha: float,
    limit: float,
) -> list[Tensor]:
    """Gradients for (x, router_weight, router_bias, w13, w2, b13, b2); absent tensors give empty gradients."""
    inputs = [x, router_weight, router_bias, w13, w2, b13, b2]
    with _autograd_inside_op(), torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
        lx, lrw, lrb, lw13, lw2, lb13, lb2 = leaves
        out = reference.torch_fused_moe(
            lx, lrw, lrb, correction_bias, lw13, lw2, lb13, lb2,
            top_k, scoring, renormalize, n_group, topk_group, routed_scaling, weight_on_input, activation, alpha, limit,
        )
        present = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out, present, grad_out, allow_unused=True))
    result = []
    for leaf in leaves:
        grad = None if leaf is None else next(grads)
        if leaf is None:
            result.append(torch.empty(0, device=x.device, dtype=x.dtype))
        else:
            result.append(torch.zeros_like(leaf) if grad is None else grad)
    return result


@fused_moe_backward.register_fake
def _fused_moe_backward_fake(grad_out, x, router_weight, router_bias, correction_bias, w13, w2, b13, b2, *scalars):
    tensors = [x, router_weight, router_bias, w13, w2, b13, b2]
    return [torch.empty(0, device=x.device, dtype=x.dtype) if t is None else torch.empty_like(t) for t in tensors]


_SCALARS = ("top_k", "scoring", "renormalize", "n_group", "topk_group", "routed_scaling", "weight_on_input",
            "activation", "alpha", "limit")


def _setup_context(ctx, inputs, output):
    (x, router_weight, router_bias, correction_bias, w13, w2, b13, b2, *scalars) = inputs
    ctx.save_for_backward(x, router_weight, w13, w2)
    ctx.optional = (router_bias, correction_bias, b13, b2)
    ctx.scalars = scalars[: len(_SCALARS)]


def _backward(ctx, grad_out):
    x, router_weight, w13, w2 = ctx.saved_tensors
    router_bias, correction_bias, b13, b2 = ctx.optional
    grads = fused_moe_backward(grad_out, x, router_weight, router_bias, correction_bias, w13, w2, b13, b2, *ctx.scalars)
    g = dict(zip(_DIFFERENTIABLE, grads))
    none_if_absent = {"router_bias": router_bias, "b13": b13, "b2": b2}
    for name, tensor in none_if_absent.items():
        if tensor is None:
            g[name] = None
    # one gradient per op input: x, router_weight, router_bias, correction_bias, w13, w2, b13, b2, scalars..., backend
    return (g["x"], g["router_weight"], g["router_bias"], None, g["w13"], g["w2"], g["b13"], g["b2"]) + (None,) * (
        len(_SCALARS) + 1
    )


fused_moe.register_autograd(_backward, setup_context=_setup_context)


# ---- `fused_moe_packed`: the same layer with packed expert weights (FP8 e4m3 + scales and/or 2:4 + metadata) ----
# A separate op so that `fused_moe`'s signature stays as GPU kernels expect it. `reference` emulates (dequantize /
# decompress, then matmul in the activation dtype); `triton` (kernels/triton_packed.py) runs FP8 / 2:4 kernels;
# the opt-in `cuda` backend (kernels/cuda_moe.py) runs FP8 W8A8 at decode sizes and hands the rest to triton.

_PACKED_BACKENDS: dict[str, BackendFn] = {"reference": reference.torch_fused_moe_packed}
# `auto` takes the first one registered ("cuda" only when MOE_COMPILE_CUDA_BACKEND=1, as for fused_moe)
_PACKED_PREFERENCE = {"cuda": ["cuda", "triton", "reference"]}


def register_packed_backend(name: str, fn: BackendFn) -> None:
    """Make `fn` (same signature as `reference.torch_fused_moe_packed`) available as packed backend `name`."""
    _PACKED_BACKENDS[name] = fn


def available_packed_backends() -> list[str]:
    return sorted(_PACKED_BACKENDS)


@torch.library.custom_op("moe_compile::fused_moe_packed", mutates_args=())
def fused_moe_packed(
    x: Tensor,
    router_weight: Tensor,
    router_bias: Optional[Tensor],
    correction_bias: Optional[Tensor],
    w13: Tensor,
    w2: Tensor,
    b13: Optional[Tensor],
    b2: Optional[Tensor],
    w13_scale: Optional[Tensor],
    w2_scale: Optional[Tensor],
    w13_meta: Optional[Tensor],
    w2_meta: Optional[Tensor],
    top_k: int,
    scoring: str,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    routed_scaling: float,
    weight_on_input: bool,
    activation: str,
    alpha: float,
    limit: float,
    act_quant: str = "none",
    backend: str = "auto",
) -> Tensor:
    """`fused_moe` with packed weights: w13 [E, 2I, H] / w2 [E, H, I] (last dim halved with 2:4 metadata), in
    float8_e4m3fn with per-output-channel scales w13_scale [E, 2I] / w2_scale [E, H] fp32, or in a float dtype;
    w13_meta [E, 2I, ceil(H/8)] / w2_meta [E, H, ceil(I/8)] uint8 2:4 metadata; act_quant "none" or
    "fp8_per_token" (dynamic per-token e4m3 activations). -> [T, H] in x's dtype."""
    args = (x, router_weight, router_bias, correction_bias, w13, w2, b13, b2, w13_scale, w2_scale, w13_meta, w2_meta,
            top_k, scoring, renormalize, n_group, topk_group, routed_scaling, weight_on_input, activation, alpha, limit,
            act_quant)
    # a block pinned to a backend without packed kernels (e.g. "cuda" when not enabled) gets the best packed one
    name = _choose(backend, x.device, _PACKED_BACKENDS, _PACKED_PREFERENCE, "fused_moe_packed")
    explicit = name == backend
    try:
        return _PACKED_BACKENDS[name](*args)
    except BackendUnsupported as exc:
        if explicit or name == "reference":
            raise
        _warn_fallback(name, str(exc))
        return _PACKED_BACKENDS["reference"](*args)


@fused_moe_packed.register_fake
def _fused_moe_packed_fake(x, *args, **kwargs):
    return torch.empty_like(x)
