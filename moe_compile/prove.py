"""prove: find, numerically, the spec that a candidate block computes.

The block is copied, every weight of the copy is redrawn at random (decisive router logits, non-zero biases), so the
proof covers the block as a function and not only its current weights; then candidate specs from a small family
(scoring, renorm, grouped top-k, scaling, weight on input, activation, layout, shared expert) are tried in order of
the structural hints, and the first one that reproduces the copy on every probe input in fp64 is accepted (in fp32
for blocks that cannot run in fp64). Classes in KNOWN_UNSUPPORTED are not searched: they are skipped with the reason.

Dimension legend: T = tokens, E = experts, K = top_k, H = hidden.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from moe_compile.detect.candidate import Candidate, ExpertLayout, get_path
from moe_compile.fused_block import FusedMoEBlock, block_output_tensor
from moe_compile.spec import ACTIVATIONS, MoESpec

PROOF_RTOL = {torch.float64: 1e-5, torch.float32: 1e-4}  # relative L2 error that counts as the same function
PROBE_SCALES = (0.5, 1.0, 4.0)  # 4.0 reaches GPT-OSS's clamp (limit 7) and makes softmax routing peaked
FP64_BUDGET_BYTES = 2 << 30  # copies larger than this are proven in fp32 on the block's own device
KNOWN_UNSUPPORTED = {  # class name -> why no spec of the family can match (a better message than "no match")
    "PhimoeSparseMoeBlock": "PhiMoE's sparsemixer routing (two masked softmaxes with a jitter threshold) is not in "
                            "the fused op's routing family; the block runs unfused",
}


@dataclass
class Proof:
    spec: Optional[MoESpec] = None
    layout: Optional[ExpertLayout] = None
    error: float = math.inf  # relative L2 error of the accepted spec on the probes
    tried: int = 0
    reason: Optional[str] = None

    @property
    def proven(self) -> bool:
        return self.spec is not None


def prove(candidate: Candidate, seed: int = 0) -> Proof:
    if candidate.reason:
        return Proof(reason=candidate.reason)
    if candidate.class_name in KNOWN_UNSUPPORTED:  # fast path: a search that cannot succeed is not run
        return Proof(reason=KNOWN_UNSUPPORTED[candidate.class_name])
    if any(p.is_meta for p in candidate.module.parameters()):
        return Proof(reason="weights are on the meta device: nothing to prove on (load real weights first)")
    probe_block, inputs, expected = _probe(candidate, seed)
    dtype = next(probe_block.parameters()).dtype
    returns_tuple = isinstance(expected[0], tuple)
    flat = block_output_tensor(expected[0]).dim() == 2 and inputs[0].dim() == 3
    proof = _search(candidate, probe_block, inputs, expected, returns_tuple, flat, PROOF_RTOL[dtype])
    if not proof.proven:
        known = KNOWN_UNSUPPORTED.get(candidate.class_name)
        proof.reason = known or (f"no spec in the supported routing/activation family reproduces this block "
                                 f"({proof.tried} candidates tried); it runs unfused")
    return proof


def _probe(candidate: Candidate, seed: int):
    """(randomized copy, probe inputs, its outputs): in fp64 where it fits and runs, else in fp32.

    Some blocks hard-code fp32 intermediates (transformers 4.5x DeepSeek-V3 / GLM4 accumulate into a buffer of the
    fp32 routing weights' dtype) and cannot run in fp64; those are proven in fp32, with the fp32 tolerance.
    """
    nbytes = sum(p.numel() for p in candidate.module.parameters()) * 8
    dtypes = [torch.float64, torch.float32] if nbytes <= FP64_BUDGET_BYTES else [torch.float32]
    for dtype in dtypes:
        generator = torch.Generator().manual_seed(seed)
        probe_block = _randomized_copy(candidate, generator, dtype)
        inputs = _probe_inputs(candidate, probe_block, generator)
        try:
            with torch.no_grad():
                return probe_block, inputs, [probe_block(x) for x in inputs]
        except RuntimeError:
            if dtype == dtypes[-1]:
                raise
    raise AssertionError("unreachable")


def _randomized_copy(candidate: Candidate, generator: torch.Generator, dtype: torch.dtype) -> nn.Module:
    block = candidate.module
    device = torch.device("cpu") if dtype == torch.float64 else next(block.parameters()).device
    probe = copy.deepcopy(block).to(device=device, dtype=dtype).eval()
    _use_eager_experts(probe)
    # Draw on the copy's own device: a CPU generator would make a GPU block's billions of values on the host.
    if device.type != "cpu":
        generator = torch.Generator(device=device).manual_seed(generator.initial_seed())
    with torch.no_grad():
        for tensor in itertools.chain(probe.parameters(), probe.buffers()):
            if tensor.is_floating_point():
                std = 0.1 if tensor.dim() == 1 else 1.0 / math.sqrt(tensor.shape[-1])
                tensor.normal_(0.0, std, generator=generator)
        router = get_path(probe, candidate.router.path)
        weight = getattr(router, candidate.router.weight_name)
        weight.normal_(0.0, 2.0 / math.sqrt(weight.shape[1]), generator=generator)
    return probe


def proof_key(candidate: Candidate) -> tuple:
    """Blocks with equal keys compute the same function family: same class, parameter and buffer names, shapes and
    dtypes, hints, router and shared-expert paths. One proof serves them all; each block is still verified on its
    own weights (rewrite.verify_block), so a shared proof can never ship a wrong block."""
    module = candidate.module
    tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in itertools.chain(module.named_parameters(),
                                                                              module.named_buffers()))
    layouts = tuple(layout.description for layout in candidate.layouts)
    return (candidate.class_name, tensors, dataclasses.astuple(candidate.hints), dataclasses.astuple(candidate.router),
            candidate.shared_expert_path, candidate.shared_gate_path, layouts)


def _use_eager_experts(block: nn.Module) -> None:
    """transformers 5 experts dispatch on `config._experts_implementation`; its grouped_mm has no fp64, and the
    eager loop is the semantic ground truth. The copy has its own config object, so the model is not touched."""
    for module in block.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = "eager"


def _probe_inputs(candidate: Candidate, block: nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """[2, T/2, H] inputs with enough tokens that every expert is hit: T >= 4 E / K."""
    top_k = candidate.hints.top_k or 1
    tokens = int(min(512, max(16, 4 * candidate.num_experts // top_k)))
    tokens += tokens % 2
    param = next(block.parameters())
    return [torch.randn(2, tokens // 2, candidate.hidden_size, generator=generator, dtype=param.dtype).to(param.device)
            * scale for scale in PROBE_SCALES]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.shape != expected.shape:
        return math.inf
    denom = expected.norm().item() or 1.0
    return (actual - expected).norm().item() / denom


def _search(candidate, probe_block, inputs, expected, returns_tuple, flat, rtol) -> Proof:
    proof = Proof()
    for spec, layout in _candidate_specs(candidate, returns_tuple, flat):
        proof.tried += 1
        try:
            fused = FusedMoEBlock.from_block(candidate, probe_block, spec, layout, backend="reference")
            with torch.no_grad():
                first = _relative_error(block_output_tensor(fused(inputs[0])), block_output_tensor(expected[0]))
                if first > rtol:
                    continue
                errors = [_relative_error(block_output_tensor(fused(x)), block_output_tensor(e))
                          for x, e in zip(inputs, expected)]
        except (RuntimeError, ValueError, IndexError):  # shapes of this reading do not fit the block: next one
            continue
        if max(errors) <= rtol:
            aux = _match_aux(fused, inputs, expected, rtol) if returns_tuple else "none"
            if aux is None:
                proof.reason = "the block returns an auxiliary output that the fused block cannot reproduce"
                return proof
            has_bias = fused.b13 is not None or fused.b2 is not None
            return Proof(spec.replace(aux_output=aux, expert_bias=has_bias), layout, max(errors), proof.tried)
    return proof


def _match_aux(fused: FusedMoEBlock, inputs, expected, rtol) -> Optional[str]:
    for kind in ("router_logits", "topk_weights", "dense_scores", "router_probs", "none"):
        fused.spec = fused.spec.replace(aux_output=kind)
        with torch.no_grad():
            ok = all(_aux_equal(fused(x)[1], e[1], rtol) for x, e in zip(inputs, expected))
        if ok:
            return kind
    return None


def _aux_equal(actual, expected, rtol) -> bool:
    if actual is None or expected is None:
        return actual is None and expected is None
    if not isinstance(expected, torch.Tensor):
        return False
    return _relative_error(actual.reshape(expected.shape) if actual.numel() == expected.numel() else actual,
                           expected) <= rtol


def _ordered(hint, options):
    return [hint] + [o for o in options if o != hint] if hint in options else list(options)


def _candidate_specs(candidate: Candidate, returns_tuple: bool, flat: bool) -> Iterator[tuple[MoESpec, ExpertLayout]]:
    h = candidate.hints
    e = candidate.num_experts
    top_ks = [h.top_k] if h.top_k and h.top_k <= e else list(range(1, min(e, 16) + 1))
    sigmoid_first = candidate.router.correction_bias_path is not None or h.n_group > 1
    scorings = _ordered(h.scoring or ("sigmoid" if sigmoid_first else "softmax"), ("softmax", "sigmoid"))
    renorms = _ordered(bool(h.renormalize), (False, True))
    groups = _ordered((h.n_group, h.topk_group), [(h.n_group, h.topk_group), (1, 1)])
    scalings = _ordered(h.routed_scaling, [h.routed_scaling, 1.0])
    corrections = [True, False] if candidate.router.correction_bias_path else [False]
    activations = _ordered("swiglu_oai" if h.custom_gate else (h.activation or "silu"), ACTIVATIONS)
    shared = "gated" if candidate.shared_gate_path else ("plain" if candidate.shared_expert_path else "none")
    # activation outermost: the hinted one is tried on every layout reading before the next activation
    for act, layout in itertools.product(activations, candidate.layouts):
        for top_k, scoring, renorm, woi, group, scaling, corr in itertools.product(
                top_ks, scorings, renorms, (False, True), groups, scalings, corrections):
            if not layout.gated and act == "swiglu_oai":
                continue
            yield MoESpec(
                num_experts=e, top_k=top_k, hidden_size=candidate.hidden_size,
                intermediate_size=candidate.intermediate_size, scoring=scoring, renormalize=renorm,
                n_group=group[0], topk_group=group[1], routed_scaling=scaling,
                router_bias=candidate.router.bias_name is not None, correction_bias=corr, weight_on_input=woi,
                activation=act, gated=layout.gated, alpha=h.alpha, limit=h.limit,
                expert_bias=False, shared_expert=shared, returns_tuple=returns_tuple, flat_output=flat,
            ), layout
