"""specialize_phase on real FX graphs of a two-layer fused model: the token count comes from fake tensor metadata
(static T=1, T=64, a symbolic T), each node is pinned to its phase's backend, counters say how many got which,
and outputs are unchanged. The graphs' inputs are fake CUDA tensors (shape propagation only), so this runs on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import moe_compile  # noqa: F401  (registers the op)
from moe_compile.counters import counters, reset
from moe_compile.passes import DEFAULT_PIPELINE, SELECT_BACKEND, SPECIALIZE_PHASE, PassManager, fused_moe_nodes
from moe_compile.passes.fused_nodes import argument
from moe_compile.passes.specialize_phase import phase_of
from tests.conftest import TOLERANCES, relative_error

H, I, E = 16, 8, 4
ALL_GPU = ["cuda", "reference", "triton"]
ON = {"specialize_phase": True, "available_backends": ALL_GPU}


class TwoMoELayers(nn.Module):
    """Layer 0 routes to top-2 experts, layer 1 to top-1: at T=64 they fall on either side of the decode limit."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        for layer in (0, 1):
            self.register_buffer(f"router{layer}", torch.randn(E, H, generator=generator))
            self.register_buffer(f"w13_{layer}", torch.randn(E, 2 * I, H, generator=generator) * 0.1)
            self.register_buffer(f"w2_{layer}", torch.randn(E, H, I, generator=generator) * 0.1)

    def forward(self, x):
        h = torch.ops.moe_compile.fused_moe(x, self.router0, None, None, self.w13_0, self.w2_0, None, None,
                                            2, "softmax", True, 1, 1, 1.0, False, "silu", 1.702, 7.0)
        return torch.ops.moe_compile.fused_moe(h, self.router1, None, None, self.w13_1, self.w2_1, None, None,
                                               1, "softmax", False, 1, 1, 1.0, False, "silu", 1.702, 7.0)


@pytest.fixture(autouse=True)
def _reset_counters():
    reset()


def _graph(tokens, device="cuda"):
    """The traced model with fake metadata for an input of `tokens` rows (an int, or "dynamic" for a symbol)."""
    gm = torch.fx.symbolic_trace(TwoMoELayers())
    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
    if tokens == "dynamic":
        tokens = shape_env.create_symintnode(shape_env.create_symbol(64, ConstantSource("T")), hint=64)
    with mode:
        x = torch.empty(tokens, H, device=device)
    FakeTensorProp(gm, mode).propagate(x)
    return gm


def _backends(gm):
    return [argument(node, "backend") for node in fused_moe_nodes(gm)]


def test_phase_of_token_counts():
    assert phase_of(1, 8) == "decode" and phase_of(8, 8) == "decode"  # 64 routed rows
    assert phase_of(9, 8) == "prefill"
    assert phase_of(64, 1) == "decode" and phase_of(64, 2) == "prefill"
    assert phase_of(4, 8, decode_max_rows=16) == "prefill"


def test_decode_graph_gets_the_decode_kernel():
    gm = _graph(1)
    result = SPECIALIZE_PHASE.run(gm, ON)
    assert (result.modified, result.count) == (True, 2)
    assert _backends(gm) == ["cuda", "cuda"]
    assert [n.meta["moe"]["phase"] for n in fused_moe_nodes(gm)] == ["decode", "decode"]
    assert counters["moe_compile"]["specialize_phase.decode.cuda"] == 2


def test_decode_without_the_cuda_backend_takes_triton():
    gm = _graph(1)
    SPECIALIZE_PHASE.run(gm, {**ON, "available_backends": ["reference", "triton"]})
    assert _backends(gm) == ["triton", "triton"]
    assert counters["moe_compile"]["specialize_phase.decode.triton"] == 2


def test_each_node_by_its_own_routed_rows():
    """T=64: layer 0 routes 128 rows (prefill), layer 1 routes 64 (decode)."""
    gm = _graph(64)
    result = SPECIALIZE_PHASE.run(gm, ON)
    assert result.count == 2 and _backends(gm) == ["triton", "cuda"]
    assert counters["moe_compile"]["specialize_phase.prefill.triton"] == 1
    assert counters["moe_compile"]["specialize_phase.decode.cuda"] == 1


def test_dynamic_token_count_is_prefill():
    gm = _graph("dynamic")
    assert isinstance(next(fused_moe_nodes(gm)).args[0].meta["val"].shape[0], torch.SymInt)
    SPECIALIZE_PHASE.run(gm, ON)
    assert _backends(gm) == ["triton", "triton"]
    assert counters["moe_compile"]["specialize_phase.prefill.triton"] == 2


def test_in_the_default_pipeline_with_counters_and_unchanged_outputs():
    module = TwoMoELayers()
    x = torch.randn(64, H)
    expected = module(x)
    gm = PassManager(list(DEFAULT_PIPELINE), options=ON)(_graph(64))
    assert counters["moe_compile"]["specialize_phase"] == 2
    # without a GPU the pinned backends are not registered and the op runs the reference (exact); with one, the
    # pinned GPU kernels run (fp32, full-precision products)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    actual = gm.to(device)(x.to(device)).cpu()
    assert relative_error(actual, expected) <= TOLERANCES[torch.float32]


@pytest.mark.parametrize("case", ["off", "pinned_by_user", "cpu_graph", "no_gpu_backend", "no_metadata"])
def test_negative_cases_leave_the_graph_alone(case):
    gm = _graph(1, device="cpu" if case == "cpu_graph" else "cuda")
    options = dict(ON)
    if case == "off":
        options = {"available_backends": ALL_GPU}
    elif case == "pinned_by_user":
        SELECT_BACKEND.run(gm, {"backend": "reference"})
    elif case == "no_gpu_backend":
        options["available_backends"] = ["reference"]
    elif case == "no_metadata":
        gm = torch.fx.symbolic_trace(TwoMoELayers())
    before = _backends(gm)
    result = SPECIALIZE_PHASE.run(gm, options)
    assert (result.modified, result.count) == (False, 0)
    assert _backends(gm) == before
    assert not any(key.startswith("specialize_phase") for key in counters["moe_compile"])
