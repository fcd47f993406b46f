"""Static KV caches kept per batch bucket and the compiled prefill, on CPU: a real tiny model whose decode step
transformers compiles through our backend and whose prefill goes through `torch.compile(dynamic=True)` with our
backend (both inner eager here: the Dynamo guards and recompiles are the same as with Inductor, which is what
counts). Buckets used in turn keep their caches and graphs, tokens stay the original model's, each path compiles
a bounded number of times, and undo puts transformers' methods back and drops the caches."""

from __future__ import annotations

import gc
import inspect
import weakref

import pytest
import torch

import moe_compile as mc
from moe_compile.counters import counters
from moe_compile.emit import apply_emit
from moe_compile.emit.generate import (compiled_prefill, decode_caches, decode_graphs, disable_cuda_graph_decode,
                                       enable_cuda_graph_decode, release_decode_caches, set_decode_buckets)
from moe_compile.emit.static_caches import KeptCaches, cache_length
from moe_compile.models import build_tiny_model
from moe_compile.report import OptimizeResult
from tests.test_emit_buckets import _compile_decode_on_cpu

NEW = 8
MIN_CACHE = 32  # tokens: prompts of 6-9 tokens + 8 new fit; a 40-token prompt makes bucket 4's cache grow to 64


@pytest.fixture(scope="module")
def model():
    model = build_tiny_model("tiny-qwen3-moe")
    mc.optimize(model, "conservative")
    model.generation_config.pad_token_id = 0
    return model


def _enable(model, buckets=(1, 4, 8)):
    torch._dynamo.reset()
    enable_cuda_graph_decode(model, buckets=buckets, compile_prefill=True, min_cache_len=MIN_CACHE,
                             prefill_options={"inner": "eager"})
    _compile_decode_on_cpu(model)


def _greedy(model, ids, mask=None):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)


def _cache_keyword(model):
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def test_cache_length_rounds_up_to_powers_of_two():
    assert [cache_length(n, 32) for n in (1, 14, 32, 33, 48, 65)] == [32, 32, 32, 64, 64, 128]
    assert cache_length(300, 256, limit=400) == 400  # not past the model's positions...
    assert cache_length(500, 256, limit=400) == 512  # ...unless the call itself needs more
    with pytest.raises(ValueError, match="min_cache_len"):
        KeptCaches((1, 2), min_len=0)


def test_buckets_in_turn_reuse_their_caches_and_compile_each_path_a_bounded_number_of_times(model):
    """Batches 1, 3 (left padded, bucket 4), 1, 4, 4 with a 40-token prompt, 4: the original model's greedy tokens;
    the decode step compiles once per bucket plus once when bucket 4's cache grows; the prefill compiles once per
    kind of call (batch 1; batch 4 with a padding mask; batch 4 without), whatever the prompt and cache lengths."""
    generator = torch.Generator().manual_seed(0)
    three = torch.randint(1, 128, (3, 6), generator=generator)
    three[0, :2] = 0  # left padding in a real row
    calls = [(torch.randint(1, 128, (1, 6), generator=generator), None), (three, (three != 0).long()),
             (torch.randint(1, 128, (1, 9), generator=generator), None),
             (torch.randint(1, 128, (4, 6), generator=generator), None),
             (torch.randint(1, 128, (4, 40), generator=generator), None),
             (torch.randint(1, 128, (4, 7), generator=generator), None)]
    new_prefill_kind = [True, True, False, True, False, False]
    expected = [_greedy(model, ids, mask) for ids, mask in calls]
    torch.manual_seed(0)
    expected_sampled = model.generate(calls[0][0], max_new_tokens=NEW, do_sample=True, top_k=20)
    _enable(model)
    try:
        before = dict(counters["moe_compile"])
        for index, ((ids, mask), tokens, new_kind) in enumerate(zip(calls, expected, new_prefill_kind)):
            prefill_graphs = counters["moe_compile"]["prefill_graphs"]
            assert torch.equal(_greedy(model, ids, mask), tokens), f"call {index}"
            assert counters["moe_compile"]["prefill_graphs"] - prefill_graphs == int(new_kind), f"call {index}"
        graphs, caches, prefill = decode_graphs(model), decode_caches(model), compiled_prefill(model)
        assert graphs.compiled == {1: 1, 4: 2}  # bucket 4 once more for its grown cache, nothing else
        assert caches.created == {1: 1, 4: 2} and caches.reused == {1: 1, 4: 2}
        config = model.config
        per_token_row = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4  # fp32 K+V
        lengths = config.num_hidden_layers * 8  # each layer's int64 count of cached tokens
        assert caches.summary() == {1: {"tokens": 32, "bytes": 1 * 32 * per_token_row + lengths},
                                    4: {"tokens": 64, "bytes": 4 * 64 * per_token_row + lengths}}
        assert prefill.compiled == {1: 1, 4: 2} and prefill.runs == {"compiled": len(calls)}
        stats = counters["moe_compile"]
        assert stats["decode_graphs"] - before.get("decode_graphs", 0) == 3
        assert stats["prefill_graphs"] - before.get("prefill_graphs", 0) == 3
        torch.manual_seed(0)
        sampled = model.generate(calls[0][0], max_new_tokens=NEW, do_sample=True, top_k=20)
        assert torch.equal(sampled, expected_sampled)  # batch 1 is its own bucket: the same draws
        assert graphs.compiled == {1: 1, 4: 2} and sum(prefill.compiled.values()) == 3
    finally:
        disable_cuda_graph_decode(model)


def test_plain_forward_runs_the_compiled_prefill_for_any_token_count(model):
    """Inference forwards of 5, 9 and 33 tokens share one compiled graph and give the eager logits (fp32); one-token
    and training forwards run the model's own forward."""
    ids = {tokens: torch.randint(0, 128, (2, tokens), generator=torch.Generator().manual_seed(tokens))
           for tokens in (5, 9, 33, 1)}
    with torch.no_grad():
        expected = {tokens: model(x).logits for tokens, x in ids.items()}
    _enable(model)
    try:
        with torch.no_grad():
            for tokens, x in ids.items():
                torch.testing.assert_close(model(x).logits, expected[tokens])  # fp32 defaults: rtol 1.3e-6
        prefill = compiled_prefill(model)
        assert prefill.compiled == {2: 1}  # one graph for 5, 9 and 33 tokens
        assert prefill.runs == {"compiled": 3}  # the one-token forward ran eagerly
        torch.testing.assert_close(model(ids[9]).logits.detach(), expected[9])  # gradients on: a training forward...
        assert prefill.runs == {"compiled": 3, "eager": 1} and prefill.compiled == {2: 1}  # ...runs eagerly
    finally:
        disable_cuda_graph_decode(model)


def test_callers_own_cache_passes_through(model):
    """A caller's cache (dynamic or static) is used as given: the original model's tokens, no kept cache touched,
    its prefill eager (a caller's cache state would be new guards for the compiled one)."""
    from transformers import DynamicCache, StaticCache

    keyword = _cache_keyword(model)
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    expected = model.generate(ids, max_new_tokens=NEW, do_sample=False, **{keyword: DynamicCache(config=model.config)})
    _enable(model)
    try:
        for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=32)):
            actual = model.generate(ids, max_new_tokens=NEW, do_sample=False, **{keyword: cache})
            assert torch.equal(actual, expected), type(cache).__name__
        assert decode_caches(model).kept == {} and compiled_prefill(model).runs == {"eager": 2}
        assert model.generation_config.cache_implementation == "static"  # put back after the call
    finally:
        disable_cuda_graph_decode(model)


def test_release_and_undo_drop_the_caches_and_restore_transformers(model):
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    expected = _greedy(model, ids)
    original_generate = model.generate
    _enable(model)
    try:
        assert torch.equal(_greedy(model, ids), expected)
        caches = decode_caches(model)
        held = caches.nbytes()
        assert held > 0 and release_decode_caches(model) == held and caches.summary() == {}
        assert torch.equal(_greedy(model, ids), expected)  # the bucket allocates again...
        assert caches.created[1] == 2 and decode_graphs(model).compiled == {1: 1}  # ...with no decode compile
        keys = weakref.ref(caches.kept[1].cache.layers[0].keys)
        set_decode_buckets(model, (1, 2))  # new buckets, no cache kept from before
        assert decode_caches(model).kept == {} and compiled_prefill(model) is not None
    finally:
        disable_cuda_graph_decode(model)
    gc.collect()
    assert keys() is None  # nothing kept the cache's memory alive
    assert model.generate == original_generate and decode_caches(model) is None
    for name in ("generate", "get_compiled_call", "_prepare_static_cache"):
        assert name not in model.__dict__, name
    assert model._compiled_call_impl is None and model.generation_config.cache_implementation is None
    assert torch.equal(_greedy(model, ids), expected)


def _result():
    return OptimizeResult(profile="balanced", device="cpu", backend="reference")


def test_apply_emit_reports_the_compiled_prefill_and_undoes_it_all(model):
    """The plan's compile + cuda_graphs on an HF model: CUDA-graph decode with kept caches and a compiled prefill,
    reported as such; the undo `optimize` runs on a failure (here: a failure after the setup) restores the model."""
    enabled = {"cuda_graphs": True, "compile": True}
    result = _result()
    undo = apply_emit(model, dict(enabled), result)
    try:
        assert any("prefill compiled by moe_compile (dynamic token count)" in p and "static cache kept per bucket" in p
                   for p in result.passes), result.passes
        assert "compile" not in result.notes and compiled_prefill(model) is not None
        assert result.pass_counts["gqa_decode_attention"] == 2  # both layers: 4 query heads on 2 kv heads
        assert model.config._attn_implementation == "moe_compile_sdpa"
    finally:
        undo()
    assert "_prepare_static_cache" not in model.__dict__ and model._compiled_call_impl is None
    assert model.config._attn_implementation == "sdpa"
    failing = _result()
    failing.passes = ()  # appending the report fails after the setup ran
    with pytest.raises(AttributeError):
        apply_emit(model, dict(enabled), failing)
    assert decode_caches(model) is None and "generate" not in model.__dict__
    assert "_prepare_static_cache" not in model.__dict__ and model._compiled_call_impl is None


def test_cache_allocated_by_its_first_prefill_is_not_compiled_into_it():
    """MLA attention (DeepSeek-V3): transformers cannot allocate the static cache ahead (keys and values differ in
    size), so a bucket's first prefill runs eagerly and allocates it (marked static for the CUDA graphs); from the
    bucket's next call on, the prefill is the compiled one. Same tokens as the original model."""
    model = build_tiny_model("tiny-deepseek-v3")
    mc.optimize(model, "conservative")
    prompts = [torch.randint(1, 128, (1, tokens), generator=torch.Generator().manual_seed(tokens)) for tokens in (6, 9)]
    expected = [_greedy(model, ids) for ids in prompts]
    _enable(model)
    try:
        assert [torch.equal(_greedy(model, ids), tokens) for ids, tokens in zip(prompts, expected)] == [True, True]
        assert compiled_prefill(model).runs == {"eager": 1, "compiled": 1}
        assert decode_graphs(model).compiled == {1: 1} and decode_caches(model).reused == {1: 1}
    finally:
        disable_cuda_graph_decode(model)


def test_sliding_window_layers_decode_from_one_graph_per_bucket():
    """GPT-OSS alternates sliding-window (16 tokens here) and full attention. transformers' sliding static layer
    branches on a Python int, so the compiled decode step compiled again at every token (10 graphs for bucket 4
    until the recompile limit; bucket 1 then ran eagerly). Kept caches hold those layers at full length: one graph
    per bucket, and the original model's tokens with left padding and 24 new tokens past the window."""
    from moe_compile.emit.generate import decode_graphs

    model = mc.optimize(build_tiny_model("tiny-gpt-oss"), "conservative")
    model.generation_config.pad_token_id = 0
    assert model.config.sliding_window == 16 and "sliding_attention" in model.config.layer_types
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (3, 10), generator=generator)
    ids[0, :3] = 0
    mask = (ids != 0).long()

    def greedy(prompt, attention_mask=None):
        return model.generate(prompt, attention_mask=attention_mask, max_new_tokens=24, do_sample=False)

    expected, expected_one = greedy(ids, mask), greedy(ids[1:2])
    torch._dynamo.reset()
    enable_cuda_graph_decode(model, buckets=(1, 4), min_cache_len=MIN_CACHE)
    _compile_decode_on_cpu(model)
    try:
        assert torch.equal(greedy(ids, mask), expected) and torch.equal(greedy(ids[1:2]), expected_one)
        assert dict(decode_graphs(model).compiled) == {4: 1, 1: 1}
        kept = decode_caches(model).kept[4].cache
        assert [type(layer).__name__ for layer in kept.layers] == ["StaticLayer", "StaticLayer"]
    finally:
        disable_cuda_graph_decode(model)
