"""Structural detection: which modules are MoE blocks, found from shapes alone (no forward, no model numbers).

A block is the lowest module holding
  * a router: a 2-D weight [E, H] (a bare Linear, a router module with `.weight`, or a router holding a Linear);
  * E experts: tensors with leading dim E, or a ModuleList of E identical MLPs;
  * optionally a shared expert (an MLP H -> H) and its scalar gate Linear(H, 1).
Any other child with parameters or buffers makes the block unsupported (fail closed), with the reason recorded.

Dimension legend: E = experts, H = hidden, I = expert intermediate size.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from moe_compile.detect.candidate import Candidate, Hints, RouterInfo, get_path
from moe_compile.detect.hints import read_hints
from moe_compile.detect.layouts import ExpertTensor, LayoutError, layouts_from_tensors
from moe_compile.detect.modulelist import modulelist_tensors

ROUTER_NAME_ORDER = ("gate", "router", "gating", "switch", "wg")
CORRECTION_BIAS_NAMES = ("e_score_correction_bias", "expert_bias", "score_correction_bias")


def find_candidates(model: nn.Module, config=None) -> list[Candidate]:
    """Every MoE block of `model`, outermost-first order of `named_modules`, nested blocks skipped."""
    found: list[Candidate] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        candidate = match_block(name, module, config)
        if candidate is not None:
            found.append(candidate)
            taken.append(name)
    return found


def _children_with_state(module: nn.Module) -> dict[str, nn.Module]:
    return {n: c for n, c in module.named_children() if _has_state(c)}


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _router_weights(block: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(path, owner, param name) of 2-D weights directly on a child, or on a grandchild (router.layer)."""
    children = sorted(block.named_children(), key=lambda nc: _router_rank(nc[0]))
    for name, child in children:
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            yield name, child, "weight"
        for sub_name, sub in child.named_children():
            sub_weight = getattr(sub, "weight", None)
            if isinstance(sub_weight, torch.Tensor) and sub_weight.dim() == 2 and not isinstance(child, nn.ModuleList):
                yield f"{name}.{sub_name}", sub, "weight"


def _router_rank(name: str) -> int:
    lowered = name.lower()
    return next((i for i, n in enumerate(ROUTER_NAME_ORDER) if n in lowered), len(ROUTER_NAME_ORDER))


def match_block(name: str, block: nn.Module, config=None) -> Optional[Candidate]:
    """A Candidate if `block` has a router next to E experts, else None."""
    for router_path, owner, weight_name in _router_weights(block):
        num_experts, hidden = getattr(owner, weight_name).shape
        if num_experts < 2:
            continue
        experts = _find_experts(block, router_path, num_experts, hidden)
        if experts is None:
            continue
        expert_paths, tensors, concatenated = experts
        return _build_candidate(name, block, router_path, owner, num_experts, hidden, expert_paths, tensors,
                                concatenated, config)
    return None


def _find_experts(block, router_path, num_experts, hidden):
    """(child names holding experts, expert tensors, concatenated flag) or None."""
    router_top = router_path.split(".")[0]
    for child_name, child in block.named_children():
        if child_name == router_top:
            continue
        if isinstance(child, nn.ModuleList) and len(child) == num_experts:
            tensors = modulelist_tensors(child_name, child, hidden)
            if tensors:
                return [child_name], tensors, None
    stacked = _stacked_tensors(block, router_top, num_experts)
    if len(stacked) >= 2:
        paths = sorted({t.name.split(".")[0] for t in stacked})
        concatenated = None
        for p in paths:
            flag = getattr(get_path(block, p), "is_concatenated", None)
            concatenated = flag if isinstance(flag, bool) else concatenated
        return paths, stacked, concatenated
    return None


def _stacked_tensors(block: nn.Module, router_top: str, num_experts: int) -> list[ExpertTensor]:
    """Weights with leading dim E (3-D) or E*a (2-D), their biases [E, out] attached by name."""
    weights, biases = [], {}
    linear_params = {f"{n}.{p}" for n, m in block.named_modules() if isinstance(m, nn.Linear)
                     for p, _ in m.named_parameters(recurse=False)}
    for pname, param in block.named_parameters():
        if pname.split(".")[0] == router_top or pname in linear_params:  # Linears are ordinary layers
            continue
        shape = tuple(param.shape)
        if param.dim() == 3 and shape[0] == num_experts:
            weights.append(ExpertTensor(pname, _param_getter(pname, None), shape))
        elif param.dim() == 2 and shape[0] == num_experts and pname.endswith("bias"):
            biases[pname] = ExpertTensor(pname, _param_getter(pname, (num_experts, shape[1], 1)),
                                         (num_experts, shape[1], 1))
        elif param.dim() == 2 and shape[0] % num_experts == 0 and shape[0] > num_experts:
            view = (num_experts, shape[0] // num_experts, shape[1])
            weights.append(ExpertTensor(pname, _param_getter(pname, view), view))
    for w in weights:
        w.bias = _matching_bias(w.name, biases)
    return weights


def _matching_bias(weight_name: str, biases: dict[str, ExpertTensor]) -> Optional[ExpertTensor]:
    stem = weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name
    for candidate in (f"{stem}_bias", f"{stem}.bias"):
        if candidate in biases:
            return biases[candidate]
    return None


def _param_getter(path: str, view: Optional[tuple[int, ...]]):
    def get(block: nn.Module) -> torch.Tensor:
        tensor = get_path(block, path)
        return tensor if view is None else tensor.view(view)

    return get


def _build_candidate(name, block, router_path, owner, num_experts, hidden, expert_paths, tensors, concatenated,
                     config) -> Candidate:
    router = RouterInfo(path=router_path, bias_name=_router_bias_name(owner, num_experts),
                        correction_bias_path=_correction_bias_path(block, router_path, num_experts))
    hints = read_hints(block, router_path, expert_paths, config, num_experts)
    candidate = Candidate(name, block, num_experts, hidden, 0, router, [], hints)
    try:
        candidate.layouts = layouts_from_tensors(tensors, hidden, concatenated)
    except LayoutError as exc:
        candidate.reason = str(exc)
        return candidate
    candidate.intermediate_size = _intermediate(candidate)
    _attach_shared_expert(candidate, block, router_path, expert_paths, hidden)
    return candidate


def _intermediate(candidate: Candidate) -> int:
    if not candidate.layouts:
        return 0
    weights = candidate.layouts[0].extract(candidate.module)
    return weights.w2.shape[-1]


def _router_bias_name(owner: nn.Module, num_experts: int) -> Optional[str]:
    bias = getattr(owner, "bias", None)
    return "bias" if isinstance(bias, torch.Tensor) and tuple(bias.shape) == (num_experts,) else None


def _correction_bias_path(block: nn.Module, router_path: str, num_experts: int) -> Optional[str]:
    router_top = router_path.split(".")[0]
    for prefix in (router_path, router_top, ""):
        owner = get_path(block, prefix) if prefix else block
        for attr in CORRECTION_BIAS_NAMES:
            tensor = getattr(owner, attr, None)
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == (num_experts,):
                return f"{prefix}.{attr}" if prefix else attr
    return None


def _attach_shared_expert(candidate: Candidate, block, router_path, expert_paths, hidden) -> None:
    """Classify the remaining stateful children: shared expert MLP, its scalar gate, or unknown (fail closed)."""
    known = {router_path.split(".")[0], *expert_paths}
    if candidate.router.correction_bias_path and "." not in candidate.router.correction_bias_path:
        known.add(candidate.router.correction_bias_path)
    for child_name, child in _children_with_state(block).items():
        if child_name in known:
            continue
        if isinstance(child, nn.Linear) and child.in_features == hidden and child.out_features == 1:
            candidate.shared_gate_path = child_name
        elif _is_mlp(child, hidden) and candidate.shared_expert_path is None:
            candidate.shared_expert_path = child_name
        else:
            kind = type(child).__name__
            candidate.reason = f"unknown stateful child {child_name!r} ({kind}): not fused (fail closed)"
    own = [n for n, _ in block.named_parameters(recurse=False)] + [n for n, _ in block.named_buffers(recurse=False)]
    unknown_own = [n for n in own if n not in known]
    if unknown_own:
        candidate.reason = f"unknown tensors {unknown_own} on the block itself: not fused (fail closed)"
    if candidate.shared_gate_path and not candidate.shared_expert_path:
        candidate.reason = f"scalar gate {candidate.shared_gate_path!r} without a shared expert: not fused"


def _is_mlp(module: nn.Module, hidden: int) -> bool:
    """Only Linears with parameters, the first reading H and one writing H."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    linear_params = sum(p.numel() for m in linears for p in m.parameters(recurse=False))
    if not linears or linear_params != sum(p.numel() for p in module.parameters()):
        return False
    return any(m.in_features == hidden for m in linears) and any(m.out_features == hidden for m in linears)


__all__ = ["find_candidates", "match_block", "Hints"]
