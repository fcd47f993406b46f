"""capture: torch.export (non-strict, dynamic token count) of optimized models and blocks.

Found with transformers 5.24 / torch 2.13: whole HF causal LMs export when `use_cache=False` (a DynamicCache
output is not a pytree type; `capture` adds the flag), with the sequence length dynamic from 1 token up.
"""

from __future__ import annotations

import pytest
import torch

import moe_compile as mc
from moe_compile.capture import capture, count_fused_nodes
from moe_compile.models import build_tiny_model
from moe_compile.models.tiny import TINY_MODELS
from tests.conftest import TOLERANCES, relative_error


def _ids(seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_export_whole_model(name):
    model = build_tiny_model(name)
    mc.optimize(model, "conservative")
    exported = capture(model, (_ids(7),))
    assert count_fused_nodes(exported) == TINY_MODELS[name].moe_layers  # one fused_moe node per MoE layer
    # the weights are graph inputs (lifted parameters), so graph passes can rewrite them
    fused = next(n for n in exported.graph.nodes if n.op == "call_function" and "fused_moe" in str(n.target))
    assert fused.args[4].op == "placeholder"  # w13
    run = exported.module()
    for seq in (1, 11):  # two token counts other than the example's, T = 1 included
        ids = _ids(seq, seed=seq)
        with torch.no_grad():
            expected = model(ids, use_cache=False).logits
            actual = run(ids, use_cache=False).logits
        assert actual.shape == (2, seq, 128)
        assert relative_error(actual, expected) <= TOLERANCES[torch.float32]


def test_export_single_block_flat_and_3d():
    model = build_tiny_model("tiny-gpt-oss")
    mc.optimize(model, "conservative")
    block = model.model.layers[0].mlp
    for example in (torch.randn(2, 5, 32), torch.randn(5, 32)):
        exported = capture(block, example)
        assert count_fused_nodes(exported) == 1
        bigger = torch.randn(*example.shape[:-2], 9, 32)
        with torch.no_grad():
            expected, actual = block(bigger), exported.module()(bigger)
        assert relative_error(actual[0], expected[0]) <= TOLERANCES[torch.float32]  # (hidden, routing weights)


def test_count_fused_nodes_negative():
    model = build_tiny_model("tiny-deepseek-v3")
    dense_mlp = model.model.layers[0].mlp  # first_k_dense_replace: a plain MLP, no fused node to find
    exported = capture(dense_mlp, torch.randn(2, 5, 32))
    assert count_fused_nodes(exported) == 0
    assert count_fused_nodes(torch.fx.symbolic_trace(torch.nn.Linear(4, 4))) == 0
