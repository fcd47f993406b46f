"""What structural detection finds in one block, before the prover has run any forward.

Dimension legend: E = experts, H = hidden, I = expert intermediate size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn


@dataclass
class CanonicalWeights:
    """Expert weights in the fused op's layout; tensors may alias the block's own parameters."""

    w13: torch.Tensor  # [E, 2I, H] gate rows then up rows; [E, I, H] when not gated
    w2: torch.Tensor  # [E, H, I]
    b13: Optional[torch.Tensor] = None  # [E, 2I]
    b2: Optional[torch.Tensor] = None  # [E, H]


@dataclass
class ExpertLayout:
    """One way to read the block's expert tensors; the prover keeps the first that reproduces the block."""

    description: str  # e.g. "3-D gate_up_proj [E,H,2I] transposed, interleaved"
    extract: Callable[[nn.Module], CanonicalWeights]  # block -> canonical weights (called on copies too)
    gated: bool = True


@dataclass
class RouterInfo:
    path: str  # attribute path from the block, e.g. "gate" or "router.layer"
    weight_name: str = "weight"
    bias_name: Optional[str] = None  # router bias [E] (GPT-OSS)
    correction_bias_path: Optional[str] = None  # e_score_correction_bias [E], path from the block


@dataclass
class Hints:
    """Scalars read from the block, its children or the model config; the prover tries these first."""

    top_k: Optional[int] = None
    renormalize: Optional[bool] = None
    scoring: Optional[str] = None
    n_group: int = 1
    topk_group: int = 1
    routed_scaling: float = 1.0
    activation: Optional[str] = None
    alpha: float = 1.702
    limit: float = 7.0
    custom_gate: bool = False  # the experts override `_apply_gate` (a custom GLU such as GPT-OSS's)


@dataclass
class Candidate:
    """A module that looks like an MoE block: a router [E, H] next to E experts."""

    name: str
    module: nn.Module
    num_experts: int
    hidden_size: int
    intermediate_size: int
    router: RouterInfo
    layouts: list[ExpertLayout]
    hints: Hints = field(default_factory=Hints)
    shared_expert_path: Optional[str] = None
    shared_gate_path: Optional[str] = None
    reason: Optional[str] = None  # set when the block cannot be fused (fail closed)

    @property
    def supported(self) -> bool:
        return self.reason is None

    @property
    def class_name(self) -> str:
        return type(self.module).__name__


def get_path(module: nn.Module, path: Optional[str]):
    """`module.a.b` for path "a.b"; None for a None path."""
    if path is None:
        return None
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
