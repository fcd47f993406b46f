"""Grouped-query decode attention without the per-head KV copy (emit/attention.py): the same outputs as SDPA on
keys and values repeated per head, for every mask form transformers passes, and the same greedy tokens through a
compiled decode step (where transformers' own sdpa path copies the cache)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moe_compile as mc
from moe_compile.emit.attention import NAME, gqa_sdpa_attention, use_gqa_decode_attention
from moe_compile.emit.generate import decode_graphs, disable_cuda_graph_decode, enable_cuda_graph_decode
from moe_compile.models import build_tiny_model
from tests.test_emit_buckets import _compile_decode_on_cpu

B, H, HKV, L, D = 4, 8, 2, 11, 16  # batch, query heads, kv heads, cache length, head dim (B x HKV = 8 rows)
FP32_ATOL = 1e-6


class _Attention(nn.Module):
    num_key_value_groups = H // HKV


def _repeated_reference(query, key, value, mask, scale):
    """SDPA on keys / values repeated per query head -> [B, Q, H, Dv]."""
    key, value = (t.repeat_interleave(H // HKV, dim=1) for t in (key, value))
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                            scale=scale).transpose(1, 2)


def _masks(generator):
    padded = torch.ones(B, 1, 1, L + 5, dtype=torch.bool)  # a longer mask than the cache: sliced to L
    padded[0, :, :, :4] = False  # left padding of row 0
    padded[:, :, :, L - 2:] = False  # not yet written cache slots
    additive = torch.zeros(B, 1, 1, L).masked_fill(~padded[..., :L], torch.finfo(torch.float32).min)
    per_head = torch.rand(B, H, 1, L, generator=generator) > 0.3
    per_head[..., 0] = True
    return {"none": None, "bool": padded, "additive": additive, "per_head": per_head}


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "per_head"])
def test_one_token_matches_sdpa_on_repeated_kv(mask_kind):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(B, H, 1, D, generator=generator)
    key, value = torch.randn(B, HKV, L, D, generator=generator), torch.randn(B, HKV, L, D, generator=generator)
    mask = _masks(generator)[mask_kind]
    out, weights = gqa_sdpa_attention(_Attention(), query, key, value, mask, scaling=0.3)
    sliced = None if mask is None else mask[..., :L]
    assert weights is None and out.shape == (B, 1, H, D)
    torch.testing.assert_close(out, _repeated_reference(query, key, value, sliced, 0.3), atol=FP32_ATOL, rtol=0)


def test_few_rows_take_transformers_sdpa_path():
    """Batch 1 with 2 kv heads: 2 rows, fewer than MIN_FOLDED_ROWS: transformers' own path, bit for bit."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from moe_compile.emit.attention import MIN_FOLDED_ROWS

    generator = torch.Generator().manual_seed(3)
    query = torch.randn(1, H, 1, D, generator=generator)
    key, value = torch.randn(1, HKV, L, D, generator=generator), torch.randn(1, HKV, L, D, generator=generator)
    mask = torch.ones(1, 1, 1, L, dtype=torch.bool)
    assert HKV < MIN_FOLDED_ROWS
    ours, _ = gqa_sdpa_attention(_Attention(), query, key, value, mask, scaling=0.3)
    theirs, _ = sdpa_attention_forward(_Attention(), query, key, value, mask, scaling=0.3)
    assert torch.equal(ours, theirs)


def test_many_tokens_take_transformers_sdpa_path():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    generator = torch.Generator().manual_seed(1)
    query = torch.randn(B, H, 5, D, generator=generator)
    key, value = torch.randn(B, HKV, 5, D, generator=generator), torch.randn(B, HKV, 5, D, generator=generator)
    ours, _ = gqa_sdpa_attention(_Attention(), query, key, value, None, scaling=0.25, is_causal=True)
    theirs, _ = sdpa_attention_forward(_Attention(), query, key, value, None, scaling=0.25, is_causal=True)
    assert torch.equal(ours, theirs)


def test_compiled_decode_gives_the_same_tokens_with_left_padding():
    """The decode step compiled by transformers through our backend (CPU, inner eager) with the attention switched:
    the original model's greedy tokens for a left-padded batch; the undo puts `sdpa` back."""
    model = mc.optimize(build_tiny_model("tiny-qwen3-moe"), "conservative")
    model.generation_config.pad_token_id = 0
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 128, (3, 7), generator=generator)
    ids[0, :3] = 0
    mask = (ids != 0).long()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    torch._dynamo.reset()
    enable_cuda_graph_decode(model, buckets=(1, 4))
    _compile_decode_on_cpu(model)
    layers, undo = use_gqa_decode_attention(model)
    try:
        assert layers == 2 and model.config._attn_implementation == NAME
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), expected)
        assert dict(decode_graphs(model).compiled) == {4: 1}  # the switch adds no recompile
    finally:
        undo()
        disable_cuda_graph_decode(model)
    assert model.config._attn_implementation == "sdpa"


def test_models_without_grouped_queries_or_sdpa_are_left_alone():
    eager = build_tiny_model("tiny-qwen3-moe")
    eager.config._attn_implementation = "eager"
    assert use_gqa_decode_attention(eager)[0] == 0 and eager.config._attn_implementation == "eager"
    mha = build_tiny_model("tiny-mixtral")
    for module in mha.modules():
        if hasattr(module, "num_key_value_groups"):
            module.num_key_value_groups = 1  # as in a model with as many kv heads as query heads
    assert use_gqa_decode_attention(mha)[0] == 0 and mha.config._attn_implementation == "sdpa"


def test_decode_attention_op_is_registered_with_its_fake():
    """The op a compiled decode step calls: schema, fake (meta) shapes and the reference it runs on CPU."""
    from moe_compile.kernels.attention_op import reference_decode_attention

    generator = torch.Generator().manual_seed(4)
    query = torch.randn(B, HKV, H // HKV, D, generator=generator)
    key, value = torch.randn(B, HKV, L, D, generator=generator), torch.randn(B, HKV, L, 2 * D, generator=generator)
    mask = torch.rand(B, L, generator=generator) > 0.3
    mask[:, 0] = True
    op = torch.ops.moe_compile.gqa_decode_attention
    torch.library.opcheck(op, (query, key, value, mask, 0.25))
    out = op(query, key, value, mask, 0.25)
    assert out.shape == (B, HKV, H // HKV, 2 * D)
    torch.testing.assert_close(out, reference_decode_attention(query, key, value, mask, 0.25), atol=0, rtol=0)
