"""GPU tests of the `triton` backend of `fused_moe` against the reference.

Each case of the table names the edge it covers. Expected values come from the reference run in fp32 on the same
(rounded) weights, with the router weight kept in the model dtype so both sides route identically; the error is
||out - ref|| / ||ref||, bounded per dtype (TOLERANCES). Runs on a CUDA GPU, or on CPU through Triton's interpreter
with TRITON_INTERPRET=1 (small cases only).

Dimension legend: T = tokens, E = experts, K = top_k, H = hidden, I = intermediate.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1 for Triton's CPU interpreter)", allow_module_level=True)
try:
    from moe_compile.kernels import reference
    from moe_compile.kernels.triton import configs
    from moe_compile.kernels.triton.align import align_by_expert, max_tiles
    from moe_compile.kernels.triton_moe import UnsupportedByTriton, _route, triton_experts, triton_fused_moe
except ImportError as exc:
    pytest.skip(f"triton backend unavailable: {exc}", allow_module_level=True)

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative L2 error bound per dtype: bf16 operands and one bf16 rounding of the intermediate land at 2-5e-3;
# fp16 has 3 more mantissa bits; fp32 runs full-precision dots ("ieee")
TOLERANCES = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-4}
DEFAULTS = dict(scoring="softmax", renormalize=True, n_group=1, topk_group=1, routed_scaling=1.0,
                weight_on_input=False, activation="silu", gated=True, expert_bias=False, router_bias=False,
                correction_bias=False, alpha=1.702, limit=7.0)

# (T, E, K, H, I, overrides)  # edge covered
CASES = [
    (1, 8, 2, 128, 64, {}),  # decode: one token (routing + tiles in one launch), Mixtral-like routing
    (1, 256, 8, 160, 96, dict(scoring="sigmoid", n_group=8, topk_group=4, correction_bias=True,
                              routed_scaling=2.5)),  # DeepSeek-V3 routing at one token
    (2, 512, 16, 64, 32, {}),  # the largest E and K the design asks for, two tokens
    (7, 32, 4, 97, 61, dict(activation="gelu", scoring="sigmoid")),  # odd H and I: tail masks on every tile edge
    (64, 128, 8, 256, 96, {}),  # Qwen3-like E/K: many experts get no token
    (513, 256, 8, 128, 64, dict(scoring="sigmoid", n_group=8, topk_group=4, correction_bias=True,
                                routed_scaling=2.5)),  # DeepSeek-V3 grouped top-k; T one past a power of two
    (64, 32, 4, 192, 160, dict(activation="swiglu_oai", expert_bias=True, router_bias=True)),  # GPT-OSS epilogue
    # Llama4: K=1, weight on input
    (64, 16, 1, 128, 64, dict(scoring="sigmoid", weight_on_input=True, renormalize=False)),
    (33, 8, 2, 128, 64, dict(activation="relu", gated=False)),  # ungated experts [E, I, H]
    (17, 8, 2, 64, 48, dict(activation="gelu_tanh", renormalize=False)),  # gelu_tanh, unnormalised softmax weights
    (2048, 8, 2, 512, 256, {}),  # prefill regime: 512 rows per expert, BLOCK_M = 128
    (8192, 128, 8, 256, 128, {}),  # 8192 tokens: 64K routed rows, hundreds of tiles
]
SMALL = [c for c in CASES if c[0] * c[3] <= 64 * 256 and c[1] <= 128]  # what the CPU interpreter can afford


def make_inputs(T, E, K, H, I, dtype, **overrides):
    o = {**DEFAULTS, **overrides}
    g = torch.Generator(device="cpu").manual_seed(T * 7919 + E * 31 + K)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)

    w13_rows = 2 * I if o["gated"] else I
    tensors = dict(
        x=rand(T, H), router_weight=rand(E, H, scale=H**-0.5),
        router_bias=rand(E) if o["router_bias"] else None,
        correction_bias=(torch.rand(E, generator=g) * 0.5).to(DEVICE) if o["correction_bias"] else None,
        w13=rand(E, w13_rows, H, scale=H**-0.5), w2=rand(E, H, I, scale=I**-0.5),
        b13=rand(E, w13_rows, scale=0.5) if o["expert_bias"] else None,
        b2=rand(E, H, scale=0.5) if o["expert_bias"] else None,
    )
    scalars = dict(top_k=K, scoring=o["scoring"], renormalize=o["renormalize"], n_group=o["n_group"],
                   topk_group=o["topk_group"], routed_scaling=o["routed_scaling"],
                   weight_on_input=o["weight_on_input"], activation=o["activation"], alpha=o["alpha"], limit=o["limit"])
    return tensors, scalars


def fp32_reference(tensors, scalars):
    """The reference in fp32 on the same weights; the router stays in the model dtype so routing is identical."""
    keep = ("router_weight", "router_bias")
    up = {k: (v.float() if v is not None and k not in keep else v) for k, v in tensors.items()}
    return reference.torch_fused_moe(**up, **scalars)


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def check(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite output"
    err = rel_err(out, ref)
    assert err < TOLERANCES[dtype], f"relative error {err:.2e} >= {TOLERANCES[dtype]:.0e}"


@pytest.mark.parametrize("case", SMALL if INTERPRET else CASES,
                         ids=lambda c: f"T{c[0]}-E{c[1]}-K{c[2]}-H{c[3]}-I{c[4]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16] if not INTERPRET else [torch.float16])
def test_matches_reference(case, dtype):
    T, E, K, H, I, overrides = case
    tensors, scalars = make_inputs(T, E, K, H, I, dtype, **overrides)
    check(triton_fused_moe(**tensors, **scalars), fp32_reference(tensors, scalars), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("case", [CASES[3], CASES[6], CASES[5]], ids=["odd-gelu", "gpt-oss", "deepseek-513"])
def test_other_dtypes(case, dtype):  # fp16 and fp32: other dot precisions, output casts, fp32 shared memory
    T, E, K, H, I, overrides = case
    tensors, scalars = make_inputs(T, E, K, H, I, dtype, **overrides)
    check(triton_fused_moe(**tensors, **scalars), fp32_reference(tensors, scalars), dtype)


@pytest.mark.parametrize("T", [3, 300])
def test_all_tokens_on_one_expert(T):
    """Every token's choices include expert 3 (K=1: only expert 3): one expert spans many tiles, the rest none."""
    E, H, I, dtype = 16, 64, 48, torch.bfloat16 if not INTERPRET else torch.float16
    tensors, _ = make_inputs(T, E, 1, H, I, dtype)
    ids = torch.full((T, 1), 3, device=DEVICE)
    weights = torch.rand(T, 1, device=DEVICE)
    x, w13, w2 = tensors["x"], tensors["w13"], tensors["w2"]
    out = triton_experts(x, weights, ids, w13, w2, None, None, False, "silu", 1.702, 7.0)
    ref = reference.torch_experts(x.float(), weights, ids, w13.float(), w2.float(), None, None, False, "silu",
                                  1.702, 7.0)
    check(out, ref, dtype)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "swiglu_oai", "gelu"])
def test_large_activations_stay_finite(activation):
    """Inputs x1000 push gate pre-activations to ~1e3-1e4: exp overflow must give 0 or 1, never NaN."""
    tensors, scalars = make_inputs(16, 8, 2, 64, 32, torch.float32 if INTERPRET else torch.bfloat16,
                                   activation=activation)
    tensors["x"] = tensors["x"] * 1000
    out = triton_fused_moe(**tensors, **scalars)
    ref = fp32_reference(tensors, scalars)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("T,E,K,block_m", [(1, 128, 8, 16), (13, 7, 3, 16), (600, 64, 4, 64), (5, 4, 4, 128)])
def test_alignment_invariants(T, E, K, block_m):
    """Slots hold every routed row exactly once, each tile one expert's rows, pads = N, tiles within the bound."""
    ids = torch.stack([torch.randperm(E, device=DEVICE)[:K] for _ in range(T)])  # [T, K] distinct per token
    n = T * K
    sorted_rows, tile_expert, num_tiles = align_by_expert(ids, E, block_m)
    assert num_tiles == max_tiles(n, E, block_m) and sorted_rows.numel() == num_tiles * block_m
    tiles = sorted_rows.view(num_tiles, block_m).cpu()
    experts = tile_expert.cpu()
    used = experts >= 0
    assert used.any() and (~used[: int(used.sum())]).sum() == 0, "used tiles must come first"
    rows = tiles[used]
    real = rows[rows < n]
    assert torch.equal(real.sort().values, torch.arange(n, dtype=real.dtype)), "not a permutation of the rows"
    assert (rows[rows >= n] == n).all(), "pad slots must hold the sentinel N"
    flat = ids.reshape(-1).cpu()
    for tile, expert in zip(tiles[used], experts[used]):
        assert (flat[tile[tile < n].long()] == expert).all()
    counts = torch.bincount(flat, minlength=E)
    assert int(used.sum()) == int(((counts + block_m - 1) // block_m).sum())


# (T, E, K, scoring, renormalize, n_group, topk_group, correction_bias, routed_scaling, logits dtype)
ROUTE_CASES = [
    (1, 128, 8, "softmax", True, 1, 1, False, 1.0, torch.bfloat16),  # Qwen3 decode: the fused-align path
    (37, 128, 8, "softmax", True, 1, 1, False, 1.0, torch.bfloat16),  # bf16 logits: many exact ties
    (5, 512, 16, "softmax", False, 1, 1, False, 1.0, torch.float16),  # largest E and K
    (9, 256, 8, "sigmoid", True, 8, 4, True, 2.5, torch.bfloat16),  # DeepSeek-V3 grouped top-k, e-bias
    (1, 256, 8, "sigmoid", True, 8, 4, True, 2.5, torch.bfloat16),  # ... at one token
    (6, 60, 6, "softmax", True, 4, 2, False, 1.0, torch.float32),  # groups of 15 (not a power of two)
    (4, 96, 4, "sigmoid", False, 96, 8, True, 1.0, torch.float32),  # groups of one expert (top-1 per group)
    (3, 7, 7, "softmax", True, 1, 1, False, 1.0, torch.float32),  # K = E, odd E
]


@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-K{c[2]}-{c[3]}-g{c[5]}")
def test_routing_kernel_matches_reference(case):
    """Same experts as reference.route (as sets: order among equal scores may differ; torch's CPU topk breaks ties
    differently from its CUDA one), same weights; at one token
    the fused tiles satisfy align_by_expert's contract; the output rows are zeroed."""
    T, E, K, scoring, renorm, n_group, topk_group, corr, scaling, dtype = case
    g = torch.Generator(device="cpu").manual_seed(T * 131 + E)
    logits = torch.randn(T, E, generator=g).to(DEVICE, dtype)
    cb = (torch.rand(E, generator=g) * 0.3).to(DEVICE) if corr else None
    ref_w, ref_ids = reference.route(logits, cb, K, scoring, renorm, n_group, topk_group, scaling)
    zero = torch.full((T, 37), float("nan"), device=DEVICE)
    block_m = 4 if T == 1 else 0
    w, ids, aligned = _route(logits, cb, K, scoring, renorm, n_group, topk_group, scaling, zero, block_m)
    ours, ref = ids.long().sort(dim=1).values.cpu(), ref_ids.sort(dim=1).values.cpu()
    for t in range(T):  # a different set only by swapping experts of equal logits (ties broken differently)
        if not torch.equal(ours[t], ref[t]):
            only_ours = sorted(set(ours[t].tolist()) - set(ref[t].tolist()))
            only_ref = sorted(set(ref[t].tolist()) - set(ours[t].tolist()))
            lt = logits[t].float().cpu()
            assert torch.equal(lt[only_ours].sort().values, lt[only_ref].sort().values), f"token {t}: not a tie"
    assert torch.allclose(w.sort(dim=1).values, ref_w.sort(dim=1).values, rtol=1e-5, atol=1e-7)
    assert (zero == 0).all()
    if T == 1:
        sorted_rows, tile_expert, num_tiles = aligned
        assert num_tiles == max_tiles(K, E, block_m) == K
        assert torch.equal(tile_expert.long().cpu(), ref_ids[0].sort().values.cpu())
        tiles = sorted_rows.view(K, block_m).cpu()
        assert (tiles[:, 1:] == K).all()
        assert torch.equal(ids[0, tiles[:, 0].long()].cpu(), tile_expert.cpu())


KERNEL_CONFIGS = {
    "gemv-bm1": configs.gemv_config(48, 8, 97, 61, 0, 1),
    "gemv-bm2": configs.gemv_config(48, 8, 97, 61, 0, 2),
    "gemv-bm8": configs.MoEConfig(8, configs.GemmConfig(4, 64, 4, 1), configs.GemmConfig(8, 32, 2, 1), 1, True, True),
    "mma-bm16": configs.select_config(48, 8, 97, 61, 0, allow_gemv=False),
}


@pytest.mark.parametrize("name", list(KERNEL_CONFIGS))
@pytest.mark.parametrize("overrides", [{}, dict(activation="swiglu_oai", expert_bias=True, weight_on_input=True)],
                         ids=["silu", "gpt-oss-w-on-input"])
def test_decode_kernels_on_crowded_experts(name, overrides):
    """24 tokens x 2 of 8 experts: ~6 rows per expert, so one expert spans several GEMV tiles; odd H and I."""
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    tensors, scalars = make_inputs(24, 8, 2, 97, 61, dtype, **overrides)
    logits = reference.router_logits(tensors["x"], tensors["router_weight"], tensors["router_bias"])
    weights, ids = reference.route(logits, None, 2, "softmax", True, 1, 1, 1.0)
    t = tensors
    out = triton_experts(t["x"], weights, ids, t["w13"], t["w2"], t["b13"], t["b2"], scalars["weight_on_input"],
                         scalars["activation"], scalars["alpha"], scalars["limit"], config=KERNEL_CONFIGS[name])
    up = {k: (v.float() if v is not None else None) for k, v in t.items()}
    ref = reference.torch_experts(up["x"], weights, ids, up["w13"], up["w2"], up["b13"], up["b2"],
                                  scalars["weight_on_input"], scalars["activation"], scalars["alpha"], scalars["limit"])
    check(out, ref, dtype)


def test_strided_weights():
    """A w13 that is not contiguous along H (the GEMV kernels, when selected, hand such weights to the tensor-core
    kernels, which take any strides)."""
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    tensors, scalars = make_inputs(1, 8, 2, 64, 32, dtype)
    tensors["w13"] = tensors["w13"].transpose(1, 2).contiguous().transpose(1, 2)  # same values, H not contiguous
    check(triton_fused_moe(**tensors, **scalars), fp32_reference(tensors, scalars), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("T", [1, 4, 40, 600])
def test_cuda_graph_replay_follows_routing(T):
    """Capture once, replay with new inputs (so new routing): every replay matches the reference."""
    dtype = torch.bfloat16
    tensors, scalars = make_inputs(T, 64, 6, 128, 64, dtype)
    static_x = tensors["x"].clone()
    args = {**tensors, "x": static_x}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles the kernels outside the capture
        triton_fused_moe(**args, **scalars)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = triton_fused_moe(**args, **scalars)
    for seed in range(3):
        static_x.copy_(torch.randn(static_x.shape, generator=torch.Generator().manual_seed(seed)).to(static_x))
        graph.replay()
        check(static_out, fp32_reference({**tensors, "x": static_x}, scalars), dtype)


def test_through_the_op():
    """`torch.ops.moe_compile.fused_moe(..., backend="triton")` runs this backend; `auto` prefers it on CUDA."""
    from moe_compile.kernels.op import select_backend

    dtype = torch.float16 if INTERPRET else torch.bfloat16
    tensors, scalars = make_inputs(5, 8, 2, 64, 32, dtype)
    out = torch.ops.moe_compile.fused_moe(*tensors.values(), *scalars.values(), backend="triton")
    check(out, fp32_reference(tensors, scalars), dtype)
    if DEVICE == "cuda":
        assert select_backend("auto", torch.device("cuda")) in ("triton", "cuda")


def test_unsupported_case_names_the_fallback():
    tensors, scalars = make_inputs(4, 8, 2, 64, 32, torch.float16)
    tensors["w2"] = tensors["w2"].float()  # mixed expert dtypes: no kernel for that
    with pytest.raises(UnsupportedByTriton, match="backend='reference'"):
        triton_fused_moe(**tensors, **scalars)
