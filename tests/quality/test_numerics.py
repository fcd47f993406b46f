"""FP8 and 2:4 numerics (moe_compile.quant) and the `fused_moe_packed` op's reference."""

from __future__ import annotations

import pytest
import torch

from moe_compile.kernels import reference
from moe_compile.quant import (FP8_DTYPE, compress_24, decompress_24, dequantize_per_channel, is_24_sparse, mask_24,
                               prune_24, quantize_per_channel, quantize_per_token, sqnr)
from tests.quality.conftest import QUALITY_LIMITS


def test_fp8_per_channel_weights():
    w = torch.randn(8, 192, 128) * torch.logspace(-2, 1, 192).unsqueeze(-1)  # channels of very different scale
    q, scale = quantize_per_channel(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and scale.shape == (8, 192) and scale.dtype == torch.float32
    assert sqnr(w, dequantize_per_channel(q, scale)) > QUALITY_LIMITS["fp8_weight_min_sqnr_db"]
    # each row's largest magnitude maps to the e4m3 maximum, so per-channel scaling uses the full range
    assert torch.allclose(q.float().abs().amax(-1), torch.full((8, 192), 448.0))
    zero_q, zero_scale = quantize_per_channel(torch.zeros(2, 3, 4))  # an all-zero row: no division by zero
    assert torch.equal(dequantize_per_channel(zero_q, zero_scale), torch.zeros(2, 3, 4))


def test_fp8_per_token_activations_are_dynamic():
    x = torch.randn(16, 64) * torch.logspace(-3, 3, 16).unsqueeze(-1)  # tokens of wildly different magnitude
    q, scale = quantize_per_token(x)
    assert scale.shape == (16,)
    assert sqnr(x, dequantize_per_channel(q, scale)) > QUALITY_LIMITS["fp8_weight_min_sqnr_db"]


@pytest.mark.parametrize("shape", [(8, 192, 128), (3, 5, 12), (4, 40)])  # 12: odd group count (padded metadata)
def test_24_pattern_and_round_trip(shape):
    w = torch.randn(shape)
    pruned = prune_24(w)
    groups = (pruned != 0).reshape(*shape[:-1], -1, 4).sum(-1)
    assert bool((groups == 2).all())  # exactly 2 non-zeros per group of 4 (random weights have no zeros)
    assert is_24_sparse(pruned) and not is_24_sparse(w)
    kept = w.abs().reshape(*shape[:-1], -1, 4)
    mask = mask_24(w).reshape(kept.shape)
    assert bool((kept[mask].reshape(*kept.shape[:-1], 2).amin(-1) >= kept[~mask].reshape(*kept.shape[:-1], 2)
                 .amax(-1)).all())  # the kept pair is the largest pair
    values, meta = compress_24(w)
    assert values.shape == (*shape[:-1], shape[-1] // 2) and meta.dtype == torch.uint8
    assert meta.shape == (*shape[:-1], (shape[-1] // 4 + 1) // 2)
    assert torch.equal(decompress_24(values, meta), pruned)
    assert torch.equal(reference.sparse24_decompress_reference(values, meta), pruned)


def test_24_compression_in_chunks_is_the_same(monkeypatch):
    """compress_24 works through a large weight a few rows at a time (bounded temporaries: one MoE layer's experts
    ran an 80 GB GPU out of memory before): chunks that split the leading dims give the same values and metadata."""
    import moe_compile.quant.chunks as chunks

    w = torch.randn(3, 7, 24, dtype=torch.bfloat16)
    whole = compress_24(w)
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 5 * 24)  # 5 rows a chunk: chunks straddle experts
    chunked = compress_24(w)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
    assert torch.equal(decompress_24(*chunked), prune_24(w))


def test_fp8_quantization_in_chunks_is_the_same(monkeypatch):
    """quantize_rows works a few rows at a time (a DeepSeek-V3 layer's fp32 copy alone is 28 GB): chunked results,
    with computed and with given scales, equal the one-shot formula."""
    import moe_compile.quant.chunks as chunks
    from moe_compile.quant.fp8 import E4M3_MAX, quantize_rows

    w = torch.randn(3, 7, 24, dtype=torch.bfloat16)
    scale = (w.float().abs().amax(-1) / E4M3_MAX).clamp(min=1e-12)
    expected = (w.float() / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 5 * 24)  # 5 rows a chunk: chunks straddle experts
    for given in (None, scale * 2):
        q, s = quantize_rows(w, given)
        want_scale = scale if given is None else given
        want = expected if given is None else (w.float() / given.unsqueeze(-1)).to(FP8_DTYPE)
        assert torch.equal(s, want_scale) and torch.equal(q.view(torch.uint8), want.view(torch.uint8))


def test_unpacking_in_chunks_is_the_same(monkeypatch):
    """unpack_weight (dequantize, decompress) a few rows at a time equals the whole-tensor formula, FP8 + 2:4."""
    import moe_compile.quant.chunks as chunks
    from moe_compile.quant.packed import unpack_weight

    values, meta = compress_24(torch.randn(3, 7, 24))
    q, scale = quantize_per_channel(values)
    expected = decompress_24(dequantize_per_channel(q, scale, torch.float32), meta).to(torch.bfloat16)
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 5 * 24)  # 5 rows a chunk: chunks straddle experts
    assert torch.equal(unpack_weight(q, scale, meta, torch.bfloat16), expected)


def test_24_needs_multiple_of_four():
    with pytest.raises(ValueError, match="multiple of 4"):
        compress_24(torch.randn(3, 10))


def test_fp8_plus_24_round_trip():
    w = torch.randn(4, 32, 64)
    values, meta = compress_24(w)
    q, scale = quantize_per_channel(values)
    dense = decompress_24(reference.fp8_dequant_reference(q, scale), meta)
    assert is_24_sparse(dense)
    assert sqnr(prune_24(w), dense) > QUALITY_LIMITS["fp8_weight_min_sqnr_db"]


def _op_args(seed=0, T=24, H=32, I=16, E=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    router = torch.randn(E, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    scalars = dict(top_k=2, scoring="softmax", renormalize=True, n_group=1, topk_group=1, routed_scaling=1.0,
                   weight_on_input=False, activation="silu", alpha=1.702, limit=7.0)
    return x, router, w13, w2, scalars


def test_packed_op_with_dense_weights_equals_fused_moe():
    x, router, w13, w2, s = _op_args()
    expected = torch.ops.moe_compile.fused_moe(x, router, None, None, w13, w2, None, None, **s)
    got = torch.ops.moe_compile.fused_moe_packed(x, router, None, None, w13, w2, None, None, None, None, None, None,
                                                 **s)
    assert torch.equal(got, expected)


def test_packed_op_fp8_and_24_match_their_dense_equivalents():
    x, router, w13, w2, s = _op_args(1)
    q13, s13 = quantize_per_channel(w13)
    q2, s2 = quantize_per_channel(w2)
    fp8 = torch.ops.moe_compile.fused_moe_packed(x, router, None, None, q13, q2, None, None, s13, s2, None, None,
                                                 act_quant="fp8_per_token", **s)
    dense = torch.ops.moe_compile.fused_moe(x, router, None, None, w13, w2, None, None, **s)
    assert sqnr(dense, fp8) > QUALITY_LIMITS["fp8_random_op_min_sqnr_db"]
    v13, m13 = compress_24(w13)
    v2, m2 = compress_24(w2)
    sparse = torch.ops.moe_compile.fused_moe_packed(x, router, None, None, v13, v2, None, None, None, None, m13, m2,
                                                    **s)
    pruned = torch.ops.moe_compile.fused_moe(x, router, None, None, prune_24(w13), prune_24(w2), None, None, **s)
    torch.testing.assert_close(sparse, pruned)


def test_packed_op_opcheck():
    x, router, w13, w2, s = _op_args(2, T=5)
    q13, s13 = quantize_per_channel(w13)
    q2, s2 = quantize_per_channel(w2)
    op = torch.ops.moe_compile.fused_moe_packed.default
    args = (x, router, None, None, q13, q2, None, None, s13, s2, None, None, *s.values(), "fp8_per_token")
    torch.library.opcheck(op, args, test_utils=("test_faketensor",))  # schema check mode cannot compare fp8 tensors
    v13, m13 = compress_24(w13)
    v2, m2 = compress_24(w2)
    args = (x, router, None, None, v13, v2, None, None, None, None, m13, m2, *s.values(), "none")
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
