"""The split-KV decode attention kernel (`kernels/triton/decode_attention.py`) against SDPA on the same folded
shapes (`attention_op.reference_decode_attention`), on fresh random inputs: one sequence and many, groups that are
and are not powers of two, cache lengths that are not multiples of a tile or a split, masks with left padding,
unwritten slots, a batch-broadcast mask, and a row with no visible key (zeros). GPU cases are marked `gpu`; small
ones also run on CPU through Triton's interpreter (TRITON_INTERPRET=1).

Dimension legend: B = batch, Hkv = kv heads, G = query heads per kv head, L = cache length, D / Dv = head dims.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import relative_error

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1 for Triton's CPU interpreter)", allow_module_level=True)
try:
    from moe_compile.kernels.attention_op import kernel_takes, reference_decode_attention
    from moe_compile.kernels.triton.decode_attention import (
        BLOCK_N, COMBINE_CHUNK, MAX_SPLIT, PROGRAMS_PER_SM, decode_attention, splits_for)
except ImportError as exc:
    pytest.skip(f"triton unavailable: {exc}", allow_module_level=True)

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative L2 error vs SDPA: fp32 products in IEEE fp32; half types round the softmax weights to the value dtype
# before the P.V product (as flash attention does), about one unit of the 8 (bf16) / 11 (fp16) bit mantissa.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
DTYPES = [torch.float16] if INTERPRET else [torch.bfloat16, torch.float16, torch.float32]


def _inputs(batch, kv_heads, groups, length, dim, dim_v, dtype, seed):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator, device=DEVICE).to(dtype)  # noqa: E731
    return draw(batch, kv_heads, groups, dim), draw(batch, kv_heads, length, dim), draw(batch, kv_heads, length, dim_v)


def _mask(kind, batch, length):
    if kind == "none":
        return None
    mask = torch.ones(batch, length, dtype=torch.bool, device=DEVICE)
    if kind in ("static_cache", "left_padded"):
        mask[:, length // 2 + 1:] = False  # slots a static cache has not written yet
    if kind == "left_padded":
        mask[0, : length // 4] = False
    if kind == "broadcast":
        mask = mask[:1].expand(batch, length)  # one row for the batch (stride 0)
    return mask


def _check(batch, kv_heads, groups, length, dim, dim_v, dtype, mask_kind, seed=0):
    query, key, value = _inputs(batch, kv_heads, groups, length, dim, dim_v, dtype, seed)
    mask = _mask(mask_kind, batch, length)
    scale = dim ** -0.5
    out = decode_attention(query, key, value, mask, scale)
    ref = reference_decode_attention(query.float(), key.float(), value.float(), mask, scale)
    assert out.shape == (batch, kv_heads, groups, dim_v) and out.dtype == dtype
    assert relative_error(out, ref) < TOLERANCES[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "static_cache", "left_padded", "broadcast"])
@pytest.mark.parametrize("shape", [(1, 4, 8, 1024), (3, 2, 4, 97), (2, 1, 20, 33), (1, 2, 1, 1)])
def test_matches_sdpa(shape, mask_kind, dtype):
    if INTERPRET and shape[-1] > 100:
        pytest.skip("the interpreter is slow on long caches")
    _check(*shape, dim=64, dim_v=64, dtype=dtype, mask_kind=mask_kind)


@pytest.mark.skipif(INTERPRET, reason="large shapes: GPU only")
@pytest.mark.parametrize("batch, length", [(64, 1024), (8, 4096), (1, 8192)])
def test_benchmark_shapes(batch, length):
    """The Qwen3-30B-A3B shape: 4 kv heads of 8 query heads, D = Dv = 128."""
    _check(batch, 4, 8, length, 128, 128, torch.bfloat16, "static_cache", seed=batch)


def test_more_splits_than_one_combine_chunk():
    """1100 keys of one kv head: more splits than one combine load takes, some of them empty."""
    assert splits_for(1, 1100, 132)[0] > COMBINE_CHUNK
    _check(1, 1, 2, 1100, dim=16, dim_v=16, dtype=DTYPES[0], mask_kind="left_padded")


@pytest.mark.parametrize("dim, dim_v", [(32, 64), (8, 8), (96, 80)])
def test_head_dims(dim, dim_v):
    """Value dim unlike the key dim, a head dim below a tl.dot tile (the tiny models' 8), dims not powers of two."""
    _check(2, 2, 4, 50, dim=dim, dim_v=dim_v, dtype=DTYPES[0], mask_kind="static_cache")


def test_row_without_visible_keys_gives_zeros():
    query, key, value = _inputs(2, 2, 4, 40, 32, 32, DTYPES[0], seed=5)
    mask = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    out = decode_attention(query, key, value, mask, 0.2)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = reference_decode_attention(query[:1].float(), key[:1].float(), value[:1].float(), mask[:1], 0.2)
    assert relative_error(out[:1], ref) < TOLERANCES[DTYPES[0]]


def test_splits_cover_the_cache_and_fill_the_gpu():
    for pairs, length in [(4, 1024), (256, 1024), (1, 1), (4, 33), (1024, 8192)]:
        splits, split = splits_for(pairs, length, num_sms=132)
        assert split % BLOCK_N == 0 and split <= MAX_SPLIT and (splits - 1) * split < length <= splits * split
        assert pairs * splits >= min(PROGRAMS_PER_SM * 132, pairs * -(-length // BLOCK_N))


@pytest.mark.skipif(INTERPRET, reason="dispatch rules are for CUDA tensors")
def test_kernel_takes_what_it_can_run():
    query, key, value = _inputs(1, 4, 8, 64, 128, 128, torch.bfloat16, seed=1)
    assert kernel_takes(query, key, value, None)
    assert not kernel_takes(query, key, value, torch.zeros(1, 64, device=DEVICE))  # additive masks go to SDPA
    wide_query, wide_key, wide_value = _inputs(1, 4, 8, 64, 512, 512, torch.bfloat16, seed=1)
    assert not kernel_takes(wide_query, wide_key, wide_value, None)  # head dim past MAX_HEAD_DIM
    assert not kernel_takes(query.cpu(), key.cpu(), value.cpu(), None)


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs")
def test_op_replays_in_a_cuda_graph_as_the_mask_grows():
    """The decode step's use: one captured call, replayed as the static cache fills (the mask changes in place)."""
    query, key, value = _inputs(1, 4, 8, 512, 128, 128, torch.bfloat16, seed=2)
    mask = torch.zeros(1, 512, dtype=torch.bool, device=DEVICE)
    mask[:, :100] = True
    op = torch.ops.moe_compile.gqa_decode_attention
    op(query, key, value, mask, 0.1)  # warm-up (compiles the kernels) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(query, key, value, mask, 0.1)
    for visible in (100, 101, 300, 512):
        mask[:, :visible] = True
        graph.replay()
        ref = reference_decode_attention(query.float(), key.float(), value.float(), mask, 0.1)
        assert relative_error(out, ref) < TOLERANCES[torch.bfloat16]


@pytest.mark.skipif(INTERPRET, reason="the attention function dispatches CUDA tensors to the kernel")
def test_attention_function_runs_the_kernel_at_batch_one():
    """emit/attention.py's function at batch 1 (4 kv heads: below the rows SDPA's fold needs) with transformers'
    4-D bool mask: the op runs, and the output equals SDPA on keys and values repeated per query head."""
    from moe_compile.emit.attention import gqa_sdpa_attention

    class Attention(torch.nn.Module):
        num_key_value_groups = 8

    query, key, value = _inputs(1, 4, 8, 300, 128, 128, torch.bfloat16, seed=3)
    query = query.reshape(1, 32, 1, 128)
    mask = torch.zeros(1, 1, 1, 320, dtype=torch.bool, device=DEVICE)  # longer than the cache: sliced
    mask[..., :200] = True
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out, _ = gqa_sdpa_attention(Attention(), query, key, value, mask, scaling=0.09)
    assert any(e.name == "moe_compile::gqa_decode_attention" for e in prof.events())
    repeated = [t.float().repeat_interleave(8, dim=1) for t in (key, value)]
    ref = torch.nn.functional.scaled_dot_product_attention(query.float(), *repeated, attn_mask=mask[..., :300],
                                                           scale=0.09).transpose(1, 2)
    assert out.shape == (1, 1, 32, 128) and relative_error(out, ref) < TOLERANCES[torch.bfloat16]
