"""The pass infrastructure and each pass on small hand-built FX graphs (no Dynamo): ordering, counters, dumps,
positive and negative cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moe_compile  # noqa: F401  (registers the op)
from moe_compile.counters import counters, reset
from moe_compile.passes import (ANNOTATE_MOE, CLEANUP, DEFAULT_PIPELINE, SELECT_BACKEND, GraphPass, PassManager,
                                PassOrderError, PassResult, fused_moe_nodes)
from moe_compile.passes.fused_nodes import argument

H, I, E = 16, 8, 4


class TwoMoELayers(nn.Module):
    """Two fused_moe calls in sequence (one with softmax routing, one with sigmoid), plus a dead router-logits
    computation that nobody reads and an in-place write that must survive cleanup."""

    def __init__(self):
        super().__init__()
        for layer in (0, 1):
            self.register_buffer(f"router{layer}", torch.randn(E, H))
            self.register_buffer(f"w13_{layer}", torch.randn(E, 2 * I, H) * 0.1)
            self.register_buffer(f"w2_{layer}", torch.randn(E, H, I) * 0.1)

    def forward(self, x):
        _unused_logits = torch.nn.functional.linear(x, self.router0)  # dead: cleanup removes it
        scratch = torch.zeros_like(x)
        scratch.copy_(x)  # in-place method with no users: must be kept
        h = torch.ops.moe_compile.fused_moe(x, self.router0, None, None, self.w13_0, self.w2_0, None, None,
                                            2, "softmax", True, 1, 1, 1.0, False, "silu", 1.702, 7.0)
        h = torch.ops.moe_compile.fused_moe(h + scratch, self.router1, None, None, self.w13_1, self.w2_1, None, None,
                                            1, "sigmoid", False, 1, 1, 1.0, False, "silu", 1.702, 7.0,
                                            backend="auto")
        return h


class Dense(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(H, H)

    def forward(self, x):
        _unused = x * 2  # dead code, but not on a MoE graph: the passes leave dense graphs alone
        return torch.relu(self.linear(x))


@pytest.fixture(autouse=True)
def _reset_counters():
    reset()


def _trace(module: nn.Module) -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(module)


def test_default_pipeline_order_is_valid():
    assert [p.name for p in DEFAULT_PIPELINE] == ["annotate_moe", "select_backend", "specialize_phase", "cleanup"]
    PassManager(list(DEFAULT_PIPELINE))  # no PassOrderError


def test_pass_order_error_names_the_order():
    with pytest.raises(PassOrderError) as info:
        PassManager([CLEANUP, SELECT_BACKEND, ANNOTATE_MOE])
    message = str(info.value)
    assert "'select_backend' requires ['annotate_moe']" in message
    assert "['cleanup']" in message  # what ran before it
    assert "['cleanup', 'select_backend', 'annotate_moe']" in message  # the whole pipeline order


def test_custom_pass_requires_and_counts():
    seen = []

    def count_nodes(gm, options):
        seen.append(options["tag"])
        return PassResult(gm, False, len(gm.graph.nodes))

    custom = GraphPass("count_nodes", count_nodes, requires=("annotate_moe",))
    with pytest.raises(PassOrderError):
        PassManager([custom, ANNOTATE_MOE])
    gm = _trace(TwoMoELayers())
    manager = PassManager([ANNOTATE_MOE, custom], options={"tag": "x"})
    manager(gm)
    assert seen == ["x"]
    assert manager.history == [("annotate_moe", 2), ("count_nodes", len(gm.graph.nodes))]
    assert counters["moe_compile"]["count_nodes"] == len(gm.graph.nodes)


def test_passes_on_two_moe_layers():
    module = TwoMoELayers()
    x = torch.randn(5, H)
    expected = module(x)
    gm = _trace(module)
    assert len(list(fused_moe_nodes(gm))) == 2
    manager = PassManager(list(DEFAULT_PIPELINE), options={"backend": "reference"})
    gm = manager(gm)
    assert counters["moe_compile"]["annotate_moe"] == 2  # one per MoE layer
    assert counters["moe_compile"]["select_backend"] == 2  # both nodes pinned
    assert counters["moe_compile"]["cleanup"] == 2  # the dead router logits and their get_attr, nothing else
    nodes = list(fused_moe_nodes(gm))
    assert [n.meta["moe"]["layer"] for n in nodes] == [0, 1]
    assert [n.meta["moe"]["scoring"] for n in nodes] == ["softmax", "sigmoid"]
    assert [n.meta["moe"]["top_k"] for n in nodes] == [2, 1]
    assert [argument(n, "backend") for n in nodes] == ["reference", "reference"]
    assert any(n.op == "call_method" and n.target == "copy_" for n in gm.graph.nodes)  # in-place write kept
    assert not any(n.target is torch._C._nn.linear for n in gm.graph.nodes)
    assert torch.equal(gm(x), expected)


def test_select_backend_auto_is_a_no_op():
    gm = _trace(TwoMoELayers())
    result = SELECT_BACKEND.run(gm, {})
    assert (result.modified, result.count) == (False, 0)
    # already pinned to the requested value: nothing to change either
    SELECT_BACKEND.run(gm, {"backend": "reference"})
    again = SELECT_BACKEND.run(gm, {"backend": "reference"})
    assert (again.modified, again.count) == (False, 0)


@pytest.mark.parametrize("graph_pass", DEFAULT_PIPELINE, ids=lambda p: p.name)
def test_negative_dense_graph(graph_pass):
    """No fused nodes: every pass reports modified=False and count 0, and the graph is unchanged."""
    gm = _trace(Dense())
    before = [n.format_node() for n in gm.graph.nodes]
    result = graph_pass.run(gm, {"backend": "reference"})
    assert (result.modified, result.count) == (False, 0)
    assert [n.format_node() for n in result.graph_module.graph.nodes] == before


def test_negative_pipeline_counts_zero():
    gm = _trace(Dense())
    PassManager(list(DEFAULT_PIPELINE), options={"backend": "reference"})(gm)
    assert all(counters["moe_compile"][p.name] == 0 for p in DEFAULT_PIPELINE)


def test_dump_dir_writes_one_file_per_pass(tmp_path):
    PassManager(list(DEFAULT_PIPELINE), dump_dir=str(tmp_path))(_trace(TwoMoELayers()))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00_input.py", "01_annotate_moe.py", "02_select_backend.py", "03_specialize_phase.py",
                     "04_cleanup.py"]
    assert "fused_moe" in (tmp_path / "04_cleanup.py").read_text()


def test_dump_env_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_COMPILE_DUMP", str(tmp_path / "dumps"))
    PassManager(list(DEFAULT_PIPELINE))(_trace(TwoMoELayers()))
    assert len(list((tmp_path / "dumps").glob("*.py"))) == 1 + len(DEFAULT_PIPELINE)


def test_no_dump_without_request(tmp_path, monkeypatch):
    monkeypatch.delenv("MOE_COMPILE_DUMP", raising=False)
    monkeypatch.chdir(tmp_path)
    PassManager(list(DEFAULT_PIPELINE))(_trace(TwoMoELayers()))
    assert list(tmp_path.iterdir()) == []


def test_cleanup_keeps_functorch_level_calls():
    """Dynamo graphs of models that use vmap (Jamba's mask building) enter and leave vmap levels through calls whose
    results nobody reads: removing them would unbalance functorch's level stack."""
    gm = _trace(TwoMoELayers())
    anchor = next(fused_moe_nodes(gm))
    with gm.graph.inserting_before(anchor):
        enter = gm.graph.call_function(torch._C._functorch._vmap_increment_nesting, (5, "error"))
        leave = gm.graph.call_function(torch._C._functorch._vmap_decrement_nesting, ())
    gm.recompile()
    gm = PassManager([CLEANUP])(gm)
    kept = {n.target for n in gm.graph.nodes}
    assert enter.target in kept and leave.target in kept
    assert counters["moe_compile"]["cleanup"] == 2  # still only the dead router logits and their get_attr
