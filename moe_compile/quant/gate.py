"""The quality gate: apply 2:4 and FP8 to the fused blocks only while perplexity on calibration text stays within a
threshold, and record the measurements in `model.moe_compile.quality`.

Each step is measured against the model before that step (2:4 first, then FP8 on top, as the design orders them):
`increase = ppl / ppl_base - 1`; above the threshold the step is undone. Without calibration text the gate cannot
measure: a feature forced on is then applied ungated and the record says so.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

from moe_compile.counters import counters
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.quant.packed import ModulePassResult

log = logging.getLogger("moe_compile")

DEFAULT_THRESHOLDS = {"fp8": 0.01, "sparsity_24": 0.05}  # largest accepted relative perplexity increase
CALIBRATION_MAX_BYTES = 16384


def _passes() -> list[tuple[str, Callable[[nn.Module], ModulePassResult]]]:
    from moe_compile.passes.quantize_fp8 import quantize_fp8
    from moe_compile.passes.sparsify_24 import sparsify_24

    return [("sparsity_24", sparsify_24), ("fp8", quantize_fp8)]  # prune dense weights, then quantize kept values


def calibration_ids(model: nn.Module, calibration: Any) -> Optional[torch.Tensor]:
    """Token ids [N] for the gate: given text (str / bytes for byte-level models, or token ids), else the held-out
    text of the built-in quality model, else None (no gate possible)."""
    from moe_compile.quality.eval import encode

    if calibration is None:
        if getattr(model, "moe_compile_quality_model", False):
            from moe_compile.quality.corpus import heldout_bytes

            return encode(heldout_bytes(CALIBRATION_MAX_BYTES))
        return None
    if isinstance(calibration, torch.Tensor):
        return encode(calibration)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab != 256:
        raise ValueError("calibration_text as str/bytes is read as bytes, which needs a byte-level model "
                         f"(vocab_size 256, this one has {vocab}); pass token ids (a LongTensor) instead")
    return encode(calibration)


def apply_quality_gated(model: nn.Module, enabled: dict[str, bool], result: Any, calibration: Any = None,
                        thresholds: Optional[dict[str, float]] = None) -> list[ModulePassResult]:
    """Run the enabled weight passes under the gate; returns the applied passes (each has `.undo()`)."""
    from moe_compile.quality.eval import perplexity

    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    wanted = [(name, run) for name, run in _passes() if enabled.get(name)]
    if not wanted:
        return []
    if not any(isinstance(m, FusedMoEBlock) for m in model.modules()):
        for name, _ in wanted:
            result.features[name] = False
            result.unavailable[name] = "no fused MoE block to apply it to"
        return []
    ids = calibration_ids(model, calibration)
    base = None if ids is None else perplexity(model, text=ids)
    applied = []
    for name, run in wanted:
        outcome = run(model)
        pass_name = outcome.name
        record: dict[str, Any] = {"blocks": outcome.count, "threshold": limits[name]}
        if outcome.skipped:
            record["skipped"] = dict(outcome.skipped)
        if ids is None:
            record.update(applied=outcome.count > 0, gated=False,
                          reason="no calibration text: quality not measured (pass calibration_text=...)")
        else:
            ppl = perplexity(model, text=ids)
            increase = ppl / base - 1.0
            accepted = increase <= limits[name]
            record.update(ppl_base=base, ppl=ppl, increase=increase, applied=accepted and outcome.count > 0,
                          gated=True)
            if not accepted:
                outcome.undo()
                counters["moe_compile"][pass_name] -= outcome.count
                result.features[name] = False
                result.unavailable[name] = (f"quality gate: perplexity +{increase:.2%} on calibration text "
                                            f"({base:.3f} -> {ppl:.3f}) exceeds the {limits[name]:.2%} threshold")
                log.info("moe_compile: %s rolled back: %s", name, result.unavailable[name])
            else:
                base = ppl
        result.quality[name] = record
        if record["applied"]:
            applied.append(outcome)
            result.passes.append(pass_name)
            result.pass_counts[pass_name] = outcome.count
    return applied
