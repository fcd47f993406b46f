"""quantize_linears_fp8: the attention projections of every decoder layer to `FP8Linear` (module-level pass).

Which linears, found from the structure alone (no model or class names):
  * the decoder layers are the entries of each module list (the layer stack) that holds an MoE block: a fused
    block (`FusedMoEBlock`) or one that detection finds (`detect.find_candidates`), all entries of that list,
    dense layers included;
  * a layer's feed-forward slot is the child under which the MoE block sits (e.g. `mlp`), in every layer of the
    stack: MoE blocks, their routers and shared experts, and the dense MLPs of dense layers stay as they are;
  * every other child of a layer is its token mixer (attention: q/k/v/o, fused qkv, MLA's low-rank projections;
    also linear attention or state-space mixers, which sit in the same place), and its `nn.Linear` modules, at any
    depth, are quantized.
Embeddings, the LM head and the final norm sit outside the layer stack and stay in high precision. Only exact
`nn.Linear` modules are replaced (a subclass may be read by its owner in other ways, e.g.
`nn.MultiheadAttention.out_proj`), and not those whose owner's code reads `<attr>.weight` / `<attr>.bias` itself
(e.g. a Mamba mixer's `dt_proj.weight @ ...`, or `x.to(self.proj.weight.dtype)`, which would see the e4m3 weight):
the owner's class source is read for that (classes without source are taken as calling the linear only). Tied
weights are left alone.

`include`: fnmatch patterns over the linears' qualified names; when given, only matching ones are quantized (the
others are reported as skipped). `skip_unaligned`: skip linears whose K or N is not a multiple of 16, which
`torch._scaled_mm` cannot run (on a GPU they would take the emulated path, slower than bf16); `optimize` sets it
where the FP8 kernels run.
Counts the linears it replaced (`counters["moe_compile"]["quantize_linears_fp8"]`); `result.undo()` puts the
original `nn.Linear` modules back, bit for bit.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import re
from typing import Iterable, Optional

from torch import nn

from moe_compile.counters import counters
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.quant.fp8_linear import KERNEL_ALIGNMENT, FP8Linear
from moe_compile.quant.packed import ModulePassResult

NAME = "quantize_linears_fp8"
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


class LinearPassResult(ModulePassResult):
    """`ModulePassResult` whose records are module swaps: `undo()` sets the original modules back."""

    def record_swap(self, parent: nn.Module, attr: str, original: nn.Module, replacement: nn.Module) -> None:
        setattr(parent, attr, replacement)

        def restore() -> None:
            setattr(parent, attr, original)

        self._undo.append(restore)
        self.count += 1


def moe_block_names(model: nn.Module) -> list[str]:
    """Qualified names of the MoE blocks: fused ones, and those detection finds (an unfused model)."""
    names = [name for name, module in model.named_modules() if isinstance(module, FusedMoEBlock)]
    if names:
        return names
    from moe_compile.api import model_config
    from moe_compile.detect import find_candidates

    return [candidate.name for candidate in find_candidates(model, model_config(model))]


def decoder_layers(model: nn.Module) -> dict[str, set[str]]:
    """{decoder layer name: its feed-forward slots} for every entry of each layer stack that holds an MoE block."""
    modules = dict(model.named_modules())
    stacks: dict[str, set[str]] = {}  # stack name -> slot names (the child of a layer that holds the MoE block)
    for block in moe_block_names(model):
        parts = block.split(".")
        for depth in range(len(parts) - 2, -1, -1):  # the innermost container above the block, with a layer between
            stack = ".".join(parts[:depth])
            if isinstance(modules.get(stack), _CONTAINERS) and depth + 1 < len(parts):
                stacks.setdefault(stack, set()).add(parts[depth + 1])
                break
    layers: dict[str, set[str]] = {}
    for stack, slots in stacks.items():
        for child in modules[stack]._modules:
            layers[f"{stack}.{child}" if stack else child] = slots
    return layers


@functools.lru_cache(maxsize=None)
def _class_source(cls: type) -> str:
    """The source of `cls` and of its bases below nn.Module ("" where Python has none, e.g. classes built by exec)."""
    parts = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or klass.__module__.startswith("torch.nn"):
            continue
        try:
            parts.append(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
    return "\n".join(parts)


def reads_weight_directly(owner: nn.Module, attr: str) -> bool:
    """Whether `owner`'s class code reads `.<attr>.weight` or `.<attr>.bias` (rather than only calling the linear)."""
    return re.search(rf"\.{re.escape(attr)}\.(weight|bias)\b", _class_source(type(owner))) is not None


def attention_linears(model: nn.Module) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """({qualified name: linear} of the token mixers of every decoder layer, {name: why not quantized})."""
    modules = dict(model.named_modules())
    found: dict[str, nn.Linear] = {}
    skipped: dict[str, str] = {}
    for layer_name, slots in decoder_layers(model).items():
        for child_name, child in modules[layer_name].named_children():
            if child_name in slots or isinstance(child, FusedMoEBlock):
                continue
            prefix = f"{layer_name}.{child_name}"
            owned = [(modules[layer_name], child_name, prefix)]  # (owner, attribute, qualified name) of each module
            owned += [(owner, attr, f"{owner_name}.{attr}") for owner_name, owner in child.named_modules(prefix=prefix)
                      for attr in owner._modules]
            for owner, attr, name in owned:
                sub = getattr(owner, attr)
                if isinstance(sub, FP8Linear):
                    skipped[name] = "already FP8"
                elif isinstance(sub, nn.Linear) and type(sub) is not nn.Linear:
                    skipped[name] = (f"{type(sub).__name__} subclasses nn.Linear; its owner may read its weight "
                                     f"directly, so it is not replaced")
                elif isinstance(sub, nn.Linear) and reads_weight_directly(owner, attr):
                    skipped[name] = (f"{type(owner).__name__} reads {attr}.weight / {attr}.bias itself, which an "
                                     f"FP8 weight would break")
                elif isinstance(sub, nn.Linear):
                    found[name] = sub
    return found, skipped


def tied_linears(model: nn.Module, linears: dict[str, nn.Linear]) -> set[str]:
    """Names of linears whose weight is also held by another module (tied weights)."""
    holders: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        holders[id(param)] = holders.get(id(param), 0) + 1
    return {name for name, linear in linears.items() if holders.get(id(linear.weight), 0) > 1}


def quantize_linears_fp8(model: nn.Module, include: Optional[Iterable[str]] = None,
                         skip_unaligned: bool = False) -> LinearPassResult:
    """Replace the attention linears of `model` by `FP8Linear` (see the module docstring)."""
    result = LinearPassResult(NAME)
    patterns = None if include is None else list(include)
    found, result.skipped = attention_linears(model)
    tied = tied_linears(model, found)
    modules = dict(model.named_modules())
    planned = []
    for name, linear in found.items():
        reason = None
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            reason = f"not matched by include={patterns}"
        elif name in tied:
            reason = "its weight is tied to another module's"
        elif not linear.weight.is_floating_point() or linear.weight.is_meta:
            reason = f"weight is {linear.weight.dtype} on {linear.weight.device.type}: nothing to quantize"
        elif skip_unaligned and (linear.in_features % KERNEL_ALIGNMENT or linear.out_features % KERNEL_ALIGNMENT):
            reason = (f"K={linear.in_features}, N={linear.out_features}: not multiples of {KERNEL_ALIGNMENT}, so "
                      f"torch._scaled_mm cannot run it and the emulated path would be slower than bf16")
        if reason is not None:
            result.skipped[name] = reason
            continue
        parent_name, _, attr = name.rpartition(".")
        planned.append((modules[parent_name], attr, linear, FP8Linear.from_linear(linear)))
    for parent, attr, linear, fp8 in planned:  # install once every linear quantized: a failure changes nothing
        result.record_swap(parent, attr, linear, fp8)
    counters["moe_compile"][NAME] += result.count
    return result
