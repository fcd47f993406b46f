"""Tests of the `cuda` backend's FP8 W8A8 path: `fused_moe_packed` with e4m3 expert weights (per-output-channel
scales) and dynamic FP8 activations in the persistent decode kernel (csrc/moe_decode_fp8.cuh).

Expected values: the emulated reference experts (`reference.torch_experts` on the dequantized weights, each GEMM
input quantized per row to e4m3 and back, as `reference.torch_fused_moe_packed`) routed as the kernel routed (its
router is the 16-bit path's, whose selection test_cuda_moe.py checks; here the selection is also checked against
`reference.route` up to near-ties). The kernel scales the intermediate per 32-column block of a routed row rather
than per row (a finer scale), and dequantizes in fp32 rather than rounding weights to x's dtype, so it differs from the
reference by FP8 rounding noise: the bound is test_triton_packed.py's FP8 one (relative L2 error 5e-2).

Dimension legend: T = tokens, E = experts, K = top_k, H = hidden, I = intermediate.
"""

from __future__ import annotations

import pytest
import torch

from moe_compile.kernels import op, reference
from moe_compile.quant.fp8 import fake_quant_per_token, quantize_per_channel
from moe_compile.quant.packed import unpack_weight
from moe_compile.quant.sparse24 import compress_24
from tests.kernels.test_cuda_moe import (
    DEEPSEEK,
    GPT_OSS,
    case_id,
    check_output,
    check_routing,
    cuda_moe,
    gpu,
    logit_ulp,
    make_inputs,
    reference_routing,
)

FP8_TOLERANCE = 5e-2
TENSORS = ("x", "router_weight", "router_bias", "correction_bias", "w13", "w2", "b13", "b2")

# (T, E, K, H, I, overrides)  # edge covered
CASES = [
    (1, 128, 8, 256, 96, {}),  # Qwen3-30B-A3B routing at one token, scaled down; most experts get no token
    (1, 8, 2, 128, 224, {}),  # Mixtral: few experts, many I-slices each
    (1, 256, 8, 448, 128, DEEPSEEK),  # grouped sigmoid routing, correction bias, routed scaling
    (1, 32, 4, 192, 160, GPT_OSS),  # clamped SwiGLU, expert and router biases
    (7, 32, 4, 97, 61, dict(activation="gelu", scoring="sigmoid")),  # odd H and I: byte loads, tail chunks
    (3, 16, 4, 104, 40, {}),  # H, I multiples of 8 but not 16: the byte-load path with even sizes
    (2, 512, 16, 64, 32, {}),  # the largest E and K
    (16, 8, 2, 128, 64, {}),  # up to 16 rows on one expert: two n-tiles
    (12, 32, 4, 288, 288, GPT_OSS),  # several rows per expert, biases
    (16, 128, 8, 256, 96, {}),  # the token limit
    (5, 8, 2, 128, 64, dict(activation="relu", gated=False)),  # ungated experts [E, I, H]
    (1, 4, 1, 8, 8, {}),  # tiny: one partial chunk of H and of I
]


def fp8_case(case, dtype, seed=0):
    """(tensors with e4m3 w13 / w2, their scales, scalars) from make_inputs' random 16-bit case."""
    T, E, K, H, I, overrides = case
    tensors, scalars = make_inputs(T, E, K, H, I, dtype, seed=seed, **overrides)
    tensors["w13"], s13 = quantize_per_channel(tensors["w13"])
    tensors["w2"], s2 = quantize_per_channel(tensors["w2"])
    return tensors, {"w13_scale": s13, "w2_scale": s2}, scalars


def expected_for(tensors, scales, scalars, weights, ids):
    """The emulated FP8 experts for the given routing (reference.torch_fused_moe_packed's expert path)."""
    x = tensors["x"]
    dense13 = unpack_weight(tensors["w13"], scales["w13_scale"], None, x.dtype)
    dense2 = unpack_weight(tensors["w2"], scales["w2_scale"], None, x.dtype)
    s = scalars
    return reference.torch_experts(x, weights, ids.long(), dense13, dense2, tensors["b13"], tensors["b2"],
                                   s["weight_on_input"], s["activation"], s["alpha"], s["limit"], fake_quant_per_token)


def launch_fp8(tensors, scales, scalars, **kwargs):
    return cuda_moe.launch(*(tensors[k] for k in TENSORS), *scalars.values(), with_routing=True, **scales, **kwargs)


def check_case(tensors, scales, scalars, dtype):
    workspace = cuda_moe.new_workspace(*tensors["x"].shape[:1], tensors["w2"].shape[0], torch.device("cuda"))
    out, ids, weights = launch_fp8(tensors, scales, scalars, workspace=workspace)
    assert not cuda_moe.barrier_timed_out(workspace), "the kernel's grid barrier timed out"
    ref_weights, ref_ids, choice = reference_routing(tensors, scalars)
    check_routing(ids, weights, ref_ids, ref_weights, choice, near_tie=2e-2, ulp=logit_ulp(tensors))
    check_output(out, expected_for(tensors, scales, scalars, weights, ids), dtype, tol=FP8_TOLERANCE)
    return out, ids


def packed_args(tensors, scales, scalars, act_quant="fp8_per_token", metas=(None, None)):
    """Positional arguments of fused_moe_packed (reference.torch_fused_moe_packed's order)."""
    return (*(tensors[k] for k in TENSORS), scales["w13_scale"], scales["w2_scale"], *metas,
            *scalars.values(), act_quant)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_matches_the_emulated_reference(case, dtype):
    check_case(*fp8_case(case, dtype), dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T,K", [(3, 1), (16, 2)])
def test_all_tokens_on_one_expert(T, K):
    tensors, scales, scalars = fp8_case((T, 8, K, 128, 64, dict(scoring="sigmoid", correction_bias=True)),
                                        torch.bfloat16)
    tensors["correction_bias"][3] = 100.0
    _, ids = check_case(tensors, scales, scalars, torch.bfloat16)
    assert (ids == 3).any(dim=1).all()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
def test_large_activations_stay_finite(activation):
    """Inputs of magnitude 1e3: per-token and per-block scales keep every e4m3 value in range; no inf or NaN."""
    tensors, scales, scalars = fp8_case((4, 16, 2, 128, 64, dict(activation=activation)), torch.bfloat16)
    tensors["x"] = tensors["x"] * 1000
    check_case(tensors, scales, scalars, torch.bfloat16)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16])
def test_cuda_graph_replay_follows_routing(T):
    """Capture once, replay with new inputs (new routing and new activation scales): each replay matches."""
    tensors, scales, scalars = fp8_case((T, 64, 6, 128, 64, {}), torch.bfloat16)
    static_x = tensors["x"].clone()
    args = packed_args({**tensors, "x": static_x}, scales, scalars)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda_moe.cuda_fused_moe_packed(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = cuda_moe.cuda_fused_moe_packed(*args)
    routings = set()
    for seed in range(3):
        static_x.copy_(torch.randn(static_x.shape, generator=torch.Generator().manual_seed(seed)).to(static_x) * 4)
        static_out.fill_(float("nan"))  # every element must be rewritten by the replay
        graph.replay()
        new = {**tensors, "x": static_x}
        _, ids, weights = launch_fp8(new, scales, scalars)
        check_output(static_out, expected_for(new, scales, scalars, weights, ids), torch.bfloat16, tol=FP8_TOLERANCE)
        routings.add(tuple(ids.flatten().tolist()))
    assert len(routings) == 3, "the replays were meant to route differently"


@gpu
@pytest.mark.gpu
def test_through_the_op_and_auto():
    """Registered (MOE_COMPILE_CUDA_BACKEND=1), `fused_moe_packed(..., backend="cuda")` runs this kernel, and `auto`
    prefers it on a Hopper GPU."""
    tensors, scales, scalars = fp8_case((5, 8, 2, 64, 32, {}), torch.bfloat16)
    op.register_packed_backend("cuda", cuda_moe.cuda_fused_moe_packed)
    try:
        args = packed_args(tensors, scales, scalars)
        via_op = torch.ops.moe_compile.fused_moe_packed(*args, backend="cuda")
        assert torch.equal(via_op, cuda_moe.cuda_fused_moe_packed(*args))
        assert torch.equal(torch.ops.moe_compile.fused_moe_packed(*args), via_op)  # auto
    finally:
        op._PACKED_BACKENDS.pop("cuda", None)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("what", ["sparse24", "tokens"])
def test_other_packed_cases_run_triton(what):
    """FP8 + 2:4 weights, or 40 tokens: a stated reason, and triton's result."""
    from moe_compile.kernels.triton_packed import triton_fused_moe_packed

    T = 40 if what == "tokens" else 4
    tensors, scales, scalars = fp8_case((T, 16, 2, 128, 64, {}), torch.bfloat16)
    metas = (None, None)
    if what == "sparse24":
        dense = {k: unpack_weight(tensors[k], scales[f"{k}_scale"], None, torch.bfloat16) for k in ("w13", "w2")}
        (tensors["w13"], m13), (tensors["w2"], m2) = compress_24(dense["w13"]), compress_24(dense["w2"])
        tensors["w13"], scales["w13_scale"] = quantize_per_channel(tensors["w13"])
        tensors["w2"], scales["w2_scale"] = quantize_per_channel(tensors["w2"])
        metas = (m13, m2)
    args = packed_args(tensors, scales, scalars, metas=metas)
    assert {"sparse24": "2:4", "tokens": "40 tokens"}[what] in unsupported(args, scalars)
    assert torch.equal(cuda_moe.cuda_fused_moe_packed(*args), triton_fused_moe_packed(*args))


@gpu
@pytest.mark.gpu
def test_fp8_weights_with_16_bit_activations_fall_back_to_the_reference():
    """W8A16 is no kernel's case (triton's packed kernels run W8A8 too): the reason is stated, and through the op
    `auto` runs the reference instead."""
    tensors, scales, scalars = fp8_case((4, 16, 2, 128, 64, {}), torch.bfloat16)
    args = packed_args(tensors, scales, scalars, act_quant="none")
    assert "act_quant" in unsupported(args, scalars)
    with pytest.raises(op.BackendUnsupported, match="reference"):
        cuda_moe.cuda_fused_moe_packed(*args)
    op.register_packed_backend("cuda", cuda_moe.cuda_fused_moe_packed)
    try:
        assert torch.equal(torch.ops.moe_compile.fused_moe_packed(*args),
                           reference.torch_fused_moe_packed(*args))
    finally:
        op._PACKED_BACKENDS.pop("cuda", None)


def unsupported(args, scalars) -> str:
    return cuda_moe.packed_unsupported_reason(*args[:12], scalars["top_k"], scalars["n_group"], scalars["topk_group"],
                                             scalars["weight_on_input"], scalars["activation"], args[-1])
