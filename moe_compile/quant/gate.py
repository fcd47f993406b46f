"""The quality gate: apply 2:4 and FP8 to the fused blocks only while perplexity on calibration text stays within a
threshold, and record the measurements in `model.moe_compile.quality`.

Each step is measured against the model before that step (2:4 first, then FP8 on top, as the design orders them):
`increase = ppl / ppl_base - 1`; above the threshold the step is undone. Without calibration text the gate cannot
measure: a feature forced on is then applied ungated and the record says so.

FP8 weight scales (`fp8_calibration`): "auto" calibrates with NVIDIA ModelOpt when it is installed (its max
algorithm, `moe_compile.quant.modelopt_calib`) and otherwise logs how to install it and uses the built-in max
calibration; "modelopt" (max) and "modelopt-mse" (MSE-searched weight amax) require ModelOpt; "max" is the built-in
one. The method is recorded in `quality["fp8"]["calibration"]`. If anything fails, every step applied so far is
undone.

With `fp8_attention=True` FP8 covers the attention projections too (`passes/quantize_linears_fp8.py`, `FP8Linear`;
off by default: slower than bf16 at decode sizes on an H100): once the experts' FP8 is accepted, the attention
linears go to FP8 as a second step, `quality["fp8_attention"]`, measured against the model
before any FP8 with the same threshold (`quality_thresholds["fp8_attention"]` overrides it). So the whole FP8 feature
stays within one perplexity budget, and where attention does not fit in it only that step is undone and the expert
FP8 stays (a rejected attention step does not turn the `fp8` feature off). Where the FP8 kernels run, linears whose
shapes `torch._scaled_mm` cannot run are left in high precision (skipped, with the reason).

With `sparse_linears=True` 2:4 covers the dense linears too (`passes/sparsify_linears_24.py`, NVIDIA ModelOpt's
2:4, by SparseGPT on the same calibration tokens where the experts' 2:4 used SparseGPT, else by magnitude; stored
dense with zeros, so no speedup in our kernels): once the experts' 2:4 is accepted, a second
step `quality["sparsity_24_linears"]`, measured against the model before any 2:4 with the sparsity_24 threshold,
undone alone when it does not fit.
"""

from __future__ import annotations

from functools import partial

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
FP8_CALIBRATIONS = ("auto", "modelopt", "modelopt-mse", "max")  # ModelOpt's max / mse algorithm; built-in max


def fp8_weight_scales(model: nn.Module, ids: Optional[torch.Tensor], mode: str
                      ) -> tuple[Optional[dict], dict[str, Any]]:
    """(per-block scales for `quantize_fp8`, or None for its built-in max; the calibration record)."""
    from moe_compile.errors import MissingDependencyError
    from moe_compile.quant import modelopt_calib

    if mode not in FP8_CALIBRATIONS:
        raise ValueError(f"fp8_calibration={mode!r} is not one of {FP8_CALIBRATIONS}")
    if mode == "max":
        return None, {"method": "max", "algorithm": "max"}
    try:
        modelopt_calib.import_mtq()
    except MissingDependencyError:
        if mode != "auto":
            raise
        log.warning("moe_compile: nvidia-modelopt is not installed, so FP8 weight scales use the built-in max "
                    "calibration; for ModelOpt calibration: %s", modelopt_calib.INSTALL_HINT)
        return None, {"method": "max", "algorithm": "max", "reason": f"nvidia-modelopt missing: "
                                                                    f"{modelopt_calib.INSTALL_HINT}"}
    algorithm = "mse" if mode == "modelopt-mse" else "max"
    calibration = modelopt_calib.calibrate_fp8(model, ids, algorithm)
    return calibration.scales, calibration.record()


SPARSITY_METHODS = ("auto", "sparsegpt", "magnitude")  # auto: SparseGPT where there is calibration text
SPARSEGPT_CALIBRATION_BYTES = 32768  # the built-in quality model calibrates on this much of its training text


def sparsity_pruned(model: nn.Module, ids: Optional[torch.Tensor], method: str
                    ) -> tuple[Optional[dict], dict[str, Any]]:
    """(per-block 2:4 weights for `sparsify_24`, or None for its magnitude pruning; the record). SparseGPT's weights
    are computed when `sparsify_24` converts the block (a callable per block), so at most one block's pruned copy
    exists at a time besides the model."""
    if method not in SPARSITY_METHODS:
        raise ValueError(f"sparsity_method={method!r} is not one of {SPARSITY_METHODS}")
    calibration, source = sparsity_calibration(model, ids)
    if method == "magnitude" or (method == "auto" and calibration is None):
        return None, {"method": "magnitude"}
    if calibration is None:
        raise ValueError("sparsity_method='sparsegpt' prunes from calibration activations: pass calibration_text=...")
    from moe_compile.fused_block import fused_blocks
    from moe_compile.quant.calibration_data import record_block_inputs
    from moe_compile.quant.sparsegpt import sparsegpt_expert_weights

    blocks = {name: b for name, b in fused_blocks(model).items() if b.packed is None}
    inputs = record_block_inputs(model, calibration, blocks)  # reads the model, changes nothing
    pruned = {name: partial(sparsegpt_expert_weights, block, inputs[name]) for name, block in blocks.items()
              if name in inputs}
    return pruned, {"method": "sparsegpt", "calibration": source, "tokens": int(calibration.numel())}


def sparsity_calibration(model: nn.Module, ids: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], str]:
    """The built-in quality model calibrates on its training text (its gate measures on held-out text); any other
    model on the user's calibration text, which the gate then also measures on."""
    if getattr(model, "moe_compile_quality_model", False):
        from moe_compile.quality.corpus import train_bytes
        from moe_compile.quality.eval import encode

        return encode(train_bytes()[:SPARSEGPT_CALIBRATION_BYTES]), "training text"
    return ids, "calibration_text"


STEP_FEATURE = {"fp8_attention": "fp8", "sparsity_24_linears": "sparsity_24"}  # steps of another step's feature
KERNEL_PROBE = 16  # a shape every FP8 kernel takes: asks only whether the device has them


def _passes(ids: Optional[torch.Tensor], fp8_calibration: str, records: dict[str, dict],
            sparsity_method: str = "auto") -> list[tuple[str, Callable[[nn.Module], ModulePassResult]]]:
    from moe_compile.passes.quantize_fp8 import quantize_fp8
    from moe_compile.passes.quantize_linears_fp8 import quantize_linears_fp8
    from moe_compile.passes.sparsify_24 import sparsify_24
    from moe_compile.passes.sparsify_linears_24 import sparsify_linears_24

    def fp8(model: nn.Module) -> ModulePassResult:
        scales, records["fp8"] = fp8_weight_scales(model, ids, fp8_calibration)  # reads the model, changes nothing
        return quantize_fp8(model, scales)

    def sparsity(model: nn.Module) -> ModulePassResult:
        pruned, records["sparsity_24"] = sparsity_pruned(model, ids, sparsity_method)
        return sparsify_24(model, pruned)

    def sparsity_linears(model: nn.Module) -> ModulePassResult:
        # the experts' method: SparseGPT on the same calibration tokens, else magnitude
        calibration = None
        if records.get("sparsity_24", {}).get("method") == "sparsegpt":
            calibration, source = sparsity_calibration(model, ids)
            records["sparsity_24_linears"] = {"method": "modelopt sparsegpt", "calibration": source}
        else:
            records["sparsity_24_linears"] = {"method": "modelopt sparse_magnitude"}
        return sparsify_linears_24(model, calibration)

    def fp8_attention(model: nn.Module) -> ModulePassResult:
        from moe_compile.quant.fp8_linear import kernel_unsupported

        device = next(model.parameters()).device
        kernels = kernel_unsupported(device, KERNEL_PROBE, KERNEL_PROBE) is None  # an aligned shape: the device
        records["fp8_attention"] = {"method": "max"}  # per-output-channel amax / 448
        return quantize_linears_fp8(model, skip_unaligned=kernels)

    # prune dense weights (experts, then the dense linears), then quantize kept values; then the attention linears
    return [("sparsity_24", sparsity), ("sparsity_24_linears", sparsity_linears), ("fp8", fp8),
            ("fp8_attention", fp8_attention)]


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
                        thresholds: Optional[dict[str, float]] = None, fp8_calibration: str = "auto",
                        auto_features: Optional[set[str]] = None, sparsity_method: str = "auto",
                        fp8_attention: bool = False, sparse_linears: bool = False) -> list[ModulePassResult]:
    """Run the enabled weight passes under the gate; returns the applied passes (each has `.undo()`). On an error
    the passes applied so far are undone before it propagates. `auto_features`: the enabled ones that the profile
    set to `auto` (not forced), dropped when there is no calibration text to gate them on. `fp8_attention`: FP8
    also quantizes the attention linears; `sparse_linears`: 2:4 also prunes the dense linears through ModelOpt
    (see the module docstring)."""
    if not any(enabled.get(name) for name in DEFAULT_THRESHOLDS):
        return []
    if not any(isinstance(m, FusedMoEBlock) for m in model.modules()):
        for name in DEFAULT_THRESHOLDS:
            if enabled.get(name):
                result.features[name] = False
                result.unavailable[name] = "no fused MoE block to apply it to"
        return []
    ids = calibration_ids(model, calibration)
    if ids is None:  # `auto` asks for the gate: without text to measure on, it applies nothing
        for name in sorted(auto_features or ()):
            if enabled.get(name):
                enabled[name] = result.features[name] = False
                result.unavailable[name] = (f"auto applies {name} only behind the quality gate, which needs "
                                            f"calibration_text=... (or force it: {name}=True applies it ungated)")
    ran: list[tuple[str, ModulePassResult]] = []
    try:
        opted = {step for step, on in (("fp8_attention", fp8_attention), ("sparsity_24_linears", sparse_linears))
                 if on}
        _run_gated(model, enabled, result, ids, {**DEFAULT_THRESHOLDS, **(thresholds or {})}, fp8_calibration, ran,
                   sparsity_method, opted)
    except BaseException:
        for _, outcome in reversed(ran):
            outcome.undo()  # a no-op for a step the gate already rolled back
        raise
    return [outcome for name, outcome in ran if result.quality[name]["applied"]]


def _run_gated(model: nn.Module, enabled: dict[str, bool], result: Any, ids: Optional[torch.Tensor],
               limits: dict[str, float], fp8_calibration: str, ran: list[tuple[str, ModulePassResult]],
               sparsity_method: str = "auto", opted: frozenset[str] = frozenset()) -> None:
    """The gate's loop; appends every pass it runs to `ran` at once (for the caller's undo on an error)."""
    from moe_compile.quality.eval import perplexity

    records: dict[str, dict] = {}
    wanted = [(name, run) for name, run in _passes(ids, fp8_calibration, records, sparsity_method)
              if enabled.get(STEP_FEATURE.get(name, name)) and (name not in STEP_FEATURE or name in opted)]
    base = None if ids is None else perplexity(model, text=ids)
    before: dict[str, Optional[float]] = {}  # feature -> perplexity before its first step
    for name, run in wanted:
        feature = STEP_FEATURE.get(name)
        if feature is not None:
            if not result.quality.get(feature, {}).get("applied"):
                result.quality[name] = {"applied": False, "gated": False,
                                        "reason": f"the experts' {feature} was not applied, so this step is not run"}
                continue
            base = before[feature]  # a feature's steps stay within one budget together
            limits = {**limits, name: limits.get(name, limits[feature])}
        else:
            before[name] = base
        outcome = run(model)
        ran.append((name, outcome))
        pass_name = outcome.name
        record: dict[str, Any] = {"linears" if name in STEP_FEATURE else "blocks": outcome.count,
                                  "threshold": limits[name]}
        if outcome.skipped:
            record["skipped"] = dict(outcome.skipped)
        if name in records:
            record["calibration"] = records[name]
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
                reason = (f"quality gate: perplexity +{increase:.2%} on calibration text ({base:.3f} -> {ppl:.3f}) "
                          f"exceeds the {limits[name]:.2%} threshold")
                if name in STEP_FEATURE:  # a step of a feature that stays applied: its record says why
                    record["reason"] = reason
                else:
                    result.features[name] = False
                    result.unavailable[name] = reason
                log.info("moe_compile: %s rolled back: %s", name, reason)
            else:
                base = ppl
        result.quality[name] = record
        if record["applied"]:
            result.passes.append(pass_name)
            result.pass_counts[pass_name] = outcome.count
