"""FP8 / 2:4 as graph passes (`sparsify_24_graph`, `quantize_fp8_graph`) through the `moe_compile` torch.compile
backend and on unlifted export graphs: the same numerics as the module-level passes, given scales carried through,
counters, and the cases left alone (dense graphs, packed nodes, weights that are not constants)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import moe_compile as mc
from moe_compile.backend import moe_compile_backend
from moe_compile.capture import capture
from moe_compile.counters import counters, reset
from moe_compile.fused_block import fused_blocks
from moe_compile.models import build_tiny_model
from moe_compile.passes import (ANNOTATE_MOE, DEFAULT_PIPELINE, QUANTIZE_FP8_GRAPH, WEIGHT_PASSES, PassManager,
                                fused_moe_nodes, pipeline, quantize_fp8, scales_by_layer, sparsify_24)
from moe_compile.passes.pack_weights_graph import is_fused_moe_packed, packed_argument
from moe_compile.quant import FP8_DTYPE
from moe_compile.quant.fp8 import quantize_per_channel
from tests.conftest import relative_error

MODEL = "tiny-qwen3-moe"  # fp32, two MoE layers
LAYERS = 2
SAME = 1e-6  # graph and module forms run the same emulated ops in fp32: equal up to summation order
FEATURES = {"fp8": {"fp8": True}, "sparsity_24": {"sparsity_24": True},
            "fp8+sparsity_24": {"fp8": True, "sparsity_24": True}}


@pytest.fixture(scope="module")
def fused():
    """(optimized model, input ids, its dense logits)."""
    model = mc.optimize(build_tiny_model(MODEL), "conservative")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
    return model, ids, dense


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    reset()


def _module_form(model, features: dict, scales=None):
    """A copy of `model` packed by the module-level passes (2:4 first, as the graph pipeline orders them)."""
    packed = copy.deepcopy(model)
    if features.get("sparsity_24"):
        sparsify_24(packed)
    if features.get("fp8"):
        quantize_fp8(packed, scales=scales)
    return packed


def _dynamo_graph(model, ids):
    """The Dynamo graph of `model(ids)` and its example inputs (weights lifted to placeholders), as a backend gets
    them."""
    captured = {}

    def keep(gm, example_inputs):
        captured.update(gm=gm, example_inputs=example_inputs)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=keep)(ids)
    torch._dynamo.reset()
    return captured["gm"], captured["example_inputs"]


def _packed_graph(model, ids, options):
    """The graph after the backend's passes (inner eager), and the example inputs to run it on."""
    gm, example_inputs = _dynamo_graph(model, ids)
    with torch.no_grad():
        forward = moe_compile_backend(gm, example_inputs, {"inner": "eager", **options})
    return forward.__self__, example_inputs


@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
def test_compiled_equals_module_pass(fused, features):
    model, ids, dense = fused
    with torch.no_grad():
        expected = _module_form(model, features)(ids).logits
        actual = torch.compile(model, backend="moe_compile", options={"inner": "eager", **features})(ids).logits
    c = counters["moe_compile"]
    assert c["graphs"] == 1
    assert c["sparsify_24_graph"] == (LAYERS if features.get("sparsity_24") else 0)
    assert c["quantize_fp8_graph"] == (LAYERS if features.get("fp8") else 0)
    assert relative_error(actual, expected) <= SAME
    assert relative_error(actual, dense) > 1e-3  # the packed weights are what ran (FP8 alone: ~2e-3 on logits)
    assert all(b.packed is None and b.w13 is not None for b in fused_blocks(model).values())  # model untouched


def test_packed_graph_structure(fused):
    """Each fused_moe node becomes a fused_moe_packed node reading FP8 2:4 buffers of the GraphModule, with FP8
    per-token activations and the node's routing scalars; the dense weight inputs are no longer read."""
    model, ids, _ = fused
    gm, example_inputs = _packed_graph(model, ids, FEATURES["fp8+sparsity_24"])
    assert list(fused_moe_nodes(gm)) == []
    packed = [n for n in gm.graph.nodes if is_fused_moe_packed(n)]
    assert [n.meta["moe"]["layer"] for n in packed] == [0, 1]
    for node in packed:
        assert packed_argument(node, "act_quant") == "fp8_per_token"
        assert packed_argument(node, "top_k") == 2 and packed_argument(node, "scoring") == "softmax"
        w13, meta = packed_argument(node, "w13"), packed_argument(node, "w13_meta")
        assert w13.op == meta.op == "get_attr"
        assert node.meta["moe"]["weight_format"] == "fp8+sparse24"
    buffers = dict(gm.named_buffers())
    assert sorted(buffers) == sorted(f"moe_fp8_sparse24_{layer}.{t}" for layer in (0, 1)
                                     for t in ("w13", "w2", "w13_scale", "w2_scale", "w13_meta", "w2_meta"))
    assert buffers["moe_fp8_sparse24_0.w13"].dtype == FP8_DTYPE
    assert buffers["moe_fp8_sparse24_0.w13_meta"].dtype == torch.uint8
    assert buffers["moe_fp8_sparse24_0.w13"].shape == (8, 48, 16)  # [E, 2I, H/2]
    weight_inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name.endswith(("_w13_", "_w2_"))]
    assert len(weight_inputs) == 2 * LAYERS and all(not n.users for n in weight_inputs)  # still passed, unread
    with torch.no_grad():
        actual = next(out for out in gm(*example_inputs) if out.shape == (2, 7, 128))  # the logits
        expected = _module_form(model, FEATURES["fp8+sparsity_24"])(ids).logits
    assert relative_error(actual, expected) <= SAME


def test_given_scales_carry_through(fused):
    """Calibrated scales (here 0.75x the max scales for layer 0: the largest weights clip, as an MSE search does)
    reach the graph by layer index and give the module pass's output with the same scales, not the max-scale one."""
    model, ids, _ = fused
    block = model.model.layers[0].mlp
    given = (quantize_per_channel(block.w13)[1] * 0.75, quantize_per_channel(block.w2)[1] * 0.75)
    by_name = {"model.layers.0.mlp": given}
    options = {"inner": "eager", "fp8": True, "fp8_scales": scales_by_layer(model, by_name)}
    assert list(options["fp8_scales"]) == [0]
    with torch.no_grad():
        actual = torch.compile(model, backend="moe_compile", options=options)(ids).logits
        expected = _module_form(model, {"fp8": True}, scales=by_name)(ids).logits
        max_scales = _module_form(model, {"fp8": True})(ids).logits
    assert counters["moe_compile"]["quantize_fp8_graph"] == LAYERS
    assert relative_error(actual, expected) <= SAME
    assert relative_error(actual, max_scales) > 1e-3


def test_bad_given_scale_is_an_error_and_changes_nothing(fused):
    model, ids, _ = fused
    gm, example_inputs = _dynamo_graph(model, ids)
    wrong = {1: (torch.ones(8, 47), torch.ones(8, 32))}  # w13_scale must be [E, 2I] = [8, 48]
    with torch.no_grad(), pytest.raises(ValueError, match=r"fp8_scales\[1\].*does not fit weights"):
        moe_compile_backend(gm, example_inputs, {"inner": "eager", "fp8": True, "fp8_scales": wrong})
    assert len(list(fused_moe_nodes(gm))) == LAYERS  # layer 0 was planned, but nothing was rewritten
    assert not any(is_fused_moe_packed(n) for n in gm.graph.nodes) and dict(gm.named_buffers()) == {}
    with pytest.raises(ValueError, match="not fused MoE blocks"):
        scales_by_layer(model, {"model.layers.0.self_attn": wrong[1]})


def test_unlifted_export_graph_get_attr_weights(fused):
    """torch.export's unlifted module reads the weights through get_attr: packed the same way."""
    model, _, _ = fused
    block = copy.deepcopy(model.model.layers[1].mlp)
    x = torch.randn(2, 5, 32)
    gm = capture(block, x).module()
    features = FEATURES["fp8+sparsity_24"]
    PassManager(pipeline(features), options=features)(gm)
    assert counters["moe_compile"]["sparsify_24_graph"] == counters["moe_compile"]["quantize_fp8_graph"] == 1
    assert not any(n.op == "get_attr" and n.target in ("w13", "w2") for n in gm.graph.nodes)
    packed_block = copy.deepcopy(block)
    sparsify_24(packed_block)
    quantize_fp8(packed_block)
    with torch.no_grad():
        assert relative_error(gm(x), packed_block(x)) <= SAME


class OneLayer(torch.nn.Module):
    """A fused_moe call on buffers: symbolic_trace reads them through get_attr."""

    def __init__(self, block):
        super().__init__()
        for name in ("router_weight", "w13", "w2"):
            self.register_buffer(name, getattr(block, name).detach().clone())

    def forward(self, x):
        return _layer_with_weights_as_inputs(x, self.router_weight, self.w13, self.w2)


@pytest.mark.parametrize("pinned, packed_backend", [("reference", "reference"), ("cuda", "auto")])
def test_symbolic_trace_graph_keeps_the_backend_pin_where_packed_kernels_exist(fused, pinned, packed_backend):
    """A backend with packed kernels stays pinned; one without (the bf16 `cuda` decode kernel, as select_backend or
    specialize_phase pin it) becomes `auto`, so the packed op picks its best kernel."""
    block = copy.deepcopy(fused[0].model.layers[0].mlp)
    gm = torch.fx.symbolic_trace(OneLayer(block))
    options = {"fp8": True, "backend": pinned}
    PassManager(pipeline(options), options=options)(gm)
    (node,) = [n for n in gm.graph.nodes if is_fused_moe_packed(n)]
    assert packed_argument(node, "backend") == packed_backend
    assert counters["moe_compile"]["select_backend"] == counters["moe_compile"]["quantize_fp8_graph"] == 1
    x = torch.randn(5, 32)
    quantize_fp8(block)  # the module form of the same layer
    with torch.no_grad():
        assert relative_error(gm(x), block(x)) <= SAME


def test_already_packed_nodes_are_left_alone(fused, caplog):
    model, ids, _ = fused
    packed = _module_form(model, {"fp8": True})
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="moe_compile"):
        expected = packed(ids).logits
        options = {"inner": "eager", "fp8": True, "sparsity_24": True}
        actual = torch.compile(packed, backend="moe_compile", options=options)(ids).logits
    assert counters["moe_compile"]["quantize_fp8_graph"] == counters["moe_compile"]["sparsify_24_graph"] == 0
    assert caplog.text.count("already packed") == 2 * LAYERS  # each node, by each pass
    assert torch.equal(actual, expected)


def _layer_with_weights_as_inputs(x, router, w13, w2):
    return torch.ops.moe_compile.fused_moe(x, router, None, None, w13, w2, None, None,
                                           2, "softmax", True, 1, 1, 1.0, False, "silu", 1.702, 7.0)


class ComputedWeights(torch.nn.Module):
    """Weights derived in the forward (here scaled): not constants of the graph."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        b = self.block
        return _layer_with_weights_as_inputs(x, b.router_weight, b.w13 * 0.5, b.w2)


def test_weights_that_are_not_constants_are_skipped(fused, caplog):
    """A weight passed in by the caller, one computed in the graph, and trainable weights under grad mode: each
    node is left as it was, with the reason logged."""
    model, ids, _ = fused
    block = model.model.layers[0].mlp
    x = torch.randn(5, 32)
    options = {"inner": "eager", "fp8": True, "sparsity_24": True}
    cases = [
        (lambda: torch.compile(_layer_with_weights_as_inputs, backend="moe_compile", options=options)(
            x, block.router_weight.detach(), block.w13.detach(), block.w2.detach()), "not a module parameter"),
        (lambda: torch.compile(ComputedWeights(block), backend="moe_compile", options=options)(x),
         "computed in the graph"),
    ]
    for call, reason in cases:
        torch._dynamo.reset()
        caplog.clear()
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="moe_compile"):
            call()
        assert reason in caplog.text
        assert counters["moe_compile"]["quantize_fp8_graph"] == counters["moe_compile"]["sparsify_24_graph"] == 0
    torch._dynamo.reset()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moe_compile"):  # grad mode on, parameters require grad
        actual = torch.compile(model, backend="moe_compile", options=options)(ids).logits
    assert "requires grad and grad mode is on" in caplog.text
    assert counters["moe_compile"]["quantize_fp8_graph"] == 0 and actual.requires_grad


def test_placeholders_without_example_inputs_are_skipped(fused, caplog):
    model, ids, _ = fused
    gm, _ = _dynamo_graph(model, ids)
    before = gm.code
    with caplog.at_level(logging.WARNING, logger="moe_compile"):
        PassManager([ANNOTATE_MOE, QUANTIZE_FP8_GRAPH], options={"fp8": True})(gm)
    assert "has no example value" in caplog.text and counters["moe_compile"]["quantize_fp8_graph"] == 0
    assert gm.code == before


def test_dense_graph_is_untouched():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)))
    before = [n.format_node() for n in gm.graph.nodes]
    options = {"fp8": True, "sparsity_24": True, "fp8_scales": {0: (torch.ones(8, 48), torch.ones(8, 32))}}
    for graph_pass in WEIGHT_PASSES:
        result = graph_pass.run(gm, options)
        assert (result.modified, result.count) == (False, 0)
    assert [n.format_node() for n in gm.graph.nodes] == before
    assert dict(gm.named_buffers()) == {} and [name for name, _ in gm.named_children()] == ["0", "1", "2"]


def test_pipeline_adds_weight_passes_only_when_asked():
    assert pipeline({}) == DEFAULT_PIPELINE and pipeline({"fp8": False}) == DEFAULT_PIPELINE
    names = [p.name for p in pipeline({"fp8": True})]
    assert names == ["annotate_moe", "select_backend", "specialize_phase", "sparsify_24_graph", "quantize_fp8_graph",
                     "cleanup"]
    assert pipeline({"sparsity_24": True}) == pipeline({"fp8": True, "sparsity_24": True})


def test_compiled_graph_keeps_its_packed_copies(fused):
    """The packed weights are frozen at compile time: a later update of the model's weights is not seen (no guard
    on weight values). Recompile (torch._dynamo.reset()) after changing weights."""
    model, ids, _ = fused
    model = copy.deepcopy(model)
    compiled = torch.compile(model, backend="moe_compile", options={"inner": "eager", "fp8": True})
    with torch.no_grad():
        before = compiled(ids).logits
        for block in fused_blocks(model).values():
            block.w13.mul_(0.5)
        assert torch.equal(compiled(ids).logits, before)
        assert not torch.equal(model(ids).logits, before)


@pytest.mark.slow
def test_inductor_end_to_end(fused):
    """Through Inductor (CPU C++ codegen): AOTAutograd lifts the packed buffers as graph constants (it needs a
    source for each; see `_set_sources`). Cold-cache compile 20-45 s on 2 cores."""
    model, ids, _ = fused
    features = FEATURES["fp8+sparsity_24"]
    reference = _module_form(model, features)
    compiled = torch.compile(model, backend="moe_compile", options=dict(features))
    with torch.no_grad():
        assert relative_error(compiled(ids).logits, reference(ids).logits) <= 1e-5
    assert counters["moe_compile"]["graphs"] == 1
    assert counters["moe_compile"]["quantize_fp8_graph"] == counters["moe_compile"]["sparsify_24_graph"] == LAYERS
