"""sparsify_linears_24: 2:4 pruning of the dense linears through NVIDIA ModelOpt (module-level pass).

ModelOpt's `mts.sparsify` prunes `nn.Linear` weights to 2:4 along the input dim (its `m4n2_1d` pattern): by
magnitude (`sparse_magnitude`), or, given calibration token ids, by SparseGPT (`sparsegpt`: each linear's Hessian
from its inputs over those tokens picks the weights to drop and adjusts the rest), and leaves fused 3-D expert
weights dense, which `sparsify_24` prunes itself; this pass gives it
the rest: every exact `nn.Linear` of the model (attention projections, dense MLPs of dense layers, shared experts)
except the LM head (the output embeddings, and any linear named `lm_head`, as ModelOpt's own default rule does)
and tied weights. `mts.export` then drops ModelOpt's masks: the linears are plain `nn.Linear` again, their
weights dense tensors with half the values zero (what ModelOpt's deployment paths expect, e.g. TensorRT with
`sparse_weights=True`). Our decode step runs them as before (dense GEMMs): this saves neither time nor memory here.
ModelOpt decides per shape which linears its rules take; the ones it leaves dense are reported as skipped.

Counts the linears it pruned (`counters["moe_compile"]["sparsify_linears_24"]`); `result.undo()` puts the dense
weights back (kept in host memory meanwhile) and removes the ModelOpt state the pass attached to the model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any, Optional

import torch
from torch import nn

from moe_compile.counters import counters
from moe_compile.quant.packed import ModulePassResult
from moe_compile.quant.sparse24 import is_24_sparse

log = logging.getLogger("moe_compile")

NAME = "sparsify_linears_24"
MODELOPT_STATE_ATTRIBUTES = ("_modelopt_state", "_modelopt_state_version")  # what mts.sparsify attaches
CALIBRATION_CHUNK = 256  # tokens per forward of SparseGPT's calibration loop


def import_mts() -> Any:
    """`modelopt.torch.sparsity`, or `MissingDependencyError` naming the extra."""
    from moe_compile.quant.modelopt_calib import import_modelopt

    return import_modelopt("sparsity", "2:4 sparsity of the dense linears")


def dense_linears(model: nn.Module) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """(name -> the linears this pass gives ModelOpt, name -> why another linear is left alone)."""
    from moe_compile.passes.quantize_linears_fp8 import tied_linears

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    tied = tied_linears(model, linears)
    found, skipped = {}, {}
    for name, module in linears.items():
        if module is output or name.rpartition(".")[2] == "lm_head":
            skipped[name] = "the LM head stays dense (as ModelOpt's default rule keeps it)"
        elif type(module) is not nn.Linear:
            skipped[name] = f"{type(module).__name__} subclasses nn.Linear: ModelOpt's rules are for nn.Linear"
        elif name in tied:
            skipped[name] = "its weight is tied to another module's"
        elif not module.weight.is_floating_point():
            skipped[name] = f"weight is {module.weight.dtype}: nothing to prune"
        else:
            found[name] = module
    return found, skipped


def sparsify_linears_24(model: nn.Module, calibration: Optional[torch.Tensor] = None) -> ModulePassResult:
    """Prune the dense linears of `model` to 2:4 with ModelOpt (see the module docstring): by magnitude, or by
    SparseGPT over `calibration` (token ids [N])."""
    mts = import_mts()
    result = ModulePassResult(NAME)
    linears, result.skipped = dense_linears(model)
    if not linears:
        return result
    saved = {name: linear.weight.detach().to("cpu", copy=True) for name, linear in linears.items()}
    attached = [a for a in MODELOPT_STATE_ATTRIBUTES if a not in model.__dict__]
    rules = {"nn.Linear": {"*": None, **{name: {} for name in linears}}}  # exactly these linears
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # a line per linear; the
            warnings.filterwarnings("ignore", message="Skipping sparsifying")  # shapes it skips: in result.skipped
            if calibration is None:
                mts.sparsify(model, mode=[("sparse_magnitude", rules)])
            else:
                mts.sparsify(model, mode=[("sparsegpt", rules)], config=_sparsegpt_config(model, calibration))
            mts.export(model)
    except BaseException:
        _restore(model, saved, list(linears), attached)
        raise
    pruned = [name for name in linears if _is_24(model.get_submodule(name).weight)]  # ModelOpt skips some shapes
    for name in linears:
        if name not in pruned:
            result.skipped[name] = "ModelOpt's 2:4 rules left it dense (its shape)"
    result.add_undo(lambda: _restore(model, saved, pruned, attached), count=len(pruned))
    counters["moe_compile"][NAME] += result.count
    log.info("moe_compile: %d dense linears pruned to 2:4 by ModelOpt (%d left dense)", result.count,
             len(result.skipped))
    return result


def _sparsegpt_config(model: nn.Module, calibration: torch.Tensor) -> dict[str, Any]:
    """ModelOpt's SparseGPT search config: its forward loop feeds the calibration ids in chunks (inference only);
    the Hessians live on the model's device."""
    device = next(model.parameters()).device
    ids = calibration.reshape(-1).to(device)

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for chunk in ids.split(CALIBRATION_CHUNK):
                m(chunk[None])

    return {"forward_loop": forward_loop, "device": str(device)}


def _is_24(weight: torch.Tensor) -> bool:
    return weight.shape[-1] % 4 == 0 and is_24_sparse(weight)


def _restore(model: nn.Module, saved: dict[str, torch.Tensor], names: list[str], attached: list[str]) -> None:
    """Dense weights back into the (exported: plain) linears; the ModelOpt state the pass attached removed."""
    for name in names:
        module = model.get_submodule(name)
        if type(module).__name__ == "SparseLinear":  # failed before export: ModelOpt's module is still there
            mts = import_mts()
            mts.export(model)
            module = model.get_submodule(name)
        with torch.no_grad():
            module.weight.copy_(saved[name].to(module.weight.device))
    for attribute in attached:
        model.__dict__.pop(attribute, None)
