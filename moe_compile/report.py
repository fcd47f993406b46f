"""What `inspect` found and what `optimize` applied, as data that also prints as a table."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moe_compile.spec import MoESpec


@dataclass
class BlockInfo:
    name: str
    class_name: str
    num_experts: int
    top_k: Optional[int]
    hidden_size: int
    intermediate_size: int
    scoring: Optional[str]  # proven scoring, or the hint from the config before a proof
    shared_expert: str  # none | plain | gated
    supported: bool
    reason: Optional[str] = None
    spec: Optional[MoESpec] = None
    proof_error: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "spec"}
        data["spec"] = None if self.spec is None else self.spec.to_dict()
        return data


def _render(table: Table) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=160, force_terminal=False, color_system=None).print(table)
    return buffer.getvalue()


@dataclass
class InspectReport:
    model_class: str
    blocks: list[BlockInfo] = field(default_factory=list)

    @property
    def num_supported(self) -> int:
        return sum(b.supported for b in self.blocks)

    def table(self) -> Table:
        table = Table(title=f"MoE blocks in {self.model_class}: {len(self.blocks)} found, {self.num_supported} fusable")
        for column in ("block", "class", "E", "top-k", "H", "I", "routing", "act", "shared", "status"):
            table.add_column(column, overflow="fold")
        for b in self.blocks:
            routing = b.spec.routing_summary() if b.spec else (b.scoring or "?")
            act = b.spec.activation if b.spec else "?"
            status = "proven" if b.spec else ("ok" if b.supported else escape(f"skip: {b.reason}"))
            table.add_row(b.name, b.class_name, str(b.num_experts), str(b.top_k or "?"), str(b.hidden_size),
                          str(b.intermediate_size), routing, act, b.shared_expert, status)
        return table

    def __str__(self) -> str:
        if not self.blocks:
            return f"No MoE blocks found in {self.model_class}.\n"
        return _render(self.table())

    def to_dict(self) -> dict[str, Any]:
        return {"model_class": self.model_class, "blocks": [b.to_dict() for b in self.blocks]}


@dataclass
class OptimizeResult:
    """`model.moe_compile` after `optimize`: what was applied, what was not and why."""

    profile: str
    device: str
    backend: str
    fused: list[str] = field(default_factory=list)  # block names now running the fused op
    skipped: dict[str, str] = field(default_factory=dict)  # block name -> reason it was left as it was
    specs: dict[str, MoESpec] = field(default_factory=dict)  # fused block name -> proven spec
    block_errors: dict[str, float] = field(default_factory=dict)  # fused block -> relative error vs the original
    features: dict[str, bool] = field(default_factory=dict)  # feature -> applied
    unavailable: dict[str, str] = field(default_factory=dict)  # feature the profile wanted -> why not applied
    passes: list[str] = field(default_factory=list)  # stages and graph passes run, in order
    pass_counts: dict[str, int] = field(default_factory=dict)  # pass -> rewrites it made
    notes: dict[str, str] = field(default_factory=dict)  # feature -> caveat (e.g. runs emulated: no speedup)
    quality: dict[str, dict[str, Any]] = field(default_factory=dict)  # fp8 / sparsity_24 -> quality gate record
    expert_parallel: dict[str, Any] = field(default_factory=dict)  # requested/size/rank/placement when asked for

    @property
    def max_error(self) -> float:
        """Largest relative L2 error of a fused block against the original on probe inputs (0 if none fused)."""
        return max(self.block_errors.values(), default=0.0)

    def table(self) -> Table:
        table = Table(title=f"moe_compile: profile {self.profile!r} on {self.device}, backend {self.backend}")
        table.add_column("block", overflow="fold")
        table.add_column("result")
        table.add_column("detail", overflow="fold")
        for name in self.fused:
            spec = self.specs[name]
            table.add_row(name, "fused", f"E={spec.num_experts} k={spec.top_k} {spec.routing_summary()} "
                                         f"{spec.activation}; error {self.block_errors[name]:.1e}")
        for name, reason in self.skipped.items():
            table.add_row(name, "skipped", escape(reason))
        for name, reason in self.unavailable.items():
            table.add_row(f"feature {name}", "unavailable", escape(reason))
        for name, note in self.notes.items():
            table.add_row(f"feature {name}", "applied" if self.features.get(name) else "note", escape(note))
        for name, q in self.quality.items():
            detail = (f"perplexity {q['ppl_base']:.3f} -> {q['ppl']:.3f} ({q['increase']:+.2%}, threshold "
                      f"{q['threshold']:.2%})" if q.get("gated") else q.get("reason", ""))
            table.add_row(f"quality gate {name}", "accepted" if q["applied"] else "rejected", escape(detail))
        if self.expert_parallel:
            ep = self.expert_parallel
            detail = (f"requested {ep['requested']}, rank {ep.get('rank', 0)}, overlap {ep.get('overlap', '-')}"
                      if ep["size"] > 1 else escape(f"requested {ep['requested']}: {ep.get('reason', '')}"))
            table.add_row("expert parallel", f"{ep['size']} ranks", detail)
        return table

    def __str__(self) -> str:
        return _render(self.table())

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["specs"] = {k: v.to_dict() for k, v in self.specs.items()}
        data["max_error"] = self.max_error
        return data
