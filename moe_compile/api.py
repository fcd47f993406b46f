"""The public verbs: `inspect(model)` and `optimize(model, profile, **overrides)`.

optimize = detect -> prove -> rewrite + verify (per block, all or nothing) -> emit. A block that cannot be proven,
or whose fused version misses its tolerance on probe inputs, stays as it was and is reported with the reason.
Any unexpected error puts every block back before it propagates, so a failed `optimize` leaves the model as it was.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch
from torch import nn

from moe_compile.detect import Candidate, find_candidates
from moe_compile.emit import apply_emit
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.profiles import load_profile, resolve_features
from moe_compile.progress import progress
from moe_compile.prove import Proof, prove
from moe_compile.report import BlockInfo, InspectReport, OptimizeResult
from moe_compile.rewrite import BlockSwap, fuse_block

log = logging.getLogger("moe_compile")


def model_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _block_info(candidate: Candidate, proof: Optional[Proof]) -> BlockInfo:
    spec = proof.spec if proof else None
    shared = "gated" if candidate.shared_gate_path else ("plain" if candidate.shared_expert_path else "none")
    reason = candidate.reason or (proof.reason if proof and not proof.proven else None)
    return BlockInfo(
        name=candidate.name, class_name=candidate.class_name, num_experts=candidate.num_experts,
        top_k=spec.top_k if spec else candidate.hints.top_k, hidden_size=candidate.hidden_size,
        intermediate_size=candidate.intermediate_size,
        scoring=spec.scoring if spec else candidate.hints.scoring, shared_expert=shared,
        supported=reason is None, reason=reason, spec=spec, proof_error=proof.error if proof and spec else None,
    )


def inspect(model: nn.Module, prove_blocks: bool = True) -> InspectReport:
    """Find every MoE block; with `prove_blocks` also identify what each computes (on copies: the model is
    untouched)."""
    candidates = find_candidates(model, model_config(model))
    report = InspectReport(type(model).__name__)
    for candidate in progress(candidates, "proving MoE blocks", enabled=prove_blocks):
        proof = prove(candidate) if prove_blocks and candidate.supported else None
        report.blocks.append(_block_info(candidate, proof))
    return report


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def optimize(model: nn.Module, profile: Union[str, Any] = "balanced", **overrides: Any) -> nn.Module:
    """Rewrite `model` in place and return it; `model.moe_compile` says what was applied.

    Besides the profile's features, `expert_parallel=N` (or a `moe_compile.parallel.ExpertParallelConfig`) shards
    the fused blocks' experts over N ranks of a torchrun job; `verify=False` skips the probe-input checks.
    `fp8` / `sparsity_24` pass a quality gate: `calibration_text=` (str or bytes for byte-level models, else token
    ids; the built-in quality model defaults to its held-out text) and `quality_thresholds=` (largest relative
    perplexity increase, default {"fp8": 0.01, "sparsity_24": 0.05}); the numbers land in `.quality`.
    `fp8_calibration=` "auto" (default: NVIDIA ModelOpt when installed, else the built-in max), "modelopt",
    "modelopt-mse" or "max" picks how FP8 weight scales are calibrated (see `moe_compile.quant.gate`);
    `sparsity_method=` "auto" (default: SparseGPT from calibration activations where there is calibration text,
    else magnitude), "sparsegpt" or "magnitude" picks how 2:4 chooses and adjusts the kept weights.
    `fp8_attention=True` also quantizes the attention linears (`FP8Linear`, torch._scaled_mm), a gated step of its
    own within the fp8 threshold (`.quality["fp8_attention"]`). Off by default: on an H100 it made batch-1 decode of
    the 48-layer Qwen3-30B-A3B shape slower (9.41 ms a step against 7.35 with the experts alone in FP8) for 0.9 GB.
    `sparse_linears=True` also prunes the dense linears to 2:4 through NVIDIA ModelOpt (`mts.sparsify`; the LM head
    stays dense), a gated step within the sparsity_24 threshold (`.quality["sparsity_24_linears"]`); stored dense
    with zeros, so it is for sparse deployments (TensorRT), not faster here."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects a torch.nn.Module, got {type(model).__name__}")
    verify = overrides.pop("verify", True)
    expert_parallel = overrides.pop("expert_parallel", None)  # ranks (int) or ExpertParallelConfig: not a profile flag
    calibration = overrides.pop("calibration_text", None)  # quality gate for fp8 / sparsity_24 (str, bytes or ids)
    thresholds = overrides.pop("quality_thresholds", None)  # e.g. {"fp8": 0.01, "sparsity_24": 0.05}
    fp8_calibration = overrides.pop("fp8_calibration", "auto")  # FP8 weight scales: auto | modelopt | ... | max
    sparsity_method = overrides.pop("sparsity_method", "auto")  # 2:4: auto | sparsegpt | magnitude
    fp8_attention = overrides.pop("fp8_attention", False)  # fp8 also quantizes the attention linears (gated step)
    sparse_linears = overrides.pop("sparse_linears", False)  # 2:4 also prunes the dense linears (ModelOpt, gated step)
    chosen = load_profile(profile).with_overrides(overrides)
    device = _model_device(model)
    plan = resolve_features(chosen, device)
    result = OptimizeResult(profile=chosen.name, device=str(device), backend=chosen.backend,
                            features=dict(plan.enabled), unavailable=dict(plan.unavailable))
    swaps: list[BlockSwap] = []
    try:
        if plan.enabled["fuse_moe"]:
            _fuse_all(model, chosen.backend, verify, result, swaps)  # fills `swaps` as it goes, for the undo below
        if plan.enabled.get("fp8") or plan.enabled.get("sparsity_24"):
            from moe_compile.quant.gate import apply_quality_gated

            result.notes.update(plan.notes)
            auto = {name for name in ("fp8", "sparsity_24") if chosen.features.get(name) == "auto"}
            swaps += apply_quality_gated(model, plan.enabled, result, calibration, thresholds,
                                         fp8_calibration, auto, sparsity_method, fp8_attention,
                                         sparse_linears)  # each has .undo()
        if expert_parallel is not None:
            from moe_compile.parallel import apply_expert_parallel

            apply_expert_parallel(model, expert_parallel, device, plan.enabled, result, swaps, verify)
        apply_emit(model, plan.enabled, result)  # undoes its own partial work if it fails
    except BaseException:
        for swap in reversed(swaps):
            swap.undo()
        raise
    model.moe_compile = result
    return model


def _fuse_all(model: nn.Module, backend: str, verify: bool, result: OptimizeResult, swaps: list[BlockSwap]) -> None:
    """Fuse every candidate; each applied swap is appended to `swaps` at once, so a failure on a later block can
    still undo the earlier ones."""
    result.passes.append("detect")
    _record_already_fused(model, result)
    candidates = find_candidates(model, model_config(model))
    result.passes += ["prove", "rewrite"] + (["verify"] if verify else [])
    proofs: dict = {}  # one proof per distinct block structure; every block is still verified on its own weights
    for candidate in progress(candidates, "fusing MoE blocks"):
        outcome = fuse_block(model, candidate, backend, verify, proofs)
        if outcome.swap is None:
            result.skipped[candidate.name] = outcome.reason
            continue
        swaps.append(outcome.swap)
        result.fused.append(candidate.name)
        result.specs[candidate.name] = outcome.spec
        result.block_errors[candidate.name] = outcome.error
    result.pass_counts["rewrite"] = len(swaps)


def _record_already_fused(model: nn.Module, result: OptimizeResult) -> None:
    """A second `optimize` finds no candidates where blocks are fused already: report those as fused, not lose them."""
    previous = getattr(model, "moe_compile", None)
    for name, module in model.named_modules():
        if isinstance(module, FusedMoEBlock):
            result.fused.append(name)
            result.specs[name] = module.spec
            if isinstance(previous, OptimizeResult) and name in previous.block_errors:
                result.block_errors[name] = previous.block_errors[name]
