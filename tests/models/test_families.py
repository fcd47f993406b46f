"""Every fusable tiny model (HF families of transformers 5 and user-written MoE modules) against its original.

Per model: optimized fp32 logits within TOLERANCES[fp32] relative of the original, 12 greedy tokens identical,
one fused block per MoE layer, and `inspect` reporting the config's experts and top-k; in bf16, logits within
bf16 rounding. The original and the optimized model are built once per module and shared by the tests.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import moe_compile as mc
from moe_compile.models import TINY_MODELS, build_tiny_model
from moe_compile.report import InspectReport
from tests.conftest import TOLERANCES, relative_error
from tests.models.expectations import NEW_TOKENS, PROMPT, config_experts_topk, count_fused, generate, logits

FUSABLE = sorted(n for n, t in TINY_MODELS.items() if t.skip_reason is None and t.moe_layers > 0)
IDS = torch.tensor([[5, 9, 77, 3, 101, 64, 12, 40, 2], [88, 1, 31, 120, 7, 56, 19, 99, 64]])  # [2, 9]


@dataclass
class Pair:
    original: nn.Module
    optimized: nn.Module
    report: InspectReport  # inspect() of the original


@pytest.fixture(scope="module", params=FUSABLE)
def pair(request) -> tuple[str, Pair]:
    original = build_tiny_model(request.param)
    report = mc.inspect(original)
    optimized = mc.optimize(copy.deepcopy(original), "conservative")
    return request.param, Pair(original, optimized, report)


def test_fp32_logits_match(pair):
    name, p = pair
    error = relative_error(logits(p.optimized, IDS), logits(p.original, IDS))
    assert error <= TOLERANCES[torch.float32], f"{name}: relative error {error:.2e}"


def test_greedy_generate_identical(pair):
    name, p = pair
    expected = generate(p.original, name)
    assert expected.shape[1] == PROMPT.shape[1] + NEW_TOKENS  # every new token produced: no early stop
    assert torch.equal(generate(p.optimized, name), expected), name


def test_one_fused_block_per_moe_layer(pair):
    name, p = pair
    result = p.optimized.moe_compile
    assert len(result.fused) == TINY_MODELS[name].moe_layers, result.skipped
    assert count_fused(p.optimized) == TINY_MODELS[name].moe_layers
    assert result.skipped == {}


def test_inspect_reports_config_experts_and_top_k(pair):
    name, p = pair
    experts, top_k = config_experts_topk(p.original.config)
    assert len(p.report.blocks) == TINY_MODELS[name].moe_layers
    for block in p.report.blocks:
        assert (block.num_experts, block.top_k) == (experts, top_k), block.name
        assert block.supported, block.reason


@pytest.mark.parametrize("name", FUSABLE)
def test_bf16_logits_within_bf16_rounding(name):
    original = build_tiny_model(name, dtype=torch.bfloat16)
    expected = logits(original, IDS)
    optimized = mc.optimize(original, "conservative")
    assert len(optimized.moe_compile.fused) == TINY_MODELS[name].moe_layers, optimized.moe_compile.skipped
    error = relative_error(logits(optimized, IDS), expected)
    assert error <= TOLERANCES[torch.bfloat16], f"{name}: bf16 relative error {error:.2e}"
