"""The `moe_compile` torch.compile backend on optimized tiny HF models: one fused_moe node per MoE layer reaches the
passes, counters say so, outputs equal eager; negative, option and dump cases; one full Inductor compile."""

from __future__ import annotations

import pytest
import torch

import moe_compile as mc
from moe_compile.backend import moe_compile_backend
from moe_compile.counters import counters, reset
from moe_compile.models import build_tiny_model
from moe_compile.models.tiny import TINY_MODELS
from tests.conftest import TOLERANCES, relative_error

EAGER = {"inner": "eager"}
# qwen3: plain fused blocks; gpt-oss: tuple-returning blocks whose unread aux output cleanup removes;
# deepseek-v3: a dense first layer, and attention that writes its KV halves in place (cleanup must keep that)
MODELS = ["tiny-qwen3-moe", "tiny-gpt-oss", "tiny-deepseek-v3"]


@pytest.fixture(scope="module")
def optimized():
    """name -> (optimized model, input ids, eager logits of the original model)."""
    out = {}
    for name in MODELS:
        model = build_tiny_model(name)
        ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = model(ids).logits
        mc.optimize(model, "conservative")
        assert len(model.moe_compile.fused) == TINY_MODELS[name].moe_layers
        out[name] = (model, ids, expected)
    return out


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    reset()


@pytest.mark.parametrize("name", MODELS)
def test_counters_equal_moe_layers_and_outputs_match(optimized, name):
    model, ids, expected = optimized[name]
    compiled = torch.compile(model, backend="moe_compile", options=EAGER)
    with torch.no_grad():
        actual = compiled(ids).logits
    c = counters["moe_compile"]
    assert c["graphs"] == 1  # no graph break: the fused block is Dynamo-friendly
    assert c["annotate_moe"] == TINY_MODELS[name].moe_layers  # exactly one fused_moe node per MoE layer
    assert c["select_backend"] == 0  # backend "auto": nothing pinned
    if name == "tiny-gpt-oss":  # blocks return (hidden, routing weights); the layer drops the weights, so cleanup
        assert c["cleanup"] > 0  # removes their recomputation
    assert relative_error(actual, expected) <= TOLERANCES[torch.float32]


def test_cleanup_keeps_in_place_writes(optimized):
    """Regression: fx's default DCE treats `call_method` as pure and dropped DeepSeek-V3's `key_states[..].copy_()`,
    changing the logits by ~0.2. The cleanup must remove only side-effect-free nodes."""
    model, ids, _ = optimized["tiny-deepseek-v3"]
    captured = {}

    def keep_graph(gm, example_inputs):
        captured["gm"] = gm
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=keep_graph)(ids)
    gm = captured["gm"]
    copies = sum(1 for n in gm.graph.nodes if n.op == "call_method" and n.target == "copy_")
    assert copies > 0
    from moe_compile.passes import DEFAULT_PIPELINE, PassManager

    gm = PassManager(list(DEFAULT_PIPELINE))(gm)
    assert sum(1 for n in gm.graph.nodes if n.op == "call_method" and n.target == "copy_") == copies


def test_select_backend_and_dump_dir_options(optimized, tmp_path):
    model, ids, expected = optimized["tiny-qwen3-moe"]
    options = {"inner": "eager", "backend": "reference", "dump_dir": str(tmp_path)}
    with torch.no_grad():
        actual = torch.compile(model, backend="moe_compile", options=options)(ids).logits
    assert counters["moe_compile"]["select_backend"] == 2  # both MoE layers pinned
    assert relative_error(actual, expected) <= TOLERANCES[torch.float32]
    files = sorted(p.name for p in (tmp_path / "graph_000").iterdir())  # one folder per captured graph
    assert files == ["00_input.py", "01_annotate_moe.py", "02_select_backend.py", "03_specialize_phase.py",
                     "04_cleanup.py"]
    after = (tmp_path / "graph_000" / "04_cleanup.py").read_text()
    assert after.count("moe_compile.fused_moe") >= 2 and "'reference'" in after


def test_negative_dense_graph():
    """A graph without fused_moe nodes (a dense MLP, or any model not optimized): the passes count 0 and change
    nothing, so the backend is plain Inductor / eager."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    x = torch.randn(3, 32)
    with torch.no_grad():
        actual = torch.compile(model, backend="moe_compile", options=EAGER)(x)
    c = counters["moe_compile"]
    assert c["graphs"] == 1
    assert c["annotate_moe"] == c["select_backend"] == c["cleanup"] == 0
    assert torch.equal(actual, model(x))


@pytest.mark.parametrize("options, message", [
    ({"bakend": "reference"}, "unknown moe_compile backend options"),  # a typo is not silently ignored
    ({"inner": "tensorrt"}, "option inner must be"),
    ({"inner": "eager", "max_autotune": True}, "need inner='inductor'"),  # Inductor options without Inductor
    ({"inner": "eager", "cudagraphs": True}, "need inner='inductor'"),
])
def test_bad_options_are_errors(options, message):
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=message):
        moe_compile_backend(gm, [torch.randn(2, 4)], options=options)
    assert counters["moe_compile"]["graphs"] == 0


@pytest.mark.slow
def test_inductor_end_to_end(optimized):
    """The full path: passes, then Inductor (CPU C++ codegen), dynamic token count; one compile, two lengths.
    Cold-cache compile takes 30-60 s on 2 cores (the Inductor FX graph cache makes reruns ~10 s)."""
    model, ids, expected = optimized["tiny-qwen3-moe"]
    # `cudagraphs` (as emit/generate.py passes it) goes to Inductor as triton.cudagraphs: a no-op on CPU graphs
    compiled = torch.compile(model, backend="moe_compile", dynamic=True, options={"cudagraphs": True})
    longer = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        actual = compiled(ids).logits
        actual_longer = compiled(longer).logits
        expected_longer = model(longer).logits
    assert counters["moe_compile"]["graphs"] == 1  # dynamic: the second length reuses the compiled graph
    assert counters["moe_compile"]["annotate_moe"] == 2
    assert relative_error(actual, expected) <= TOLERANCES[torch.float32]
    assert relative_error(actual_longer, expected_longer) <= TOLERANCES[torch.float32]
