"""SparseGPT-style 2:4 pruning (quant/sparsegpt.py): a valid 2:4 pattern that reconstructs the layer's outputs on
its calibration inputs better than magnitude pruning does, and the gate's `sparsity_method` option."""

from __future__ import annotations

import pytest
import torch

import moe_compile as mc
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.models import build_tiny_model
from moe_compile.quant.sparse24 import is_24_sparse, prune_24
from moe_compile.quant.sparsegpt import prune_24_sparsegpt, sparsegpt_expert_weights


def _inputs(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs (one fixed random mixing of fewer latent dims, fresh latent samples per seed), as real
    activations are: where SparseGPT's compensation helps most."""
    mixing = torch.randn(k // 2, k, generator=torch.Generator().manual_seed(1000 + k))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k // 2, generator=gen) @ mixing + 0.1 * torch.randn(rows, k, generator=gen)


def _output_error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (pruned - w).T).norm() / (x @ w.T).norm())


def test_sparsegpt_is_2_4_and_beats_magnitude_on_its_inputs():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=gen)  # [N, K]
    x = _inputs(512, 256)
    pruned = prune_24_sparsegpt(w, x)
    assert pruned.shape == w.shape and is_24_sparse(pruned)
    held_out = _inputs(512, 256, seed=2)  # same distribution, other rows: not just fitting the calibration rows
    assert _output_error(w, pruned, held_out) < 0.8 * _output_error(w, prune_24(w), held_out)  # 0.64x measured


def test_without_inputs_it_is_magnitude_pruning_and_dead_inputs_are_zeroed():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(prune_24_sparsegpt(w, torch.zeros(0, 16)), prune_24(w))
    x = _inputs(64, 16)
    x[:, 5] = 0.0  # an input that never fires: its weights can go
    pruned = prune_24_sparsegpt(w, x)
    assert is_24_sparse(pruned) and (pruned[:, 5] == 0).all()


def test_reduction_dim_must_be_a_multiple_of_4():
    with pytest.raises(ValueError, match="multiple of 4"):
        prune_24_sparsegpt(torch.randn(4, 6), torch.randn(10, 6))


def test_expert_weights_of_a_fused_block_are_2_4_per_expert():
    model = mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative", verify=False)
    block = next(m for m in model.modules() if isinstance(m, FusedMoEBlock))
    x = torch.randn(64, block.spec.hidden_size, generator=torch.Generator().manual_seed(4))
    w13, w2 = sparsegpt_expert_weights(block, x)
    assert w13.shape == block.w13.shape and w2.shape == block.w2.shape
    assert is_24_sparse(w13) and is_24_sparse(w2)
    assert not torch.equal(w13, prune_24(block.w13.detach()))  # compensated, not just masked


def test_optimize_sparsity_method_is_recorded_and_sparsegpt_needs_text():
    ids = torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(5))  # > one 256-token window
    model = mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative", sparsity_24=True, calibration_text=ids,
                        quality_thresholds={"sparsity_24": 10.0})
    assert model.moe_compile.quality["sparsity_24"]["calibration"]["method"] == "sparsegpt"  # auto, text given
    model = mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative", sparsity_24=True)
    assert model.moe_compile.quality["sparsity_24"]["calibration"]["method"] == "magnitude"  # auto, no text
    with pytest.raises(ValueError, match="calibration_text"):
        mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative", sparsity_24=True, sparsity_method="sparsegpt")
    with pytest.raises(ValueError, match="sparsity_method"):
        mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative", sparsity_24=True, sparsity_method="random")


def test_sparsify_24_computes_each_blocks_sparsegpt_weights_at_its_turn():
    """The gate hands sparsify_24 one SparseGPT callable per block (not every block's pruned copy at once: a 48-layer
    model would hold its expert weights twice): each runs once, when its block converts, before the next one."""
    from moe_compile.passes import sparsify_24
    from moe_compile.quant.sparse24 import decompress_24

    model = mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative", verify=False)
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, FusedMoEBlock)}
    calls = []

    def prune(name, block):
        assert all(blocks[done].packed is not None for done in calls)  # the blocks before it are converted
        assert block.packed is None
        calls.append(name)
        x = torch.randn(32, block.spec.hidden_size, generator=torch.Generator().manual_seed(len(calls)))
        return sparsegpt_expert_weights(block, x)

    pruned = {name: (lambda name=name, block=block: prune(name, block)) for name, block in blocks.items()}
    result = sparsify_24(model, pruned)
    assert result.count == len(blocks) and calls == list(blocks) and not pruned
    for block in blocks.values():
        assert is_24_sparse(decompress_24(block.packed.w13, block.packed.w13_meta))
