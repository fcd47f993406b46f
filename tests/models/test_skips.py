"""Models and blocks that must not be fused, and what a skip leaves behind.

Each case names the edge it covers: a dense model (no MoE block at all), PhiMoE (a routing outside the fused op's
family, skipped with the reason), a block with an unknown stateful child (fail closed before any proof), a block
with an unsupported activation (no spec reproduces it), and a model where only some blocks fuse. After a skip the
model's outputs are bitwise unchanged.
"""

from __future__ import annotations

import pytest
import torch

import moe_compile as mc
from moe_compile.models import TINY_MODELS, build_tiny_model
from moe_compile.models.tiny import PHIMOE_REASON
from moe_compile.models.user_modules import ModuleListMoE, UserLMConfig
from tests.conftest import TOLERANCES, relative_error
from tests.models.expectations import count_fused, logits

IDS = torch.tensor([[5, 9, 77, 3, 101, 64, 12], [88, 1, 31, 120, 7, 56, 19]])  # [2, 7]


def _optimize_expecting_no_change(model):
    before = logits(model, IDS)
    mc.optimize(model, "conservative")
    assert count_fused(model) == 0
    assert torch.equal(logits(model, IDS), before)  # bitwise: the skipped blocks are the original modules
    return model.moe_compile


def test_dense_model_has_no_moe_blocks():
    # edge: nothing MoE-like anywhere (attention and MLP Linears must not look like routers)
    model = build_tiny_model("tiny-user-dense")
    assert mc.inspect(model).blocks == []
    result = _optimize_expecting_no_change(model)
    assert result.fused == [] and result.skipped == {}


def test_phimoe_is_skipped_with_the_reason():
    # edge: a real family whose sparsemixer routing is outside the op's family: detected, reported, not fused
    model = build_tiny_model("tiny-phimoe")
    report = mc.inspect(model)
    assert len(report.blocks) == TINY_MODELS["tiny-phimoe"].moe_layers
    assert all(not b.supported and PHIMOE_REASON in b.reason for b in report.blocks)
    result = _optimize_expecting_no_change(model)
    assert len(result.skipped) == TINY_MODELS["tiny-phimoe"].moe_layers
    assert all(PHIMOE_REASON in reason for reason in result.skipped.values())


def test_unknown_stateful_child_is_not_fused():
    # edge: a LayerNorm inside the block is state the fused op does not carry: fail closed, before any proof
    model = build_tiny_model("tiny-user-modulelist", extra_norm=True)
    report = mc.inspect(model)
    assert len(report.blocks) == 2
    for block in report.blocks:
        assert not block.supported
        assert "unknown stateful child 'norm'" in block.reason and "LayerNorm" in block.reason
    result = _optimize_expecting_no_change(model)
    assert all("fail closed" in reason for reason in result.skipped.values())


@pytest.mark.parametrize("name, activation", [
    ("tiny-user-modulelist", "elu"),  # edge: per-expert ModuleList, GLU with an activation the op lacks
    ("tiny-user-gpt-fast", "softplus"),  # edge: 3-D einsum experts, same
])
def test_unsupported_activation_is_left_alone(name, activation):
    model = build_tiny_model(name, activation=activation, num_layers=1)  # one layer: the search is exhaustive
    result = _optimize_expecting_no_change(model)
    assert len(result.skipped) == 1
    assert all("no spec in the supported routing/activation family" in r for r in result.skipped.values())


def test_partial_fusion_leaves_the_skipped_block_untouched():
    # edge: one layer fuses, the other fails closed: the failed block stays the same object, bitwise the same
    model = build_tiny_model("tiny-user-modulelist")
    torch.manual_seed(1)
    bad = ModuleListMoE(UserLMConfig(num_experts=4, intermediate_size=20, extra_norm=True)).eval()
    model.layers[1].feed_forward = bad
    x = torch.randn(2, 5, 32)  # [B, S, H]
    with torch.no_grad():
        before = bad(x)
    mc.optimize(model, "conservative")
    assert model.moe_compile.fused == ["layers.0.feed_forward"]
    assert list(model.moe_compile.skipped) == ["layers.1.feed_forward"]
    assert model.layers[1].feed_forward is bad
    with torch.no_grad():
        assert torch.equal(bad(x), before)


def test_qwen3_dense_layers_by_decoder_sparse_step():
    # edge: dense MLP layers chosen by decoder_sparse_step (the registry's mixed model uses mlp_only_layers)
    model = build_tiny_model("tiny-qwen3-moe-mixed", mlp_only_layers=[], decoder_sparse_step=2)
    before = logits(model, IDS)
    assert [b.name for b in mc.inspect(model).blocks] == ["model.layers.1.mlp"]
    mc.optimize(model, "conservative")
    assert model.moe_compile.fused == ["model.layers.1.mlp"] and count_fused(model) == 1
    assert relative_error(logits(model, IDS), before) <= TOLERANCES[torch.float32]
