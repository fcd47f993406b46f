"""`MoESpec`: what one MoE block computes, in the terms of the fused op.

A spec is the contract between the prover (which finds it numerically), the rewrite (which builds the fused
block from it) and the kernels (which implement it). Every field maps to one argument of
`torch.ops.moe_compile.fused_moe`, except the output-contract fields, which the fused block uses to return what
the original block returned.

Dimension legend: T = tokens, E = experts, K = top_k, H = hidden, I = expert intermediate size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")
# What a block returns beside its hidden states, when it returns a tuple:
#  router_logits  [T, E] logits of the router, in the model dtype
#  topk_weights   [T, K] final routing weights, sorted by score (GPT-OSS, transformers 5)
#  dense_scores   [T, E] routing weights scattered into zeros (GPT-OSS, transformers 4.5x)
#  router_probs   [T, E] softmax of the router logits, in the model dtype (DBRX, transformers 4.5x)
AUX_OUTPUTS = ("none", "router_logits", "topk_weights", "dense_scores", "router_probs")


@dataclass(frozen=True)
class MoESpec:
    num_experts: int  # E
    top_k: int  # K
    hidden_size: int  # H
    intermediate_size: int  # I (per expert)
    scoring: str = "softmax"  # softmax over E, or sigmoid per expert
    renormalize: bool = False  # divide the K selected weights by their sum
    n_group: int = 1  # group-limited top-k (DeepSeek-V3): number of expert groups
    topk_group: int = 1  # ... and how many groups each token may use
    routed_scaling: float = 1.0  # multiply the routing weights (DeepSeek-V3 routed_scaling_factor)
    router_bias: bool = False  # router Linear has a bias [E] (GPT-OSS)
    correction_bias: bool = False  # e_score_correction_bias [E]: used for selection only (DeepSeek-V3)
    weight_on_input: bool = False  # routing weight scales the expert input, not its output (Llama4)
    activation: str = "silu"
    gated: bool = True  # GLU: act(gate) * up; else act(up)
    alpha: float = 1.702  # swiglu_oai only
    limit: float = 7.0  # swiglu_oai only
    expert_bias: bool = False  # b13 [E, 2I] and b2 [E, H] (GPT-OSS)
    shared_expert: str = "none"  # none | plain (added) | gated (sigmoid(gate(x)) * shared(x))
    returns_tuple: bool = False  # block returns (hidden, aux)
    aux_output: str = "none"  # one of AUX_OUTPUTS
    flat_output: bool = False  # output is [T, H] even for a [B, S, H] input (Llama4)

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.aux_output not in AUX_OUTPUTS:
            raise ValueError(f"aux_output must be one of {AUX_OUTPUTS}, got {self.aux_output!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide num_experts={self.num_experts}")

    def replace(self, **changes: Any) -> "MoESpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoESpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown MoESpec fields {sorted(unknown)}; written by a newer moe_compile?")
        return cls(**data)

    def op_kwargs(self) -> dict[str, Any]:
        """The scalar arguments of `fused_moe` for this spec."""
        return dict(
            top_k=self.top_k,
            scoring=self.scoring,
            renormalize=self.renormalize,
            n_group=self.n_group,
            topk_group=self.topk_group,
            routed_scaling=float(self.routed_scaling),
            weight_on_input=self.weight_on_input,
            activation=self.activation,
            alpha=float(self.alpha),
            limit=float(self.limit),
        )

    def routing_summary(self) -> str:
        parts = [self.scoring]
        if self.n_group > 1:
            parts.append(f"group {self.topk_group}/{self.n_group}")
        if self.correction_bias:
            parts.append("e-bias")
        if self.renormalize:
            parts.append("renorm")
        if self.routed_scaling != 1.0:
            parts.append(f"x{self.routed_scaling:g}")
        if self.weight_on_input:
            parts.append("w-on-input")
        return " ".join(parts)
