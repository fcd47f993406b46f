"""The decode-speed helpers behind `moe-compile bench --speed` (`moe_compile/speed.py`): the bytes a decode step
reads, from a tiny model whose sizes the test spells out, and the step clock on CPU."""

from __future__ import annotations

import pytest
import torch

import moe_compile as mc
from moe_compile.models import build_tiny_model
from moe_compile.speed import kv_bytes_per_token, measure_generate, step_bytes

FP32 = 4


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("tiny-qwen3-moe")  # fp32, 2 layers, H 32, expert I 24, E 8, top-2, 2 kv heads of 8


def test_kv_bytes_per_token_counts_keys_and_values_of_every_layer(model):
    c = model.config
    assert kv_bytes_per_token(model) == c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * FP32


def test_step_bytes_split_weights_activated_experts_and_kv(model):
    c = model.config
    expert = 3 * c.hidden_size * c.moe_intermediate_size * FP32  # gate, up, down of one expert
    everything = sum(p.numel() for p in model.parameters()) * FP32
    fused = mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative")
    one = step_bytes(fused, batch=1, kv_per_token=100)
    assert one.experts == pytest.approx(c.num_hidden_layers * c.num_experts_per_tok * expert)  # batch 1: top-k each
    many = step_bytes(fused, batch=10_000, kv_per_token=100)
    assert many.experts == pytest.approx(c.num_hidden_layers * c.num_experts * expert)  # every expert
    embeddings = c.vocab_size * c.hidden_size * FP32  # untied: only `batch` rows of the table are read
    assert one.weights == everything - c.num_hidden_layers * c.num_experts * expert - embeddings
    assert one.total(batch=3, context=50) == one.weights + one.experts + 100 * 3 * 50


def test_step_clock_times_each_generated_token_on_cpu(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    m = measure_generate(model, ids, steps=5)
    assert m["tokens"].shape == (2, 6 + 6) and m["peak_mem_gb"] is None
    assert 0 < m["decode_step_ms"] and 0 < m["prefill_ms"] and m["decode_tok_s"] == pytest.approx(
        2e3 / m["decode_step_ms"])
