"""`FusedMoEBlock`: the thin module that replaces a proven MoE block; its forward is one `fused_moe` call.

It keeps the original block's return contract (tensor or tuple, 3-D or flat) and reuses the original parameter
objects wherever the canonical layout equals the stored one, so no weight is copied needlessly.

Dimension legend: T = tokens, E = experts, K = top_k, H = hidden, I = expert intermediate size.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moe_compile.detect.candidate import Candidate, CanonicalWeights, ExpertLayout, get_path
from moe_compile.kernels import reference
from moe_compile.router_recording import attach_router_module, router_outputs_requested
from moe_compile.spec import MoESpec


def _as_parameter(tensor: Optional[torch.Tensor], requires_grad: bool) -> Optional[nn.Parameter]:
    if tensor is None:
        return None
    if isinstance(tensor, nn.Parameter):
        return tensor  # the block's own parameter, shared: no copy
    return nn.Parameter(tensor.detach(), requires_grad=requires_grad)


class FusedMoEBlock(nn.Module):
    def __init__(self, spec: MoESpec, router_weight: torch.Tensor, router_bias: Optional[torch.Tensor],
                 correction_bias: Optional[torch.Tensor], weights: CanonicalWeights,
                 shared_expert: Optional[nn.Module] = None, shared_gate: Optional[nn.Module] = None,
                 source_class: str = "", backend: str = "auto", router_module: Optional[nn.Module] = None):
        super().__init__()
        self.spec = spec
        self.source_class = source_class
        self.backend = backend
        grad = router_weight.requires_grad
        self.router_weight = _as_parameter(router_weight, grad)  # [E, H]
        self.router_bias = _as_parameter(router_bias, grad)  # [E]
        self.register_buffer("correction_bias", None if correction_bias is None else correction_bias.detach())  # [E]
        self.w13 = _as_parameter(weights.w13, weights.w13.requires_grad)  # [E, 2I, H]
        self.w2 = _as_parameter(weights.w2, weights.w2.requires_grad)  # [E, H, I]
        self.b13 = _as_parameter(weights.b13, grad)  # [E, 2I]
        self.b2 = _as_parameter(weights.b2, grad)  # [E, H]
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_gate
        # packed expert weights (FP8 / 2:4, set by the quantize_fp8 / sparsify_24 passes); w13 and w2 are then None
        self.packed = None
        # the original router (a child sharing router_weight), run only while transformers records router logits
        if router_module is not None:
            attach_router_module(self, router_module)
        else:
            self.router_module = None

    @classmethod
    def from_block(cls, candidate: Candidate, block: nn.Module, spec: MoESpec, layout: ExpertLayout,
                   backend: str = "auto") -> "FusedMoEBlock":
        """Build from `block` (the candidate's module or a copy of it) with a proven spec and layout."""
        router = get_path(block, candidate.router.path)
        router_bias = getattr(router, candidate.router.bias_name) if spec.router_bias else None
        correction = get_path(block, candidate.router.correction_bias_path) if spec.correction_bias else None
        shared = get_path(block, candidate.shared_expert_path) if spec.shared_expert != "none" else None
        gate = get_path(block, candidate.shared_gate_path) if spec.shared_expert == "gated" else None
        router_module = get_path(block, candidate.router.path.split(".")[0])
        return cls(spec, getattr(router, candidate.router.weight_name), router_bias, correction,
                   layout.extract(block), shared, gate, type(block).__name__, backend, router_module)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"E={s.num_experts}, top_k={s.top_k}, H={s.hidden_size}, I={s.intermediate_size}, "
                f"routing={s.routing_summary()!r}, act={s.activation}, from={self.source_class}"
                + ("" if self.packed is None else f", weights={self.packed.weight_format}"))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        x = hidden_states.reshape(-1, self.spec.hidden_size)  # [T, H]
        if self.router_module is not None and router_outputs_requested():
            self.router_module(x.clone())  # fires transformers' recording hooks; a clone: some routers jitter in place
        if self.packed is not None:  # FP8 / 2:4 expert weights: torch.ops.moe_compile.fused_moe_packed
            out = self.packed(x, self.router_weight, self.router_bias, self.correction_bias, self.b13, self.b2,
                              self.backend, **self.spec.op_kwargs())  # [T, H]
        else:
            out = torch.ops.moe_compile.fused_moe(
                x, self.router_weight, self.router_bias, self.correction_bias, self.w13, self.w2, self.b13, self.b2,
                backend=self.backend, **self.spec.op_kwargs(),
            )  # [T, H]
        return finish_output(self, hidden_states, x, out)


def fused_blocks(model: nn.Module) -> dict[str, FusedMoEBlock]:
    """Every FusedMoEBlock of `model`, by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FusedMoEBlock)}


def finish_output(block: nn.Module, hidden_states: torch.Tensor, x: torch.Tensor, routed: torch.Tensor):
    """The original block's output from the routed experts' [T, H]: plus the shared expert (sigmoid-gated or not),
    in the input's shape or flat, and with the auxiliary second output when the block returned a tuple. Shared by
    every module that stands in for a block (fused, expert-parallel, the ONNX lowering)."""
    out = routed
    if block.shared_expert is not None:
        shared = block.shared_expert(x)  # [T, H]
        if block.shared_expert_gate is not None:
            shared = torch.sigmoid(block.shared_expert_gate(x)) * shared
        out = out + shared
    if not block.spec.flat_output:
        out = out.reshape(hidden_states.shape)
    if block.spec.returns_tuple:
        return out, aux_output(block, x)
    return out


def aux_output(block: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The second output of the original block, recomputed in plain torch (dead code when nobody reads it);
    reads the block's spec, router weight and bias, and correction bias."""
    kind = block.spec.aux_output
    if kind == "none":
        return None
    logits = reference.router_logits(x, block.router_weight, block.router_bias)  # [T, E]
    if kind == "router_logits":
        return logits
    if kind == "router_probs":
        return logits.softmax(dim=-1, dtype=torch.float32).to(x.dtype)
    s = block.spec
    weights, ids = reference.route(logits, block.correction_bias, s.top_k, s.scoring, s.renormalize, s.n_group,
                                   s.topk_group, s.routed_scaling)  # [T, K]
    weights = weights.to(logits.dtype)
    if kind == "topk_weights":
        return weights
    return torch.zeros_like(logits).scatter_(1, ids, weights)  # dense_scores [T, E]


def block_output_tensor(output) -> torch.Tensor:
    """The hidden-states part of a block's output (tensor, or first element of a tuple)."""
    return output[0] if isinstance(output, tuple) else output

