"""Tests of the `triton` backend of `fused_moe_packed` (FP8 W8A8, 2:4, FP8 + 2:4) against the emulated reference.

Expected values come from `reference.torch_fused_moe_packed` on the same packed weights and inputs (fresh random
draws per case); the error is ||out - ref|| / ||ref||. FP8 differs from the reference by the reference's bf16
rounding of dequantized weights and GEMM outputs, which moves a few percent of the intermediate activations across
an e4m3 rounding boundary (one e4m3 step is 6-12%): on an H100 that gave 1.6-2.2e-2 on the benchmark shapes and up to
3.4e-2 on a small test case, hence the wider FP8 bound (2:4 alone: 4.5-4.9e-3). GPU cases are marked `gpu`; a few
small ones also run on CPU through Triton's interpreter (TRITON_INTERPRET=1; fp16 there, its bf16 dot is wrong),
whose fp32 -> e4m3 cast rounds values just below a power of two down instead of up, so its FP8 bound only catches
gross errors.

Dimension legend: T = tokens, E = experts, K = top_k, H = hidden, I = intermediate.
"""

from __future__ import annotations

import os

import pytest
import torch

from moe_compile.quant.fp8 import quantize_per_channel
from moe_compile.quant.sparse24 import compress_24

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1 for Triton's CPU interpreter)", allow_module_level=True)
try:
    from moe_compile.kernels import reference
    from moe_compile.kernels.triton.configs import select_config
    from moe_compile.kernels.triton_packed import (
        PackedFormat,
        UnsupportedPacked,
        as_packed_config,
        check_supported,
        packed_config,
        swapped_decode_config,
        triton_fused_moe_packed,
    )
except ImportError as exc:
    pytest.skip(f"triton packed backend unavailable: {exc}", allow_module_level=True)

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = ("fp8", "sparse24", "fp8+sparse24")
# relative L2 error vs the emulated reference, by (format has FP8, running in the interpreter)
TOLERANCES = {(True, False): 5e-2, (False, False): 1e-2, (True, True): 0.15, (False, True): 3e-3}
SCALARS = dict(top_k=2, scoring="softmax", renormalize=True, n_group=1, topk_group=1, routed_scaling=1.0,
               weight_on_input=False, activation="silu", alpha=1.702, limit=7.0)


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def pack(w13, w2, fmt):
    """Dense expert weights -> the op's packed tensors (w13, w2, w13_scale, w2_scale, w13_meta, w2_meta)."""
    s13 = s2 = m13 = m2 = None
    if "sparse24" in fmt:
        w13, m13 = compress_24(w13)
        w2, m2 = compress_24(w2)
    if "fp8" in fmt:
        w13, s13 = quantize_per_channel(w13)
        w2, s2 = quantize_per_channel(w2)
    return w13, w2, s13, s2, m13, m2


def make_case(T, E, K, H, I, fmt, dtype, seed=0, gated=True, expert_bias=False, hot_expert=None, **overrides):
    """(op args without scalars, scalars): fresh random inputs; hot_expert gets every token's first choice."""
    g = torch.Generator().manual_seed(seed * 1009 + T * 7919 + E * 31 + K)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    rows = 2 * I if gated else I
    router_bias = None
    if hot_expert is not None:
        router_bias = torch.zeros(E, device=DEVICE, dtype=dtype)
        router_bias[hot_expert] = 30.0
    w13, w2, s13, s2, m13, m2 = pack(rand(E, rows, H, scale=H**-0.5), rand(E, H, I, scale=I**-0.5), fmt)
    b13 = rand(E, rows, scale=0.5) if expert_bias else None
    b2 = rand(E, H, scale=0.5) if expert_bias else None
    args = (rand(T, H), rand(E, H, scale=H**-0.5), router_bias, None, w13, w2, b13, b2, s13, s2, m13, m2)
    scalars = {**SCALARS, "top_k": K, **overrides, "act_quant": "fp8_per_token" if "fp8" in fmt else "none"}
    return args, scalars


def check_against_reference(args, scalars, fmt, dtype=torch.bfloat16):
    expected = reference.torch_fused_moe_packed(*args, **scalars)
    got = triton_fused_moe_packed(*args, **scalars)
    assert got.dtype == dtype and got.shape == expected.shape
    assert torch.isfinite(got).all()
    err = rel_err(got, expected)
    assert err < TOLERANCES[("fp8" in fmt, INTERPRET)], f"{fmt}: relative error {err:.2e}"


# (T, E, K, H, I, overrides)  # edge covered
GPU_CASES = [
    (1, 128, 8, 256, 96, {}),  # decode, Qwen3-like E/K: the fused route + tiles path, most experts idle
    (2, 8, 2, 128, 64, {}),  # two tokens, Mixtral-like routing
    (7, 32, 4, 100, 52, dict(activation="gelu", scoring="sigmoid")),  # H, I multiples of 4 but not 8: half meta byte
    (64, 64, 8, 256, 128, dict(expert_bias=True, activation="swiglu_oai")),  # GPT-OSS epilogue, biases
    (513, 16, 2, 192, 96, {}),  # prefill tiles (BLOCK_M 128), T one past a power of two
    (33, 8, 2, 128, 64, dict(gated=False, activation="relu")),  # ungated experts [E, I, H]
    (64, 16, 2, 128, 64, dict(hot_expert=3)),  # every token's first choice on one expert
    (1, 256, 8, 160, 96, dict(scoring="sigmoid", n_group=8, topk_group=4, routed_scaling=2.5)),  # DeepSeek-V3
]


@pytest.mark.skipif(INTERPRET, reason="GPU sizes; the interpreter runs SMALL_CASES")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-K{c[2]}-H{c[3]}-I{c[4]}")
def test_matches_reference(case, fmt):
    T, E, K, H, I, overrides = case
    args, scalars = make_case(T, E, K, H, I, fmt, torch.bfloat16, **overrides)
    check_against_reference(args, scalars, fmt)


@pytest.mark.skipif(INTERPRET, reason="GPU sizes")
@pytest.mark.parametrize("fmt", ["fp8", "fp8+sparse24"])
def test_odd_sizes_and_fp16(fmt):
    """FP8 alone takes any H and I (tail masks on every tile edge); fp16 activations."""
    sizes = (97, 61) if fmt == "fp8" else (100, 44)
    args, scalars = make_case(9, 16, 4, *sizes, fmt, torch.float16)
    check_against_reference(args, scalars, fmt, torch.float16)


@pytest.mark.skipif(INTERPRET, reason="GPU sizes")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tiles", ["chosen", "plain", "swapped", "swapped_in_loop"])
def test_decode_tile_forms_agree(fmt, tiles):
    """Every decode tile form matches the reference: the one packed_config picks, the 16-bit backend's plain tiles
    (FP8 inter quantized inside the down kernel), the swapped wgmma tiles with FP8 inter quantized once, and the
    swapped tiles quantizing inter in the down kernel."""
    T, E, K, H, I = 4, 32, 4, 512, 320  # I not a multiple of the 64-column decode tile
    args, scalars = make_case(T, E, K, H, I, fmt, torch.bfloat16)
    packed_fmt = PackedFormat("fp8" in fmt, "sparse24" in fmt, H, I)
    config = {
        "chosen": packed_config(T * K, E, packed_fmt, 0),
        "plain": as_packed_config(select_config(T * K, E, H, I, 0, allow_gemv=False)),
        "swapped": swapped_decode_config(T * K, E, packed_fmt, 0, quantize_inter=True),
        "swapped_in_loop": swapped_decode_config(T * K, E, packed_fmt, 0, quantize_inter=False),
    }[tiles]
    expected = reference.torch_fused_moe_packed(*args, **scalars)
    err = rel_err(triton_fused_moe_packed(*args, **scalars, config=config), expected)
    assert err < TOLERANCES[("fp8" in fmt, False)], f"{fmt} {tiles}: relative error {err:.2e}"


@pytest.mark.skipif(INTERPRET, reason="GPU sizes")
def test_weight_on_input_sparse24():
    """Llama4-style routing weight on the input (16-bit activations; FP8 refuses it, see test_clear_errors)."""
    args, scalars = make_case(40, 16, 1, 128, 64, "sparse24", torch.bfloat16, weight_on_input=True,
                              scoring="sigmoid", renormalize=False)
    check_against_reference(args, scalars, "sparse24")


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 64])
def test_cuda_graph_replay_follows_new_routing(fmt, T):
    args, scalars = make_case(T, 64, 8, 256, 128, fmt, torch.bfloat16)
    static_x = args[0].clone()
    run = lambda: triton_fused_moe_packed(static_x, *args[1:], **scalars)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed in (1, 2):
        new_x = torch.randn(static_x.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, static_x.dtype)
        static_x.copy_(new_x)
        out.fill_(float("nan"))  # every element must be rewritten by the replay
        graph.replay()
        expected = reference.torch_fused_moe_packed(new_x, *args[1:], **scalars)
        assert rel_err(out, expected) < TOLERANCES[("fp8" in fmt, False)]


@pytest.mark.skipif(INTERPRET, reason="GPU sizes")
def test_op_auto_picks_triton_on_cuda():
    args, scalars = make_case(5, 8, 2, 128, 64, "fp8", torch.bfloat16)
    act_quant = scalars.pop("act_quant")
    via_op = torch.ops.moe_compile.fused_moe_packed(*args, **scalars, act_quant=act_quant)
    direct = triton_fused_moe_packed(*args, **scalars, act_quant=act_quant)
    assert torch.equal(via_op, direct)


# ---- small cases, also on CPU through the interpreter -----------------------------------------------------------

SMALL_CASES = [(1, 8, 2, 64, 32), (5, 4, 2, 32, 16)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: f"T{c[0]}-E{c[1]}")
def test_small_cases(case, fmt):
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    args, scalars = make_case(*case, fmt, dtype)
    check_against_reference(args, scalars, fmt, dtype)


def test_clear_errors_name_the_fallback():
    dtype = torch.float16
    args, scalars = make_case(3, 4, 2, 32, 16, "fp8", dtype)
    x, _, _, _, w13, w2, _, _, s13, s2, m13, m2 = args
    with pytest.raises(UnsupportedPacked, match="act_quant='none'.*backend='reference'"):
        check_supported(x, w13, w2, s13, s2, m13, m2, "silu", "none", False)
    with pytest.raises(UnsupportedPacked, match="weight_on_input"):
        check_supported(x, w13, w2, s13, s2, m13, m2, "silu", "fp8_per_token", True)
    with pytest.raises(UnsupportedPacked, match=r"w13_scale must be fp32 \[4, 32\]"):
        check_supported(x, w13, w2, s13[:, :5], s2, m13, m2, "silu", "fp8_per_token", False)
    # 2:4 storage of a reduction dim that is not a multiple of 4 (H = 6): refused before any launch
    x6 = torch.randn(3, 6, dtype=dtype, device=DEVICE)
    v13 = torch.randn(4, 32, 3, dtype=dtype, device=DEVICE)
    m13 = torch.zeros(4, 32, 1, dtype=torch.uint8, device=DEVICE)
    v2 = torch.randn(4, 6, 8, dtype=dtype, device=DEVICE)
    m2 = torch.zeros(4, 6, 2, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(UnsupportedPacked, match="multiples of 4, got H=6"):
        check_supported(x6, v13, v2, None, None, m13, m2, "silu", "none", False)


def test_auto_falls_back_to_the_reference_on_unsupported_cases():
    """The op's `auto` runs the reference (and says why) for a case the kernels refuse: FP8 weight-only."""
    args, scalars = make_case(3, 4, 2, 32, 16, "fp8", torch.float16 if INTERPRET else torch.bfloat16)
    scalars = {**scalars, "act_quant": "none"}
    expected = reference.torch_fused_moe_packed(*args, **scalars)
    got = torch.ops.moe_compile.fused_moe_packed(*args, **scalars)
    assert torch.equal(got, expected)
