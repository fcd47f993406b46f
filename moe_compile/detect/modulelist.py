"""Per-expert layouts: an `nn.ModuleList` of E structurally identical MLPs, read as stacked expert tensors.

Each Linear name inside the experts becomes one stacked tensor [E, out, in] (bias [E, out]); the roles are then
assigned by `layouts.py` exactly as for 3-D parameters.

Dimension legend: E = experts, H = hidden, I = expert intermediate size.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_compile.detect.candidate import get_path
from moe_compile.detect.layouts import ExpertTensor


def _linears(expert: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in expert.named_modules() if isinstance(m, nn.Linear)}


def _structure(expert: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in expert.named_parameters()]


def modulelist_tensors(list_name: str, experts: nn.ModuleList, hidden: int) -> list[ExpertTensor]:
    """Stacked views of the experts' Linears, or [] if the list is not E identical Linear-only MLPs."""
    first = experts[0]
    structure = _structure(first)
    if not structure or any(_structure(e) != structure for e in experts):
        return []
    linears = _linears(first)
    linear_params = {f"{n}.{p}" for n, m in linears.items() for p, _ in m.named_parameters(recurse=False)}
    if {n for n, _ in structure} != linear_params or len(linears) not in (2, 3):
        return []  # parameters outside Linears (norms, scales): not a plain MLP
    tensors = []
    for lin_name, lin in linears.items():
        shape = (len(experts), lin.out_features, lin.in_features)
        tensor = ExpertTensor(f"{list_name}.{lin_name}", _stack_getter(list_name, len(experts), lin_name, "weight"),
                              shape)
        if lin.bias is not None:
            tensor.bias = ExpertTensor(f"{list_name}.{lin_name}.bias",
                                       _stack_getter(list_name, len(experts), lin_name, "bias"),
                                       (len(experts), lin.out_features, 1))
        tensors.append(tensor)
    return tensors


def _stack_getter(list_name: str, num_experts: int, lin_name: str, attr: str):
    def get(block: nn.Module) -> torch.Tensor:
        experts = get_path(block, list_name)
        stacked = torch.stack([getattr(get_path(experts[i], lin_name), attr) for i in range(num_experts)])
        return stacked if attr == "weight" else stacked.unsqueeze(-1)  # biases as [E, out, 1]

    return get
