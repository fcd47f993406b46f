"""Expert weight layouts: find a block's expert tensors and list the ways to read them as (w13, w2, b13, b2).

Two storage forms are recognised, with no model numbers and no class names:
  * stacked: tensors with leading dim E (3-D `[E, a, b]`, or 2-D `[E*a, b]` viewed as `[E, a, b]`), under any
    attribute names, possibly spread over several children;
  * per-expert: an `nn.ModuleList` of E structurally identical MLPs made of two or three Linears.
Roles (gate, up, down, fused gate_up) and orientation come from shapes; names only order the options. Every
ambiguity (transposed or not, concatenated or interleaved, which Linear is the gate) becomes one more option for
the prover, which keeps the first that reproduces the block.

Dimension legend: E = experts, H = hidden, I = expert intermediate size.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from moe_compile.detect.candidate import CanonicalWeights, ExpertLayout

GATE_NAMES = ("gate_proj", "w1", "gate", "wi_0")
UP_NAMES = ("up_proj", "w3", "v1", "up", "wi_1")
DOWN_NAMES = ("down_proj", "w2", "down", "output", "fc2", "wo", "o_proj")
FUSED_NAMES = ("gate_up", "w13", "input", "fc1", "wi")

Getter = Callable[[nn.Module], torch.Tensor]  # block -> tensor [E, a, b]


@dataclass
class ExpertTensor:
    name: str  # path from the block, for messages and name hints
    get: Getter
    shape: tuple[int, int, int]  # [E, a, b] as read by `get`
    bias: Optional["ExpertTensor"] = None  # [E, out] viewed as [E, out, 1]


class LayoutError(ValueError):
    pass


def _name_score(name: str, names: tuple[str, ...]) -> int:
    last = name.lower().split(".")[-1] if "." in name else name.lower()
    full = name.lower()
    return 2 if any(last.startswith(n) for n in names) else (1 if any(n in full for n in names) else 0)


def _oriented(t: ExpertTensor, out_dim: int, in_dim: int) -> list[Getter]:
    """Getters returning t as [E, out_dim, in_dim]: as stored, transposed, or both when the shape is ambiguous."""
    _, a, b = t.shape
    options: list[Getter] = []
    if (a, b) == (out_dim, in_dim):
        options.append(t.get)
    if (a, b) == (in_dim, out_dim):
        options.append(lambda m, g=t.get: g(m).transpose(1, 2))
    return options


def _bias_getter(t: ExpertTensor) -> Optional[Getter]:
    return None if t.bias is None else t.bias.get


def _split_interleaved(w: torch.Tensor) -> torch.Tensor:
    """[E, 2I, ...] rows g0 u0 g1 u1 ... -> gate rows then up rows."""
    return torch.cat([w[:, 0::2], w[:, 1::2]], dim=1)


def _canonical(w: torch.Tensor, transformed: bool) -> torch.Tensor:
    return w.contiguous() if transformed else w


def layouts_from_tensors(tensors: list[ExpertTensor], hidden: int, concatenated: Optional[bool]) -> list[ExpertLayout]:
    """All readings of 2 (fused gate_up or plain up, down) or 3 (gate, up, down) expert tensors."""
    if len(tensors) == 2:
        return _two_tensor_layouts(tensors, hidden, concatenated)
    if len(tensors) == 3:
        return _three_tensor_layouts(tensors, hidden)
    names = ", ".join(t.name for t in tensors)
    raise LayoutError(f"expected 2 or 3 expert weight tensors, found {len(tensors)} ({names})")


def _intermediate_from_down(down: ExpertTensor, hidden: int) -> list[int]:
    _, a, b = down.shape
    dims = [d for d in (a, b) if d != hidden] or [hidden]
    return dims if (a == hidden or b == hidden) else []


def _two_tensor_layouts(tensors: list[ExpertTensor], hidden: int, concatenated: Optional[bool]) -> list[ExpertLayout]:
    def score(p):
        return _name_score(p[0].name, FUSED_NAMES + UP_NAMES) + _name_score(p[1].name, DOWN_NAMES)

    ordered = sorted(itertools.permutations(tensors, 2), key=lambda p: -score(p))
    layouts = []
    for first, down in ordered:
        for inter in _intermediate_from_down(down, hidden):
            for down_get in _oriented(down, hidden, inter):
                layouts += _fused_first_layouts(first, down, down_get, hidden, inter, concatenated)
    return layouts


def _fused_first_layouts(first, down, down_get, hidden, inter, concatenated) -> list[ExpertLayout]:
    layouts = []
    down_t = down_get is not down.get
    gated_forms = [("concatenated", False), ("interleaved", True)]
    if concatenated is True:
        gated_forms = gated_forms[:1]
    elif concatenated is False:
        gated_forms = gated_forms[1:]
    for up_get in _oriented(first, 2 * inter, hidden):
        up_t = up_get is not first.get
        for form, interleaved in gated_forms:
            desc = f"{first.name} {'[E,H,2I]' if up_t else '[E,2I,H]'} {form} + {down.name}"
            layouts.append(ExpertLayout(desc, _make_extract(up_get, down_get, first, down, up_t, down_t, interleaved)))
    for up_get in _oriented(first, inter, hidden):  # not gated: act(up)
        up_t = up_get is not first.get
        desc = f"{first.name} not gated + {down.name}"
        layouts.append(ExpertLayout(desc, _make_extract(up_get, down_get, first, down, up_t, down_t, False), False))
    return layouts


def _make_extract(up_get, down_get, first, down, up_t, down_t, interleaved):
    b13_get, b2_get = _bias_getter(first), _bias_getter(down)

    def extract(block: nn.Module) -> CanonicalWeights:
        w13 = up_get(block)
        b13 = None if b13_get is None else b13_get(block).squeeze(-1)
        if interleaved:
            w13 = _split_interleaved(w13)
            b13 = None if b13 is None else _split_interleaved(b13.unsqueeze(-1)).squeeze(-1)
        b2 = None if b2_get is None else b2_get(block).squeeze(-1)
        return CanonicalWeights(_canonical(w13, up_t or interleaved), _canonical(down_get(block), down_t), b13, b2)

    return extract


def _three_tensor_layouts(tensors: list[ExpertTensor], hidden: int) -> list[ExpertLayout]:
    def score(p):
        gate, up, down = p
        return _name_score(gate.name, GATE_NAMES) + _name_score(up.name, UP_NAMES) + _name_score(down.name, DOWN_NAMES)

    layouts = []
    for gate, up, down in sorted(itertools.permutations(tensors, 3), key=lambda p: -score(p)):
        for inter in _intermediate_from_down(down, hidden):
            for down_get in _oriented(down, hidden, inter):
                for gate_get in _oriented(gate, inter, hidden):
                    for up_get in _oriented(up, inter, hidden):
                        desc = f"gate {gate.name} + up {up.name} + down {down.name}"
                        layouts.append(ExpertLayout(desc, _make_split_extract(gate, up, down, gate_get, up_get,
                                                                              down_get)))
    return layouts


def _make_split_extract(gate, up, down, gate_get, up_get, down_get):
    biases = [_bias_getter(t) for t in (gate, up, down)]

    def extract(block: nn.Module) -> CanonicalWeights:
        w13 = torch.cat([gate_get(block), up_get(block)], dim=1)  # [E, 2I, H]
        b13 = None
        if biases[0] is not None or biases[1] is not None:
            e, two_i = w13.shape[0], w13.shape[1]
            parts = [b(block).squeeze(-1) if b is not None else w13.new_zeros(e, two_i // 2) for b in biases[:2]]
            b13 = torch.cat(parts, dim=1)
        b2 = None if biases[2] is None else biases[2](block).squeeze(-1)
        return CanonicalWeights(w13, _canonical(down_get(block), down_get is not down.get), b13, b2)

    return extract
