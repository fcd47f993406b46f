"""Compiled emission on a CUDA GPU: `optimize(model, "balanced")` then plain `generate` decodes from CUDA graphs
with our fused kernels, each batch bucket on its own kept static cache, the prefill compiled with a dynamic token
count, and gives the original model's tokens (bf16, 32+ steps)."""

from __future__ import annotations

import pytest
import torch

import moe_compile as mc
from moe_compile.models import build_tiny_model

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run on the device machine)", allow_module_level=True)

pytestmark = pytest.mark.gpu
STEPS = 32


def _model(name="tiny-qwen3-moe", dtype=torch.bfloat16):
    return build_tiny_model(name).to(device="cuda", dtype=dtype)


def _inductor_counters():
    from torch._dynamo.utils import counters

    return counters["inductor"]


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-mixtral", "tiny-deepseek-v3"])
def test_balanced_generate_same_tokens_from_cuda_graphs(name):
    model = _model(name)
    prompt = torch.tensor([[3, 17, 42, 5, 99, 8, 61, 7]], device="cuda")
    expected = model.generate(prompt, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    mc.optimize(model, "balanced")
    assert model.moe_compile.features["cuda_graphs"], model.moe_compile.unavailable
    skips_before = _inductor_counters()["cudagraph_skips"]
    actual = model.generate(prompt, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    assert torch.equal(actual, expected)
    assert _inductor_counters()["cudagraph_skips"] == skips_before  # every decode graph was captured


def test_balanced_generate_left_padding_and_sampling():
    """fp32: HF's reference here is a dynamic cache, ours a static one with padding masks over the whole cache;
    in bf16 the two attention paths round differently and a near-tie can flip a token of a random tiny model."""
    model = _model(dtype=torch.float32)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]], device="cuda")
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], device="cuda")
    model.generation_config.pad_token_id = 0
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    mc.optimize(model, "balanced")
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False), expected)
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=20)
    assert sampled.shape == (2, 6 + 12) and int(sampled.max()) < model.config.vocab_size


def test_balanced_forward_with_changing_token_counts():
    from moe_compile.emit.generate import compiled_prefill

    model = _model()
    mc.optimize(model, "balanced")
    for tokens in (5, 9, 33):
        ids = torch.randint(0, 128, (2, tokens), device="cuda")
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (2, tokens, model.config.vocab_size) and torch.isfinite(logits).all()
    assert compiled_prefill(model).compiled == {2: 1}  # one prefill graph for every token count


def _decode_graphs(model):
    from moe_compile.emit.generate import decode_graphs

    return decode_graphs(model)


def test_batches_share_bucketed_decode_graphs():
    """Batches 1, 5 and 3 run as buckets 1, 8 and 4: the original model's greedy tokens for 32 steps, one captured
    decode graph per bucket, and a following batch of 3 reuses bucket 4 (no compile).
    fp32: in bf16 one row of batch 3 left the original's tokens after ~22 steps (H100, transformers 5.17), the
    static-vs-dynamic-cache rounding of test_balanced_generate_left_padding_and_sampling."""
    from moe_compile.counters import counters

    model = _model(dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    prompts = {batch: torch.randint(1, 128, (batch, 8), generator=generator).cuda() for batch in (1, 5, 3)}
    expected = {batch: model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
                for batch, ids in prompts.items()}
    mc.optimize(model, "balanced")
    assert model.moe_compile.features["specialize_phase"], model.moe_compile.unavailable
    for batch, ids in prompts.items():
        actual = model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
        assert torch.equal(actual, expected[batch]), f"batch {batch}"
    graphs = _decode_graphs(model)
    assert graphs.captured_buckets == [1, 4, 8]  # number of captured graphs == number of buckets used
    assert sorted(graphs.first_step_s) == [1, 4, 8]
    recorded, compiled = dict(graphs.recorded), dict(graphs.compiled)
    again = model.generate(prompts[3].flip(0), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    assert torch.equal(again, expected[3].flip(0))
    # bucket 4 is not compiled again, and its kept static cache keeps the addresses its CUDA graph was recorded on
    assert dict(graphs.compiled) == compiled and dict(graphs.recorded) == recorded
    pinned = {k for k in counters["moe_compile"] if k.startswith("specialize_phase.")}
    phases = {k.split(".")[1] for k in pinned}
    assert phases == {"decode", "prefill"}, pinned  # decode graphs got decode kernels, the compiled prefill grouped


def test_bucketed_generate_sampling_eos_and_left_padding():
    """fp32 (see test_balanced_generate_left_padding_and_sampling): batch 3 (bucket 4) with left padding gives the
    original model's greedy tokens; eos stops it as it stops the original; seeded sampling runs."""
    model = _model(dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6], [0, 9, 10, 11, 12, 13]], device="cuda")
    mask = (ids != 0).long()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    same = ids[1:2].repeat(3, 1)  # identical rows finish on the same eos step
    eos = int(model.generate(same[:1], max_new_tokens=4, do_sample=False)[0, -1])
    expected_eos = model.generate(same, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    assert expected_eos.shape[1] < same.shape[1] + 12  # eos ended the original early
    mc.optimize(model, "balanced")
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False), expected)
    assert torch.equal(model.generate(same, max_new_tokens=12, do_sample=False, eos_token_id=eos), expected_eos)
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=20)
    assert sampled.shape == (3, 6 + 12) and int(sampled.max()) < model.config.vocab_size
    assert _decode_graphs(model).captured_buckets == [4]


def test_deferred_stop_checks_give_the_same_tokens(monkeypatch):
    """MOE_COMPILE_DEFERRED_STOP=1 (emit/deferred_stop.py): the bucketed decode defers generate's stop check by a
    step; greedy tokens equal the original model's with a length stop and with an eos stop (one extra step run and
    undone), fp32 as in the test above."""
    from transformers.generation.utils import DeferredStopCheck

    from moe_compile.emit.deferred_stop import ENABLE_ENV

    model = _model(dtype=torch.float32)
    same = torch.tensor([[1, 2, 3, 4, 5, 6]], device="cuda").repeat(3, 1)
    expected = model.generate(same, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    eos = int(model.generate(same[:1], max_new_tokens=5, do_sample=False)[0, -1])
    expected_eos = model.generate(same, max_new_tokens=STEPS, do_sample=False, eos_token_id=eos)
    assert expected_eos.shape[1] < same.shape[1] + STEPS
    mc.optimize(model, "balanced")
    monkeypatch.setenv(ENABLE_ENV, "1")
    undone = []
    finish = DeferredStopCheck.finish
    monkeypatch.setattr(DeferredStopCheck, "finish", lambda self: undone.append(finish(self)) or undone[-1])
    assert torch.equal(model.generate(same, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False), expected)
    assert torch.equal(model.generate(same, max_new_tokens=STEPS, do_sample=False, eos_token_id=eos), expected_eos)
    assert undone == [0, 1]  # both calls deferred; the eos call ran one step past its stop and undid it


def test_dynamic_batch_decode_gives_the_same_tokens_from_two_graphs():
    """set_dynamic_decode: batch 1 compiles with static sizes, batch 2 with a dynamic batch, and batches 3-8 (buckets
    4 and 8) reuse it, each bucket replaying its own CUDA graph; greedy tokens equal the original's (fp32)."""
    from moe_compile.emit.generate import set_dynamic_decode

    model = _model(dtype=torch.float32)
    generator = torch.Generator(device="cuda").manual_seed(1)
    calls = [torch.randint(1, 100, (batch, 8), device="cuda", generator=generator) for batch in (1, 2, 3, 8)]
    expected = [model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False) for ids in calls]
    mc.optimize(model, "balanced")
    set_dynamic_decode(model)
    skips_before = _inductor_counters()["cudagraph_skips"]
    for ids, tokens in zip(calls, expected):
        assert torch.equal(model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False), tokens)
    graphs = _decode_graphs(model)
    assert {bucket: n for bucket, n in graphs.compiled.items() if n} == {1: 1, 2: 1}  # buckets 4, 8 compile nothing
    assert graphs.captured_buckets == [1, 2, 4, 8]
    assert _inductor_counters()["cudagraph_skips"] == skips_before


def test_undo_restores_generate():
    from moe_compile.emit.generate import disable_cuda_graph_decode

    model = _model()
    original = model.generate
    mc.optimize(model, "balanced")
    assert model.generate != original
    disable_cuda_graph_decode(model)
    assert model.generate == original and "get_compiled_call" not in model.__dict__
    assert "_prepare_static_cache" not in model.__dict__ and model._compiled_call_impl is None
    assert model.generation_config.cache_implementation is None


def test_buckets_in_turn_replay_their_graphs_with_a_compiled_prefill():
    """fp32: calls of batch 1, 4, 1, 4 give the original model's tokens for 32 steps (in bf16 the fourth call left
    them after ~22 steps on an H100: compiled-prefill rounding, as in test_batches_share_bucketed_decode_graphs);
    after the first call of a bucket no decode compile and no CUDA-graph
    re-record (each bucket keeps its static cache); every prefill ran the compiled path, two graphs in all (batch 1,
    batch 4). A 300-token prompt then grows bucket 4's cache to 512 tokens: one decode compile, no prefill one."""
    from moe_compile.emit.generate import compiled_prefill, decode_caches

    torch._dynamo.reset()  # an earlier test's decode graph (same code, same shapes) would serve these buckets
    model = _model(dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 128, shape, generator=generator).cuda() for shape in ((1, 8), (4, 8), (1, 12), (4, 10))]
    long_prompt = torch.randint(1, 128, (4, 300), generator=generator).cuda()

    def greedy(ids, **kwargs):
        return model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, **kwargs)

    expected = [greedy(ids, cache_implementation="static", disable_compile=True) for ids in prompts]
    mc.optimize(model, "balanced")
    assert model.moe_compile.features["compile"] and model.moe_compile.features["cuda_graphs"]
    assert any("prefill compiled" in p for p in model.moe_compile.passes), model.moe_compile.passes
    graphs, caches, prefill = _decode_graphs(model), decode_caches(model), compiled_prefill(model)
    skips_before = _inductor_counters()["cudagraph_skips"]
    for index, ids in enumerate(prompts):
        assert torch.equal(greedy(ids), expected[index]), f"call {index} (batch {ids.shape[0]})"
        if index == 1:
            compiled, recorded = dict(graphs.compiled), dict(graphs.recorded)
    assert compiled == {1: 1, 4: 1} and graphs.captured_buckets == [1, 4]
    assert dict(graphs.compiled) == compiled and dict(graphs.recorded) == recorded  # the second round replayed
    assert caches.reused == {1: 1, 4: 1} and {b: s["tokens"] for b, s in caches.summary().items()} == {1: 256, 4: 256}
    # H100, torch 2.11 (TORCH_LOGS=recompiles): the first prompt of a batch kind compiles with its token count
    # static, the second token count recompiles it with the count dynamic; two graphs per kind, as on this run
    assert prefill.runs == {"compiled": 4} and prefill.compiled == {1: 2, 4: 2}
    assert _inductor_counters()["cudagraph_skips"] == skips_before
    assert greedy(long_prompt).shape == (4, 300 + STEPS)
    assert graphs.compiled == {1: 1, 4: 2} and caches.summary()[4]["tokens"] == 512
    assert prefill.runs == {"compiled": 5}


def test_sliding_window_model_decodes_from_one_graph_per_bucket():
    """GPT-OSS (sliding-window layers of 16 tokens here), fp32: the original tokens for STEPS steps past the window,
    from one decode graph per bucket (the kept cache holds its sliding layers at full length)."""
    torch._dynamo.reset()
    model = _model("tiny-gpt-oss", dtype=torch.float32)
    prompt = torch.tensor([[3, 17, 42, 5, 99, 8, 61, 7]], device="cuda")
    expected = model.generate(prompt, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    mc.optimize(model, "balanced")
    for _ in range(2):
        assert torch.equal(model.generate(prompt, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False),
                           expected)
    assert dict(_decode_graphs(model).compiled) == {1: 1}
