"""The fused op and its reference: opcheck, fp64 gradcheck, the reference against a naive per-token loop written
here (independently of `moe_compile.kernels.reference`), routing invariants, and the fake kernel under
FakeTensorMode and torch.export with a dynamic token count.

Dimension legend: T = tokens, E = experts, K = top_k, H = hidden, I = expert intermediate, G = expert groups.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, replace
from typing import Optional

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import moe_compile  # noqa: F401  (registers the op)
from moe_compile.kernels import reference
from tests.conftest import TOLERANCES, relative_error

OP = torch.ops.moe_compile.fused_moe


@dataclass(frozen=True)
class Case:
    """One op configuration: shapes, then routing and epilogue. Field names mirror the op's arguments."""

    T: int = 6
    H: int = 16
    I: int = 12
    E: int = 8
    K: int = 2
    scoring: str = "softmax"
    renormalize: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling: float = 1.0
    router_bias: bool = False
    correction_bias: bool = False
    weight_on_input: bool = False
    activation: str = "silu"
    gated: bool = True
    expert_bias: bool = False
    alpha: float = 1.702
    limit: float = 7.0
    bias_expert: dict = field(default_factory=dict)  # expert -> value forced into the router bias (routing edges)

    def scalars(self) -> tuple:
        return (self.K, self.scoring, self.renormalize, self.n_group, self.topk_group, self.routed_scaling,
                self.weight_on_input, self.activation, self.alpha, self.limit)


def make_inputs(case: Case, dtype=torch.float32, router_dtype=None, seed: int = 0) -> tuple:
    """Fresh random (x, router_weight, router_bias, correction_bias, w13, w2, b13, b2) for `case`."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dt)

    rows = 2 * case.I if case.gated else case.I
    router_dtype = router_dtype or dtype
    x = rand(case.T, case.H)  # [T, H]
    router_weight = rand(case.E, case.H, std=2.0 / math.sqrt(case.H), dt=router_dtype)  # decisive routing
    router_bias = rand(case.E, std=0.5, dt=router_dtype) if case.router_bias or case.bias_expert else None
    if case.bias_expert:
        for expert, value in case.bias_expert.items():
            router_bias[expert] = value
    correction_bias = rand(case.E, std=0.5, dt=torch.float32) if case.correction_bias else None
    w13 = rand(case.E, rows, case.H, std=1.0 / math.sqrt(case.H))  # [E, 2I or I, H]
    w2 = rand(case.E, case.H, case.I, std=1.0 / math.sqrt(case.I))  # [E, H, I]
    b13 = rand(case.E, rows, std=0.1) if case.expert_bias else None
    b2 = rand(case.E, case.H, std=0.1) if case.expert_bias else None
    return x, router_weight, router_bias, correction_bias, w13, w2, b13, b2


def _seed_of(name: str) -> int:
    return zlib.crc32(name.encode()) % 1000  # stable across runs (str hash is salted)


# ---- the naive loop: one token at a time, one expert at a time, fp64, no vectorised routing ----

def naive_route(logits_t: list[float], case: Case, correction: Optional[list[float]]) -> list[tuple[int, float]]:
    """One token's [(expert, weight)] in selection order, from its E logits."""
    E = case.E
    if case.scoring == "softmax":
        top = max(logits_t)
        exps = [math.exp(v - top) for v in logits_t]
        scores = [v / sum(exps) for v in exps]
    else:
        scores = [1.0 / (1.0 + math.exp(-v)) for v in logits_t]
    choice = [s + (correction[e] if correction else 0.0) for e, s in enumerate(scores)]
    allowed = set(range(E))
    if case.n_group > 1 and case.topk_group < case.n_group:
        size = E // case.n_group
        group_score = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(case.n_group)]
        kept = sorted(range(case.n_group), key=lambda g: -group_score[g])[: case.topk_group]
        allowed = {e for e in range(E) if e // size in kept}
    chosen = sorted(allowed, key=lambda e: -choice[e])[: case.K]
    weights = [scores[e] for e in chosen]
    if case.renormalize:
        total = sum(weights)
        weights = [w / total for w in weights]
    return [(e, w * case.routed_scaling) for e, w in zip(chosen, weights)]


def naive_activation(h: torch.Tensor, case: Case) -> torch.Tensor:
    """[2I] or [I] -> [I] for one token, written out per activation."""
    if case.gated:
        gate, up = h[: case.I], h[case.I:]
    else:
        gate, up = h, None
    if case.activation == "swiglu_oai":
        gate = torch.minimum(gate, torch.tensor(case.limit, dtype=h.dtype))
        up = torch.clamp(up, -case.limit, case.limit)
        return (up + 1) * gate * (1 / (1 + torch.exp(-case.alpha * gate)))
    act = {
        "silu": lambda v: v / (1 + torch.exp(-v)),
        "gelu": lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2))),
        "gelu_tanh": lambda v: 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))),
        "relu": lambda v: torch.clamp(v, min=0),
    }[case.activation](gate)
    return act if up is None else act * up


def naive_moe(case: Case, inputs: tuple) -> tuple[torch.Tensor, list[list[tuple[int, float]]]]:
    """The whole layer token by token in fp64; also returns each token's routing."""
    x, rw, rb, cb, w13, w2, b13, b2 = [None if t is None else t.double() for t in inputs]
    out = torch.zeros_like(x)
    routing = []
    for t in range(case.T):
        logits = [float(rw[e] @ x[t] + (rb[e] if rb is not None else 0.0)) for e in range(case.E)]
        routes = naive_route(logits, case, None if cb is None else cb.tolist())
        routing.append(routes)
        for expert, weight in routes:
            xin = x[t] * weight if case.weight_on_input else x[t]
            h = w13[expert] @ xin + (b13[expert] if b13 is not None else 0.0)
            y = w2[expert] @ naive_activation(h, case) + (b2[expert] if b2 is not None else 0.0)
            out[t] += y if case.weight_on_input else weight * y
    return out, routing


def run_reference(case: Case, inputs: tuple) -> torch.Tensor:
    return reference.torch_fused_moe(*inputs, *case.scalars())


# Routing and epilogue variants, each on the default shape: the reference must equal the naive loop on each.
VARIANTS = {
    "softmax": Case(),  # OLMoE: softmax top-k, no renorm
    "softmax_renorm": Case(renormalize=True),  # Mixtral / Qwen3-MoE
    "sigmoid_renorm": Case(scoring="sigmoid", renormalize=True),
    "grouped_topk_ebias_scaled": Case(scoring="sigmoid", renormalize=True, n_group=4, topk_group=2,
                                      routed_scaling=2.5, correction_bias=True, K=4),  # DeepSeek-V3
    "grouped_softmax_no_bias": Case(n_group=2, topk_group=1),  # group-limited softmax (DeepSeek-V2 style)
    "scaling_no_renorm": Case(routed_scaling=0.7),
    "router_bias": Case(router_bias=True),
    "weight_on_input_sigmoid": Case(scoring="sigmoid", K=1, weight_on_input=True),  # Llama4
    "gelu": Case(activation="gelu"),
    "gelu_tanh": Case(activation="gelu_tanh"),
    "relu": Case(activation="relu"),
    # GPT-OSS: router bias, expert biases, clamped SwiGLU; limit 1.5 so both clamps bite on these inputs
    "swiglu_oai_clamped": Case(activation="swiglu_oai", router_bias=True, expert_bias=True, renormalize=True,
                               limit=1.5),
    "non_gated_relu": Case(activation="relu", gated=False),  # plain MLP experts, w13 [E, I, H]
    "non_gated_gelu_biased": Case(activation="gelu", gated=False, expert_bias=True),
}

# Shape edges, each with the routing that makes the edge happen.
EDGES = {
    "one_token": Case(T=1),  # decode: T = 1, most experts idle
    "expert_without_tokens": Case(T=16, bias_expert={0: -100.0}),  # expert 0 never chosen
    "all_tokens_one_expert": Case(T=16, K=1, bias_expert={3: 100.0}),  # every token on expert 3
    "odd_h_and_i": Case(T=7, H=13, I=11, E=5, K=3),  # tail sizes, prime E
    "large_e_and_k": Case(T=3, H=8, I=4, E=512, K=16, renormalize=True),  # E = 512, K = 16
    "large_e_grouped": Case(T=3, H=8, I=4, E=256, K=8, scoring="sigmoid", n_group=8, topk_group=4,
                            correction_bias=True, renormalize=True, routed_scaling=2.5),  # DeepSeek-V3 sized routing
    "top_k_equals_e": Case(T=5, E=4, K=4, renormalize=True),  # K = E: every expert on every token
    "top_k_equals_e_no_renorm": Case(T=5, E=4, K=4),  # K = E without renorm: weights are the softmax
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted({**VARIANTS, **EDGES}))
def test_reference_matches_naive_loop(name, dtype):
    case = {**VARIANTS, **EDGES}[name]
    inputs = make_inputs(case, dtype, seed=_seed_of(name))
    expected, _ = naive_moe(case, inputs)
    actual = run_reference(case, inputs)
    assert actual.dtype == dtype and actual.shape == (case.T, case.H)
    assert relative_error(actual, expected) <= TOLERANCES[dtype], name


def test_reference_bf16_activations_fp32_router():
    """bf16 experts with an fp32 router (DeepSeek-V3 keeps its router in fp32): bf16 tolerance."""
    case = VARIANTS["grouped_topk_ebias_scaled"]
    inputs = make_inputs(case, torch.bfloat16, router_dtype=torch.float32)
    expected, _ = naive_moe(case, inputs)
    actual = run_reference(case, inputs)
    assert actual.dtype == torch.bfloat16
    assert relative_error(actual, expected) <= TOLERANCES[torch.bfloat16]


def test_swiglu_clamps_are_exercised():
    """The clamped case must actually clamp, or the variant above proves nothing about the limit."""
    case = VARIANTS["swiglu_oai_clamped"]
    x, _, _, _, w13, _, b13, _ = make_inputs(case, torch.float64, seed=_seed_of("swiglu_oai_clamped"))
    h = torch.einsum("th,erh->ter", x, w13) + b13  # [T, E, 2I]
    assert (h[..., : case.I] > case.limit).any() and (h[..., case.I:].abs() > case.limit).any()
    unclamped = replace(case, limit=1e9)
    inputs = make_inputs(case, torch.float64, seed=1)
    assert relative_error(run_reference(unclamped, inputs), run_reference(case, inputs)) > 1e-3


@pytest.mark.parametrize("name", sorted({**VARIANTS, **EDGES}))
def test_routing_matches_naive_and_invariants(name):
    case = {**VARIANTS, **EDGES}[name]
    inputs = make_inputs(case, torch.float64, seed=_seed_of(name))
    x, rw, rb, cb = inputs[:4]
    logits = reference.router_logits(x, rw, rb)
    weights, ids = reference.route(logits, cb, case.K, case.scoring, case.renormalize, case.n_group,
                                   case.topk_group, case.routed_scaling)  # [T, K]
    _, naive = naive_moe(case, inputs)
    assert ids.shape == weights.shape == (case.T, case.K)
    assert weights.dtype == torch.float64 and ids.dtype == torch.int64
    for t in range(case.T):
        assert ids[t].tolist() == [e for e, _ in naive[t]]  # same experts, same (score) order
        assert torch.allclose(weights[t], torch.tensor([w for _, w in naive[t]], dtype=weights.dtype))
        assert len(set(ids[t].tolist())) == case.K  # unique per token
    assert ((ids >= 0) & (ids < case.E)).all()
    if case.renormalize:  # weights sum to 1, times the scaling
        assert torch.allclose(weights.sum(-1), torch.full((case.T,), case.routed_scaling, dtype=weights.dtype))
    if case.n_group > 1 and case.topk_group < case.n_group:  # every id inside one of the token's kept groups
        scores = logits.softmax(-1) if case.scoring == "softmax" else logits.sigmoid()  # [T, E]
        choice = scores + (0 if cb is None else cb)
        size = case.E // case.n_group
        group_score = choice.view(case.T, case.n_group, size).topk(2, dim=-1).values.sum(-1)  # [T, G]
        kept = group_score.topk(case.topk_group, dim=-1).indices  # [T, topk_group]
        assert (ids // size).unsqueeze(-1).eq(kept.unsqueeze(1)).any(-1).all()
    for expert, bias in case.bias_expert.items():  # the routing edge really happens
        hits = (ids == expert).sum().item()
        assert hits == (case.T if bias > 0 else 0)


# ---- opcheck: schema, fake, autograd registration, aot dispatch with dynamic shapes ----

OPCHECK_VARIANTS = ["softmax_renorm", "grouped_topk_ebias_scaled", "swiglu_oai_clamped", "non_gated_gelu_biased",
                    "weight_on_input_sigmoid"]


@pytest.mark.parametrize("name", OPCHECK_VARIANTS)
def test_opcheck(name):
    case = VARIANTS[name]
    tensors = [None if t is None else t.requires_grad_(i != 3)
               for i, t in enumerate(make_inputs(case))]
    torch.library.opcheck(OP, (*tensors, *case.scalars()))
    torch.library.opcheck(OP, (*[None if t is None else t.detach() for t in tensors], *case.scalars()),
                          {"backend": "reference"})


def test_opcheck_one_token():
    case = EDGES["one_token"]
    torch.library.opcheck(OP, (*make_inputs(case), *case.scalars()))


# ---- gradcheck in fp64, through the op's registered autograd (backward op recomputing the reference) ----

GRAD_NAMES = ("x", "router_weight", "router_bias", "w13", "w2", "b13", "b2")


@pytest.mark.parametrize("name", ["softmax_renorm", "grouped_topk_ebias_scaled", "swiglu_oai_clamped",
                                  "non_gated_gelu_biased", "weight_on_input_sigmoid"])
def test_gradcheck_fp64(name):
    case = replace(VARIANTS[name], T=4, H=6, I=5)
    if case.n_group > 1:
        case = replace(case, E=8)
    x, rw, rb, cb, w13, w2, b13, b2 = make_inputs(case, torch.float64, seed=3)
    diff = [t for t in (x, rw, rb, w13, w2, b13, b2)]
    present = [t.requires_grad_() for t in diff if t is not None]

    def fn(*ts):
        it = iter(ts)
        full = [None if t is None else next(it) for t in diff]
        return OP(full[0], full[1], full[2], cb, full[3], full[4], full[5], full[6], *case.scalars())

    assert torch.autograd.gradcheck(fn, present, fast_mode=True)
    # every present input gets a gradient of its own shape, none silently zero
    out = fn(*present)
    grads = torch.autograd.grad(out.square().sum(), present)
    for tensor, grad in zip(present, grads):
        assert grad.shape == tensor.shape and grad.abs().sum() > 0


def test_backward_equals_reference_autograd():
    """The registered backward equals autograd through the reference itself (all seven gradients)."""
    case = VARIANTS["swiglu_oai_clamped"]
    inputs = make_inputs(case, torch.float64)
    leaves_a = [None if t is None else t.clone().requires_grad_(i != 3) for i, t in enumerate(inputs)]
    leaves_b = [None if t is None else t.clone().requires_grad_(i != 3) for i, t in enumerate(inputs)]
    grad_out = torch.randn(case.T, case.H, dtype=torch.float64)
    OP(*leaves_a, *case.scalars()).backward(grad_out)
    reference.torch_fused_moe(*leaves_b, *case.scalars()).backward(grad_out)
    for i, (a, b) in enumerate(zip(leaves_a, leaves_b)):
        if a is not None and i != 3:
            assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12), GRAD_NAMES[[0, 1, 2, 4, 5, 6, 7].index(i)]


# ---- the fake kernel: FakeTensorMode and torch.export with a dynamic token count ----

def test_fake_kernel_under_fake_tensor_mode():
    case = VARIANTS["swiglu_oai_clamped"]
    with FakeTensorMode():
        inputs = make_inputs(case, torch.bfloat16)
        out = OP(*inputs, *case.scalars())
    assert out.shape == (case.T, case.H) and out.dtype == torch.bfloat16


class _OpModule(torch.nn.Module):
    def __init__(self, case: Case):
        super().__init__()
        _, *weights = make_inputs(case)
        names = ("router_weight", "router_bias", "correction_bias", "w13", "w2", "b13", "b2")
        for n, t in zip(names, weights):
            self.register_buffer(n, t)
        self.case = case

    def forward(self, x):
        return OP(x, self.router_weight, self.router_bias, self.correction_bias, self.w13, self.w2, self.b13,
                  self.b2, *self.case.scalars())


def test_export_with_dynamic_tokens():
    case = VARIANTS["grouped_topk_ebias_scaled"]
    module = _OpModule(case)
    tokens = torch.export.Dim("tokens", min=1, max=4096)
    exported = torch.export.export(module, (torch.randn(5, case.H),), dynamic_shapes=({0: tokens},), strict=False)
    nodes = [n for n in exported.graph.nodes if n.op == "call_function" and n.target == OP.default]
    assert len(nodes) == 1
    assert str(nodes[0].meta["val"].shape[0]) == str(exported.graph_module.graph.find_nodes(op="placeholder")[-1]
                                                        .meta["val"].shape[0])  # symbolic T flows through
    for t in (1, 9, 33):
        x = torch.randn(t, case.H)
        assert torch.equal(exported.module()(x), module(x))
