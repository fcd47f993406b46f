"""FP8 weight scales calibrated by NVIDIA ModelOpt (`mtq.quantize`), without touching the user's model.

Why a side module: ModelOpt calibrates transformers-5 fused 3-D experts only on their eager path, by intercepting
`F.linear` on the views `gate_up_proj[e]` / `down_proj[e]` (`_QuantFusedExperts`: one weight quantizer per expert,
one shared input quantizer per projection). Our fused op replaces that path, and `optimize` must stay all or
nothing, so ModelOpt never sees the user's model. Instead, per fused block:

  1. one forward over the calibration tokens records each block's input hidden states x [T, H] (hooks);
  2. the block's own router routes them (the spec's routing, plain torch); every expert that got fewer than
     `MIN_EXPERT_TOKENS` tokens is fed the tokens its router score ranks highest (calibration only);
  3. `EagerExperts` — a throwaway module in the transformers-5 fused-experts layout holding fp32 *copies* of the
     block's expert weights — goes through `mtq.quantize(copy, cfg, forward_loop)`, which auto-detects it as fused
     experts; the loop feeds the recorded, routed tokens;
  4. the per-expert, per-output-channel weight amax is read from `<proj>_weight_quantizers[e]`, turned into the
     scales `PackedExperts` stores (w13_scale [E, 2I], w2_scale [E, H] = amax / 448), and the copy is dropped.

Only then does `passes/quantize_fp8.py` apply the scales; an error anywhere before leaves the model as it was.
This works for every block `optimize` fuses (all families, transformers 4 and 5 layouts, user modules): it reads
the fused block's canonical weights, not the family's original experts module.

What ModelOpt adds beyond our own max calibration (amax over each output channel / 448):
  * `algorithm="max"`: the same per-channel weight amax (checked in the tests), plus a static per-tensor input amax
    per projection over all experts (`input_amax`, recorded). Our kernels quantize activations per token at run
    time, which is at least as accurate, so the static input amax is recorded, not used.
  * `algorithm="mse"`: a per-channel search of the weight amax (0.25x ... 4x the max, step 0.1) minimising the
    weight's FP8 round-trip error; the kernels consume these scales unchanged. On the shipped quality model it did
    not lower perplexity (docs/quality.md), so `max` is the default and `mse` an option.
Expert coverage: ModelOpt 0.47's `max_calibrate` calibrates every expert's weight quantizer directly on the weight
(`weight_only_quantize`), routed or not; its `moe_calib_experts_ratio` acts only on sequential-expert MoE blocks
(`_QuantSparseSequentialMoe`), not on fused 3-D experts. The tokens matter for the input amax, so step 2 routes
calibration tokens to every expert; the record says how many experts the natural routing covered.

Dimension legend: T = tokens, E = experts, H = hidden, I = expert intermediate size, N = output channels.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_compile.errors import MissingDependencyError
from moe_compile.kernels import reference
from moe_compile.fused_block import fused_blocks
from moe_compile.quant.calibration_data import (MIN_EXPERT_TOKENS, record_block_inputs,  # noqa: F401
                                                 route_for_calibration)
from moe_compile.quant.fp8 import E4M3_MAX, MIN_SCALE
from moe_compile.spec import MoESpec

log = logging.getLogger("moe_compile")

INSTALL_HINT = "pip install 'moe-compile[modelopt]'"
ALGORITHMS = ("max", "mse")
DEFAULT_ALGORITHM = "max"
_VERSION_WARNING = r"transformers \S+ is not tested with current version of modelopt"


def import_modelopt(module: str, purpose: str) -> Any:
    """`modelopt.torch.<module>`, or `MissingDependencyError` saying what needs it (`purpose`) and naming the extra.
    ModelOpt warns at import when the installed transformers is outside the range it tests (4.57-5.15); that
    warning is silenced here (our use does not go through its transformers plugins: `EagerExperts` is our own
    module, the sparsity pass takes plain `nn.Linear`s), and so are the `torch.jit.script` deprecation warnings its
    import triggers, during this import only."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_VERSION_WARNING, category=UserWarning)
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script", category=DeprecationWarning)
            return importlib.import_module(f"modelopt.torch.{module}")
    except ImportError as exc:
        raise MissingDependencyError(f"{purpose} needs nvidia-modelopt: {INSTALL_HINT} ({exc})") from exc


def import_mtq() -> Any:
    """`modelopt.torch.quantization` (see `import_modelopt`)."""
    return import_modelopt("quantization", "FP8 calibration with ModelOpt")


def modelopt_version() -> Optional[str]:
    try:
        import modelopt
    except ImportError:
        return None
    return getattr(modelopt, "__version__", None)


class EagerExperts(nn.Module):
    """One fused block's experts in the transformers-5 fused layout ModelOpt detects (`num_experts`, 3-D
    `gate_up_proj` [E, 2I, H] — `up_proj` [E, I, H] when not gated — and `down_proj` [E, H, I]), fp32 copies.

    `forward(x, groups)` runs each expert on its rows with exactly two `F.linear` calls on the views
    `gate_up_proj[e]` and `down_proj[e]`, in that order: the eager path ModelOpt intercepts. It returns nothing;
    only the quantizers' statistics are wanted."""

    def __init__(self, spec: MoESpec, w13: Tensor, w2: Tensor, b13: Optional[Tensor], b2: Optional[Tensor]):
        super().__init__()
        self.spec = spec
        self.num_experts = spec.num_experts
        self.first_proj = "gate_up_proj" if spec.gated else "up_proj"
        setattr(self, self.first_proj, nn.Parameter(_copy(w13), requires_grad=False))  # [E, 2I or I, H]
        self.down_proj = nn.Parameter(_copy(w2), requires_grad=False)  # [E, H, I]
        self.b13 = None if b13 is None else _copy(b13)  # [E, 2I]
        self.b2 = None if b2 is None else _copy(b2)  # [E, H]

    def forward(self, x: Tensor, groups: list[tuple[int, Tensor, Tensor]]) -> None:
        """x [T, H]; groups: (expert, token rows [n], routing weights [n]) per expert."""
        s = self.spec
        first = getattr(self, self.first_proj)
        for expert, rows, weights in groups:
            xin = x[rows]  # [n, H]
            if s.weight_on_input:
                xin = xin * weights.unsqueeze(1).to(xin.dtype)
            h = F.linear(xin, first[expert], None if self.b13 is None else self.b13[expert])  # [n, 2I]
            a = reference.apply_activation(h, s.intermediate_size, s.gated, s.activation, s.alpha, s.limit)  # [n, I]
            F.linear(a, self.down_proj[expert], None if self.b2 is None else self.b2[expert])  # [n, H]


def _copy(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32, copy=True)


@dataclass
class BlockCalibration:
    """What ModelOpt calibrated for one fused block."""

    w13_scale: Tensor  # [E, 2I] fp32
    w2_scale: Tensor  # [E, H] fp32
    input_amax: dict[str, Optional[float]]  # static per-tensor input amax per projection (recorded, not used)
    tokens: int  # calibration tokens recorded for this block (0: weights-only calibration)
    expert_tokens: list[int]  # tokens the router sent to each expert
    forced_experts: list[int]  # experts that were fed extra (highest-scoring) tokens for calibration


@dataclass
class Calibration:
    """All blocks' scales (`scales[name] = (w13_scale, w2_scale)`, what `quantize_fp8` takes) and a summary."""

    algorithm: str
    blocks: dict[str, BlockCalibration] = field(default_factory=dict)

    @property
    def scales(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {name: (b.w13_scale, b.w2_scale) for name, b in self.blocks.items()}

    def record(self) -> dict[str, Any]:
        """JSON-ready summary for `model.moe_compile.quality["fp8"]["calibration"]`."""
        experts = sum(len(b.expert_tokens) for b in self.blocks.values())
        routed = [n for b in self.blocks.values() for n in b.expert_tokens]
        return {
            "method": "modelopt",
            "modelopt": modelopt_version(),
            "algorithm": self.algorithm,
            "blocks": len(self.blocks),
            "experts_calibrated": f"{experts}/{experts}",
            "experts_routed": f"{sum(n > 0 for n in routed)}/{experts}",
            "min_routed_tokens": min(routed) if routed else 0,
            "forced_experts": sum(len(b.forced_experts) for b in self.blocks.values()),
            "tokens_per_block": max((b.tokens for b in self.blocks.values()), default=0),
            "input_amax": {name: b.input_amax for name, b in self.blocks.items()},  # static, per projection
        }


def dense_expert_weights(block: nn.Module) -> tuple[Tensor, Tensor]:
    """(w13 [E, 2I, H], w2 [E, H, I]) as the block computes them: its dense parameters, or its 2:4 packed weights
    decompressed (zeros at the pruned positions do not change a channel's amax)."""
    if block.packed is None:
        return block.w13, block.w2
    return block.packed.dense(torch.float32)


def fp8_config(mtq: Any, algorithm: str) -> dict[str, Any]:
    """ModelOpt's `FP8_PER_CHANNEL_PER_TOKEN_CFG` (e4m3 weights per output channel: the format our kernels use)
    with static per-tensor input quantizers instead of dynamic ones, so calibration also yields the input amax,
    and the given weight algorithm."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown FP8 calibration algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    cfg = copy.deepcopy(mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG)
    entries = cfg["quant_cfg"]
    if not isinstance(entries, list):
        raise RuntimeError(f"ModelOpt {modelopt_version()} has a dict quant_cfg; moe_compile needs "
                           f"nvidia-modelopt>=0.46,<0.48 ({INSTALL_HINT})")
    for entry in entries:
        if entry.get("quantizer_name") == "*input_quantizer":
            entry["cfg"] = {"num_bits": (4, 3), "axis": None}
    cfg["algorithm"] = algorithm
    return cfg


def _channel_amax(quantizers: nn.ModuleList, channels: int, label: str) -> Tensor:
    """[E, N] fp32 from one weight quantizer per expert (per-channel amax [N, 1], or a per-tensor scalar)."""
    rows = []
    for expert, quantizer in enumerate(quantizers):
        amax = quantizer.amax
        if amax is None:
            raise RuntimeError(f"ModelOpt left expert {expert}'s {label} weight quantizer uncalibrated")
        amax = amax.detach().float().reshape(-1)
        rows.append(amax.expand(channels) if amax.numel() == 1 else amax)
    return torch.stack(rows)


def _quiet(call, *args):
    """Run a ModelOpt call with its prints (module detection, quantizer counts, progress bars) logged at debug."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = call(*args)
    text = (out.getvalue() + err.getvalue()).strip()
    if text:
        log.debug("moe_compile: modelopt: %s", text)
    return result


def calibrate_block(mtq: Any, block: nn.Module, x: Optional[Tensor], algorithm: str) -> BlockCalibration:
    """ModelOpt on a throwaway `EagerExperts` copy of `block`'s experts; x [T, H] are its recorded inputs (None:
    weights only)."""
    s = block.spec
    w13, w2 = dense_expert_weights(block)
    experts = EagerExperts(s, w13, w2, block.b13, block.b2)
    if x is None:
        groups, counts, forced, loop = [], [0] * s.num_experts, [], None
    else:
        x32 = x.float()
        groups, counts, forced = route_for_calibration(block, x32)

        def loop(model: nn.Module) -> None:
            model(x32, groups)

    _quiet(mtq.quantize, experts, fp8_config(mtq, algorithm), loop)
    first = experts.first_proj
    amax13 = _channel_amax(getattr(experts, f"{first}_weight_quantizers"), w13.shape[1], first)  # [E, 2I]
    amax2 = _channel_amax(experts.down_proj_weight_quantizers, w2.shape[1], "down_proj")  # [E, H]
    inputs = {"w13": getattr(experts, f"{first}_input_quantizer").amax, "w2": experts.down_proj_input_quantizer.amax}
    device = w13.device
    return BlockCalibration(
        w13_scale=(amax13 / E4M3_MAX).clamp(min=MIN_SCALE).to(device),
        w2_scale=(amax2 / E4M3_MAX).clamp(min=MIN_SCALE).to(device),
        input_amax={k: None if v is None else float(v.float().max()) for k, v in inputs.items()},
        tokens=0 if x is None else x.shape[0], expert_tokens=counts, forced_experts=forced)


def calibrate_fp8(model: nn.Module, ids: Optional[Tensor], algorithm: str = DEFAULT_ALGORITHM) -> Calibration:
    """Per-expert FP8 weight scales for every fused block of `model` not yet FP8, calibrated by ModelOpt.

    `ids`: calibration token ids [N] (None: ModelOpt's weight-only calibration, no input amax). The model is
    only read (one forward over `ids`); raises `MissingDependencyError` without nvidia-modelopt."""
    mtq = import_mtq()
    blocks = {name: b for name, b in fused_blocks(model).items() if b.packed is None or not b.packed.fp8}
    inputs = record_block_inputs(model, ids, blocks) if ids is not None and blocks else {}
    result = Calibration(algorithm)
    for name, block in blocks.items():
        result.blocks[name] = calibrate_block(mtq, block, inputs.get(name), algorithm)
    return result
