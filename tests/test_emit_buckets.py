"""Batch buckets for CUDA-graph decode, on CPU: bucket choice, row padding, the stopping criterion for added rows,
and the whole `generate` wrapper on a real tiny model whose decode step transformers compiles through our backend
(inner eager, no CUDA graphs here): padded batches give the unpadded tokens, one compile per bucket, undo."""

from __future__ import annotations

import pytest
import torch

import moe_compile as mc
from moe_compile.emit.buckets import bucket_for, check_buckets, pad_rows, padding_rows_done
from moe_compile.emit.generate import (decode_graphs, disable_cuda_graph_decode, enable_cuda_graph_decode,
                                       set_dynamic_decode,
                                       set_decode_buckets)
from moe_compile.models import build_tiny_model

NEW = 8


def test_bucket_choice():
    buckets = check_buckets([8, 1, 4, 2, 4])
    assert buckets == (1, 2, 4, 8)
    assert [bucket_for(b, buckets) for b in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    for bad in ([], [0, 1], [1.5], [True]):
        with pytest.raises(ValueError, match="positive integers"):
            check_buckets(bad)


def test_pad_rows_copies_the_last_row():
    ids = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    padded = pad_rows(ids, 4)
    assert padded.shape == (4, 3) and torch.equal(padded[:3], ids) and torch.equal(padded[3], ids[2])
    assert pad_rows(ids, 3) is ids


def test_added_rows_are_done_from_the_start():
    done = padding_rows_done(3)(torch.zeros(8, 5, dtype=torch.long), None)
    assert done.tolist() == [False] * 3 + [True] * 5


@pytest.fixture(scope="module")
def model():
    """A fused tiny model whose decode step transformers compiles on CPU (our backend, inner eager)."""
    model = build_tiny_model("tiny-qwen3-moe")
    mc.optimize(model, "conservative")
    model.generation_config.pad_token_id = 0
    return model


def _compile_decode_on_cpu(model):
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False, backend="moe_compile", mode=None,
                           options={"inner": "eager"})
    config._compile_all_devices = True  # transformers compiles the decode step on CUDA only by default
    model.generation_config.compile_config = config


def _greedy(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=NEW, do_sample=False, **kwargs)


def test_padded_generate_matches_unpadded_and_undoes(model):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (3, 6), generator=generator)
    ids[0, :2] = 0  # left padding in a real row
    mask = (ids != 0).long()
    five = torch.randint(1, 128, (5, 6), generator=generator)
    expected, expected_five = _greedy(model, ids, attention_mask=mask), _greedy(model, five)
    original = model.generate
    torch._dynamo.reset()
    enable_cuda_graph_decode(model, buckets=(1, 4, 8))
    try:
        _compile_decode_on_cpu(model)
        assert torch.equal(_greedy(model, ids, attention_mask=mask), expected)  # 3 rows run as 4
        assert torch.equal(_greedy(model, five), expected_five)  # 5 rows run as 8
        assert torch.equal(_greedy(model, ids.flip(0), attention_mask=mask.flip(0)), expected.flip(0))
        graphs = decode_graphs(model)
        assert sorted(graphs.first_step_s) == [4, 8]
        assert graphs.compiled == {4: 1, 8: 1}  # the flipped batch of 3 reused bucket 4's graph
        torch.manual_seed(0)
        sampled = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, top_k=20)
        assert sampled.shape == (3, 6 + NEW)
        set_decode_buckets(model, (2,))  # past the largest bucket: unpadded
        _compile_decode_on_cpu(model)
        assert torch.equal(_greedy(model, ids, attention_mask=mask), expected)
        assert sorted(decode_graphs(model).first_step_s) == [3]
    finally:
        disable_cuda_graph_decode(model)
    assert model.generate == original and "get_compiled_call" not in model.__dict__
    assert model.generation_config.cache_implementation is None and decode_graphs(model) is None


def test_eos_and_own_stopping_criteria_act_on_real_rows(model):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __init__(self, length):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    eos = int(_greedy(model, ids[:1])[0, 6 + 2])  # row 0 ends on its third new token
    expected_eos = _greedy(model, ids, eos_token_id=eos)
    stop = StoppingCriteriaList([StopAfter(6 + 4)])
    torch._dynamo.reset()
    enable_cuda_graph_decode(model, buckets=(4,))
    try:
        _compile_decode_on_cpu(model)
        assert torch.equal(_greedy(model, ids, eos_token_id=eos), expected_eos)
        assert _greedy(model, ids, stopping_criteria=stop).shape == (3, 6 + 4)
        beams = model.generate(ids, max_new_tokens=2, num_beams=2, do_sample=False)  # passed through unpadded
        assert beams.shape == (3, 6 + 2)
    finally:
        disable_cuda_graph_decode(model)


def test_dynamic_batch_compiles_the_step_twice_for_all_buckets(model):
    """dynamic_batch: the first bucket compiles with static sizes, the second with a dynamic batch, and later
    buckets (and batches padded to them) reuse that graph, with the original tokens (fp32)."""
    generator = torch.Generator().manual_seed(2)
    calls = [torch.randint(1, 128, (batch, 6), generator=generator) for batch in (1, 4, 8, 16, 3)]
    expected = [_greedy(model, ids) for ids in calls]
    torch._dynamo.reset()
    enable_cuda_graph_decode(model, buckets=(1, 4, 8, 16), dynamic_batch=True)
    try:
        config = model.generation_config.compile_config
        assert config.dynamic is None  # Dynamo's automatic dynamic shapes
        _compile_decode_on_cpu(model)
        model.generation_config.compile_config.dynamic = None
        for ids, tokens in zip(calls, expected):
            assert torch.equal(_greedy(model, ids), tokens)
        assert dict(decode_graphs(model).compiled) == {1: 1, 4: 1}
        set_dynamic_decode(model, False)
        assert model.generation_config.compile_config.dynamic is False
    finally:
        disable_cuda_graph_decode(model)



def test_recording_counter_survives_dynamo_reset():
    """torch._dynamo.reset() clears every compilation callback; the CUDA-graph recording counter registers again
    (else a bucket's captured graphs would go uncounted, as a GPU test run after a reset showed)."""
    from torch._dynamo.callback import callback_handler

    from moe_compile.emit.decode_graphs import _count_cudagraph_recordings, register_recording_counter

    register_recording_counter()
    torch._dynamo.reset()
    assert _count_cudagraph_recordings not in callback_handler.start_callbacks
    register_recording_counter()
    register_recording_counter()
    assert callback_handler.start_callbacks.count(_count_cudagraph_recordings) == 1
