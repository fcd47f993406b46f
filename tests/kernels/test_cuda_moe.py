"""Tests of the `cuda` backend of `fused_moe` (csrc/moe_decode.cu) against the reference.

Two checks per case. Routing: the kernel reports the experts and weights it selected; on inputs whose router
logits are exact in fp32 (small multiples of powers of two) they must equal reference.route's (sets per token; a
different set only by swapping experts of exactly equal selection value). On random inputs the kernel's fp32
logit sums may round to the other side of a bf16 boundary than cuBLAS's, so a token may differ only by a
near-tie. Experts: the output must match the reference run in fp32 with the kernel's own routing, within the
dtype's tolerance (||out - ref|| / ||ref||, as in test_triton_moe.py).

Dimension legend: T = tokens, E = experts, K = top_k, H = hidden, I = intermediate.
"""

from __future__ import annotations

import os

import pytest
import torch

from moe_compile.kernels import op, reference

HAS_CUDA = torch.cuda.is_available()


def import_cuda_backend():
    """Import the opt-in backend for these tests, without leaving it registered: the rest of the suite keeps the
    `auto` choice it expects (a test that needs it through the op registers it itself)."""
    previous = os.environ.get("MOE_COMPILE_CUDA_BACKEND")
    os.environ["MOE_COMPILE_CUDA_BACKEND"] = "1"
    try:
        from moe_compile.kernels import cuda_moe as module
    except ImportError as exc:
        return None, str(exc)
    finally:
        if previous is None:
            os.environ.pop("MOE_COMPILE_CUDA_BACKEND")
        else:
            os.environ["MOE_COMPILE_CUDA_BACKEND"] = previous
    op._BACKENDS.pop("cuda", None)
    op._PACKED_BACKENDS.pop("cuda", None)
    return module, ""


cuda_moe, IMPORT_ERROR = import_cuda_backend()

gpu = pytest.mark.skipif(cuda_moe is None, reason=f"cuda backend unavailable: {IMPORT_ERROR}")
TOLERANCES = {torch.bfloat16: 1e-2, torch.float16: 3e-3}  # as test_triton_moe.py: bf16 operands, fp32 combine
DEFAULTS = dict(scoring="softmax", renormalize=True, n_group=1, topk_group=1, routed_scaling=1.0,
                weight_on_input=False, activation="silu", gated=True, expert_bias=False, router_bias=False,
                correction_bias=False, alpha=1.702, limit=7.0, router_fp32=False)
DEEPSEEK = dict(scoring="sigmoid", n_group=8, topk_group=4, correction_bias=True, routed_scaling=2.5)
GPT_OSS = dict(activation="swiglu_oai", expert_bias=True, router_bias=True)

# (T, E, K, H, I, overrides)  # edge covered
CASES = [
    (1, 128, 8, 256, 96, {}),  # Qwen3-30B-A3B routing at one token, scaled down
    (1, 8, 2, 128, 224, {}),  # Mixtral: few experts, many I-slices each
    (1, 256, 8, 448, 128, DEEPSEEK),  # DeepSeek-V3 grouped sigmoid routing with correction bias and scaling
    (1, 32, 4, 192, 160, GPT_OSS),  # GPT-OSS clamped SwiGLU, expert and router biases
    (7, 32, 4, 97, 61, dict(activation="gelu", scoring="sigmoid")),  # odd H and I: unaligned rows, tail masks
    (2, 512, 16, 64, 32, {}),  # the largest E and K
    (8, 256, 8, 448, 128, dict(DEEPSEEK, router_fp32=True)),  # fp32 router (fp32 logits), 8 tokens
    (16, 128, 8, 256, 96, {}),  # the token limit
    (16, 8, 2, 128, 64, {}),  # up to 16 rows on one expert: two n-tiles
    (12, 32, 4, 288, 288, GPT_OSS),  # GPT-OSS, several rows per expert
    (9, 16, 1, 128, 64, dict(scoring="sigmoid", weight_on_input=True, renormalize=False)),  # Llama4: K=1, w on input
    (5, 8, 2, 128, 64, dict(activation="relu", gated=False)),  # ungated experts [E, I, H]
    (3, 8, 2, 64, 48, dict(activation="gelu_tanh", renormalize=False)),  # gelu_tanh, unnormalised weights
    (4, 96, 4, 72, 40, dict(scoring="sigmoid", n_group=96, topk_group=8, correction_bias=True)),  # groups of one
    (6, 60, 6, 136, 48, dict(n_group=4, topk_group=2)),  # groups of 15 experts, E not a multiple of 32
    (3, 7, 7, 64, 40, {}),  # K = E, odd E
    (1, 4, 1, 8, 8, {}),  # tiny: one 8-wide chunk of H and of I
]


def case_id(c):
    return f"T{c[0]}-E{c[1]}-K{c[2]}-H{c[3]}-I{c[4]}"


def make_inputs(T, E, K, H, I, dtype, exact_logits=False, seed=0, **overrides):
    """Random op inputs on the GPU. exact_logits: x and the router weight are small multiples of 1/8 and 1/16,
    so every fp32 partial sum of a logit is exact and any summation order gives the same rounded logit."""
    o = {**DEFAULTS, **overrides}
    g = torch.Generator(device="cpu").manual_seed(seed * 100003 + T * 7919 + E * 31 + K)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device="cuda", dtype=dt)

    router_dtype = torch.float32 if o["router_fp32"] else dtype
    if exact_logits:
        x = (torch.randint(-3, 4, (T, H), generator=g) / 8).to("cuda", dtype)
        router_weight = (torch.randint(-3, 4, (E, H), generator=g) / 16).to("cuda", router_dtype)
    else:
        x, router_weight = rand(T, H), rand(E, H, scale=H**-0.5, dt=router_dtype)
    w13_rows = 2 * I if o["gated"] else I
    tensors = dict(
        x=x, router_weight=router_weight,
        router_bias=rand(E, dt=router_dtype) if o["router_bias"] else None,
        correction_bias=(torch.rand(E, generator=g) * 0.5).cuda() if o["correction_bias"] else None,
        w13=rand(E, w13_rows, H, scale=H**-0.5), w2=rand(E, H, I, scale=I**-0.5),
        b13=rand(E, w13_rows, scale=0.5) if o["expert_bias"] else None,
        b2=rand(E, H, scale=0.5) if o["expert_bias"] else None,
    )
    scalars = dict(top_k=K, scoring=o["scoring"], renormalize=o["renormalize"], n_group=o["n_group"],
                   topk_group=o["topk_group"], routed_scaling=o["routed_scaling"],
                   weight_on_input=o["weight_on_input"], activation=o["activation"], alpha=o["alpha"], limit=o["limit"])
    return tensors, scalars


def reference_routing(tensors, scalars):
    s = scalars
    logits = reference.router_logits(tensors["x"], tensors["router_weight"], tensors["router_bias"])
    weights, ids = reference.route(logits, tensors["correction_bias"], s["top_k"], s["scoring"], s["renormalize"],
                                   s["n_group"], s["topk_group"], s["routed_scaling"])
    scores = logits.float().softmax(-1) if s["scoring"] == "softmax" else logits.float().sigmoid()
    corr = tensors["correction_bias"]
    choice = scores if corr is None else scores + corr.float()
    return weights, ids, choice


def experts_reference(tensors, scalars, weights, ids):
    """The reference experts in fp32 for the given routing."""
    t = {k: (v.float() if v is not None else None) for k, v in tensors.items()}
    s = scalars
    return reference.torch_experts(t["x"], weights, ids.long(), t["w13"], t["w2"], t["b13"], t["b2"],
                                   s["weight_on_input"], s["activation"], s["alpha"], s["limit"])


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def check_output(out, ref, dtype, tol=None):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite output"
    err = rel_err(out, ref)
    bound = tol or TOLERANCES[dtype]
    assert err < bound, f"relative error {err:.2e} >= {bound:.0e}"


def logit_ulp(tensors):
    """Per token, one unit in the last place of its largest router logit in the router dtype: how far a logit can
    round differently when the kernel's fp32 sum and cuBLAS's straddle a rounding boundary."""
    logits = reference.router_logits(tensors["x"], tensors["router_weight"], tensors["router_bias"])
    top = logits.float().abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.finfo(logits.dtype).eps * torch.exp2(torch.floor(torch.log2(top)))


def check_routing(ids, weights, ref_ids, ref_weights, choice, near_tie, ulp=None):
    """Per token: the same expert set as the reference, or one that swaps experts whose selection values are equal
    (near_tie = 0) or within near_tie of each other; for equal sets, the same weights, to 1e-5, or on random
    inputs (ulp: logit_ulp) to what up to two logits rounded one unit apart change (relative <= 2 ulp each)."""
    ours, ref = ids.long().sort(dim=1), ref_ids.sort(dim=1)
    for t in range(ids.shape[0]):
        if torch.equal(ours.values[t], ref.values[t]):
            w = weights[t].gather(0, ours.indices[t])
            rw = ref_weights[t].gather(0, ref.indices[t])
            rtol = 1e-5 if ulp is None else max(1e-5, 4 * ulp[t].item())
            torch.testing.assert_close(w, rw, rtol=rtol, atol=1e-7)
            continue
        only_ours = sorted(set(ours.values[t].tolist()) - set(ref.values[t].tolist()))
        only_ref = sorted(set(ref.values[t].tolist()) - set(ours.values[t].tolist()))
        a, b = choice[t, only_ours].sort().values, choice[t, only_ref].sort().values
        gap = (a - b).abs().max().item()
        assert gap <= near_tie * choice[t].abs().max().item(), (
            f"token {t}: kernel picked {only_ours}, reference {only_ref}: selection values differ by {gap:.3e}")


def run_case(case, dtype, seed=0):
    T, E, K, H, I, overrides = case
    tensors, scalars = make_inputs(T, E, K, H, I, dtype, seed=seed, **overrides)
    workspace = cuda_moe.new_workspace(T, E, torch.device("cuda"))
    out, ids, weights = cuda_moe.launch(*tensors.values(), *scalars.values(), with_routing=True, workspace=workspace)
    assert not cuda_moe.barrier_timed_out(workspace), "the kernel's grid barrier timed out"
    ref_weights, ref_ids, choice = reference_routing(tensors, scalars)
    check_routing(ids, weights, ref_ids, ref_weights, choice, near_tie=2e-2, ulp=logit_ulp(tensors))
    check_output(out, experts_reference(tensors, scalars, weights, ids), dtype)
    return tensors, scalars, out


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_matches_reference(case, dtype):
    run_case(case, dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_routing_is_the_references_on_exact_logits(case):
    """Logits exact in fp32: the kernel must select exactly what reference.route selects (ties: equal values)."""
    T, E, K, H, I, overrides = case
    tensors, scalars = make_inputs(T, E, K, H, I, torch.bfloat16, exact_logits=True, **overrides)
    out, ids, weights = cuda_moe.launch(*tensors.values(), *scalars.values(), with_routing=True)
    ref_weights, ref_ids, choice = reference_routing(tensors, scalars)
    check_routing(ids, weights, ref_ids, ref_weights, choice, near_tie=0.0)
    check_output(out, experts_reference(tensors, scalars, weights, ids), torch.bfloat16)


@gpu
@pytest.mark.gpu
def test_fresh_inputs_every_call():
    """Several calls in a row with new inputs: the kernel leaves its counters and logits buffer clean each time."""
    for seed in range(4):
        for case in (CASES[0], CASES[2], CASES[8]):
            run_case(case, torch.bfloat16, seed=seed)


@gpu
@pytest.mark.gpu
def test_workspace_is_left_zeroed_for_reuse():
    """One workspace through launches of different sizes: each leaves counters and logit sums zero again, and the
    results stay right (the op allocates a fresh one per call; a caller may keep one)."""
    workspace = cuda_moe.new_workspace(16, 256, torch.device("cuda"))
    for case in (CASES[2], CASES[4], CASES[7], CASES[0]):
        T, E, K, H, I, overrides = case
        tensors, scalars = make_inputs(T, E, K, H, I, torch.bfloat16, **overrides)
        out, ids, weights = cuda_moe.launch(*tensors.values(), *scalars.values(), with_routing=True,
                                            workspace=workspace)
        # slot 1 is the barrier's generation, which only counts up; the rest must be zero again
        left = torch.cat([workspace[:1], workspace[2:]])
        assert torch.count_nonzero(left).item() == 0, f"{case_id(case)} left the workspace dirty"
        check_output(out, experts_reference(tensors, scalars, weights, ids), torch.bfloat16)


@gpu
@pytest.mark.gpu
def test_a_call_keeps_no_device_memory():
    """Nothing outlives a call (what CUDA-graph capture under cudagraph trees requires): once the output is freed,
    the allocated device memory is what it was, on the first call of a new size and on the next."""
    tensors, scalars = make_inputs(6, 60, 6, 136, 48, torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(2):
        out = cuda_moe.cuda_fused_moe(**tensors, **scalars)
        assert torch.cuda.memory_allocated() > before
        del out
        assert torch.cuda.memory_allocated() == before


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T,K", [(3, 1), (16, 2)])
def test_all_tokens_on_one_expert(T, K):
    """A correction bias of 100 on expert 3 puts every token there (and K - 1 others); the other experts of the
    layer get no token."""
    tensors, scalars = make_inputs(T, 8, K, 128, 64, torch.bfloat16, scoring="sigmoid", correction_bias=True)
    tensors["correction_bias"][3] = 100.0
    out, ids, weights = cuda_moe.launch(*tensors.values(), *scalars.values(), with_routing=True)
    assert (ids == 3).any(dim=1).all()
    ref_weights, ref_ids, choice = reference_routing(tensors, scalars)
    check_routing(ids, weights, ref_ids, ref_weights, choice, near_tie=2e-2, ulp=logit_ulp(tensors))
    check_output(out, experts_reference(tensors, scalars, weights, ids), torch.bfloat16)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "swiglu_oai", "gelu"])
def test_large_activations_stay_finite(activation):
    """Inputs x1000 push gate pre-activations to ~1e3-1e4: exp overflow must give 0 or 1, never NaN."""
    tensors, scalars = make_inputs(8, 8, 2, 64, 32, torch.bfloat16, activation=activation)
    tensors["x"] = tensors["x"] * 1000
    out, ids, weights = cuda_moe.launch(*tensors.values(), *scalars.values(), with_routing=True)
    assert torch.isfinite(out).all()
    assert rel_err(out, experts_reference(tensors, scalars, weights, ids)) < 2e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4, 16])
def test_cuda_graph_replay_follows_routing(T):
    """Capture once, replay with new inputs (so new routing): every replay matches the reference."""
    dtype = torch.bfloat16
    tensors, scalars = make_inputs(T, 64, 6, 128, 64, dtype)
    static_x = tensors["x"].clone()
    args = {**tensors, "x": static_x}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda_moe.cuda_fused_moe(**args, **scalars)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = cuda_moe.cuda_fused_moe(**args, **scalars)
    routings = set()
    for seed in range(3):
        static_x.copy_(torch.randn(static_x.shape, generator=torch.Generator().manual_seed(seed)).to(static_x))
        graph.replay()
        new = {**tensors, "x": static_x}
        weights, ids, choice = reference_routing(new, scalars)
        ours = cuda_moe.launch(*new.values(), *scalars.values(), with_routing=True)
        check_routing(ours[1], ours[2], ids, weights, choice, near_tie=2e-2, ulp=logit_ulp(new))
        check_output(static_out, experts_reference(new, scalars, ours[2], ours[1]), dtype)
        routings.add(tuple(ours[1].flatten().tolist()))
    assert len(routings) == 3, "the replays were meant to route differently"


class OneMoELayer(torch.nn.Module):
    """One fused_moe call pinned to the cuda backend, its weights as buffers."""

    def __init__(self, tensors, scalars):
        super().__init__()
        self.names = [k for k in tensors if k != "x"]
        for name in self.names:
            self.register_buffer(name, tensors[name])
        self.scalars = scalars

    def forward(self, x):
        weights = [getattr(self, name) for name in self.names]
        return torch.ops.moe_compile.fused_moe(x, *weights, *self.scalars.values(), backend="cuda")


@gpu
@pytest.mark.gpu
def test_under_torch_compile_with_cudagraph_trees():
    """torch.compile(backend="moe_compile", options={"cudagraphs": True}): Inductor records the op into its CUDA
    graph trees (no skip, no pool check failure) and every call, replays included, follows its own routing."""
    from torch._dynamo.utils import counters as dynamo_counters

    import moe_compile  # noqa: F401  (registers the moe_compile torch.compile backend)

    op.register_backend("cuda", cuda_moe.cuda_fused_moe)
    try:
        tensors, scalars = make_inputs(4, 64, 6, 128, 64, torch.bfloat16)
        layer = OneMoELayer(tensors, scalars)
        torch._dynamo.reset()
        dynamo_counters.clear()
        compiled = torch.compile(layer, backend="moe_compile", options={"cudagraphs": True})
        with torch.no_grad():
            for seed in range(5):  # warm-up, record, then replays
                x = torch.randn(tensors["x"].shape, generator=torch.Generator().manual_seed(seed)).to(tensors["x"])
                out = compiled(x).clone()
                new = {**tensors, "x": x}
                _, ids, weights = cuda_moe.launch(*new.values(), *scalars.values(), with_routing=True)
                check_output(out, experts_reference(new, scalars, weights, ids), torch.bfloat16)
        assert dynamo_counters["inductor"]["cudagraph_skips"] == 0
    finally:
        op._BACKENDS.pop("cuda", None)
        torch._dynamo.reset()


@gpu
@pytest.mark.gpu
def test_through_the_op_and_auto():
    """Once registered (MOE_COMPILE_CUDA_BACKEND=1), `fused_moe(..., backend="cuda")` runs this backend and `auto`
    prefers it on a Hopper GPU."""
    op.register_backend("cuda", cuda_moe.cuda_fused_moe)
    try:
        tensors, scalars = make_inputs(5, 8, 2, 64, 32, torch.bfloat16, exact_logits=True)
        out = torch.ops.moe_compile.fused_moe(*tensors.values(), *scalars.values(), backend="cuda")
        weights, ids, _ = reference_routing(tensors, scalars)
        check_output(out, experts_reference(tensors, scalars, weights, ids), torch.bfloat16)
        assert op.select_backend("auto", torch.device("cuda")) == "cuda"
    finally:
        op._BACKENDS.pop("cuda", None)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("what", ["tokens", "fp32"])
def test_beyond_decode_runs_triton(what):
    """40 tokens (past the decode limit) or fp32 inputs: the backend hands the case to triton, same results."""
    T, dtype = (40, torch.bfloat16) if what == "tokens" else (4, torch.float32)
    tensors, scalars = make_inputs(T, 32, 4, 128, 64, dtype)
    reason = cuda_moe.unsupported_reason(*(tensors[k] for k in ("x", "router_weight", "router_bias",
                                                                "correction_bias", "w13", "w2", "b13", "b2")),
                                         4, 1, 1, "silu")
    assert reason
    out = cuda_moe.cuda_fused_moe(**tensors, **scalars)
    up = {k: (v.float() if v is not None and k != "router_weight" else v) for k, v in tensors.items()}
    check_output(out, reference.torch_fused_moe(**up, **scalars), dtype, tol=1e-2 if dtype != torch.float32 else 1e-4)


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour on machines without a CUDA device")
def test_import_fails_fast_without_a_gpu():
    """On CPU the module raises ImportError before touching nvcc, and the op's registry records why."""
    from moe_compile.kernels.backends import UNAVAILABLE

    assert cuda_moe is None and "CUDA device" in IMPORT_ERROR
    assert "cuda" in UNAVAILABLE and "Hopper" in UNAVAILABLE["cuda"]


def test_off_unless_asked_for(monkeypatch):
    """Without MOE_COMPILE_CUDA_BACKEND=1 the experimental backend neither builds nor registers, so `auto` never
    picks it."""
    import importlib
    import sys

    monkeypatch.delenv("MOE_COMPILE_CUDA_BACKEND", raising=False)
    monkeypatch.delitem(sys.modules, "moe_compile.kernels.cuda_moe", raising=False)
    with pytest.raises(ImportError, match="CUDA device|MOE_COMPILE_CUDA_BACKEND"):
        importlib.import_module("moe_compile.kernels.cuda_moe")
    assert "cuda" not in op.available_backends() and "cuda" not in op.available_packed_backends()
