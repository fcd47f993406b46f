"""rewrite + verify for one block: prove it, build its fused replacement, check it on probes, swap it in.

All or nothing per block: the original module is put back on any failure, and `BlockSwap.undo` restores it later
(optimize undoes every swap when something unexpected fails).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from moe_compile.detect import Candidate
from moe_compile.fused_block import FusedMoEBlock, block_output_tensor
from moe_compile.prove import Proof, proof_key, prove
from moe_compile.spec import MoESpec

# Relative L2 error of the fused block against the original block, in the model's own dtype and device. bf16 and
# fp16 differ from the original by the rounding of per-expert outputs (we accumulate in fp32, the originals do not).
VERIFY_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class BlockSwap:
    parent: nn.Module
    attr: str
    original: nn.Module
    replacement: nn.Module

    def apply(self) -> None:
        setattr(self.parent, self.attr, self.replacement)

    def undo(self) -> None:
        setattr(self.parent, self.attr, self.original)


@dataclass
class FuseOutcome:
    swap: Optional[BlockSwap] = None
    spec: Optional[MoESpec] = None
    error: float = 0.0
    reason: str = ""


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def verification_inputs(candidate: Candidate, dtype: torch.dtype, device: torch.device, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    tokens = int(min(256, max(16, 4 * candidate.num_experts // max(1, candidate.hints.top_k or 1))))
    return [torch.randn(2, tokens, candidate.hidden_size, generator=generator).to(device=device, dtype=dtype)
            for _ in range(2)]


def verify_block(original: nn.Module, fused: nn.Module, candidate: Candidate) -> float:
    """Largest relative L2 error of `fused` against `original` on fresh probe inputs."""
    dtype, device = fused.w13.dtype, fused.w13.device
    errors = []
    with torch.no_grad():
        for x in verification_inputs(candidate, dtype, device):
            expected = block_output_tensor(original(x)).float()
            actual = block_output_tensor(fused(x)).float()
            if actual.shape != expected.shape or not torch.isfinite(actual).all():
                return float("inf")
            errors.append(((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item())
    return max(errors)


def fuse_block(model: nn.Module, candidate: Candidate, backend: str = "auto", verify: bool = True,
               proofs: Optional[dict] = None) -> FuseOutcome:
    """Prove (or reuse the proof of an identical block from `proofs`), build, verify and swap one block.

    A reused proof that fails this block's verification is not trusted further: the block is proven on its own.
    """
    if not candidate.supported:
        return FuseOutcome(reason=candidate.reason or "not supported")
    key = proof_key(candidate) if proofs is not None else None
    cached = proofs.get(key) if proofs is not None else None
    if cached is not None:
        outcome = _build_and_swap(model, candidate, cached, backend, verify)
        if outcome.swap is not None or not cached.proven:
            return outcome
    proof = prove(candidate)
    if proofs is not None and cached is None:
        proofs[key] = proof
    return _build_and_swap(model, candidate, proof, backend, verify)


def _build_and_swap(model: nn.Module, candidate: Candidate, proof: Proof, backend: str, verify: bool) -> FuseOutcome:
    if not proof.proven:
        return FuseOutcome(reason=proof.reason or "not proven")
    parent, attr = _parent_and_attr(model, candidate.name)
    original = candidate.module
    was_training = original.training
    fused = FusedMoEBlock.from_block(candidate, original, proof.spec, proof.layout, backend)
    error = 0.0
    if verify:
        original.eval()
        try:
            error = verify_block(original, fused, candidate)
        finally:
            original.train(was_training)
        tolerance = VERIFY_RTOL.get(fused.w13.dtype, 2e-2)
        if not error <= tolerance:
            return FuseOutcome(reason=f"fused block misses its tolerance on probes (relative error {error:.2e} > "
                                      f"{tolerance:.0e}); left as it was")
    fused.train(was_training)
    swap = BlockSwap(parent, attr, original, fused)
    swap.apply()
    return FuseOutcome(swap, proof.spec, error)
