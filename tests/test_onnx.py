"""ONNX export: fused blocks become com.microsoft::MoE nodes (or a dense decomposition), ONNX Runtime on CPU matches
PyTorch within 1e-4 (fp32).

Full causal LMs (`input_ids -> logits`, no KV cache) are exported for a representative set by default (each export
takes ~10 s); set MOE_COMPILE_ONNX_ALL=1 to export every family. A fused block of every family is checked at the
block level in one export.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import moe_compile as mc
from moe_compile.checkpoint import MANIFEST_NAME
from moe_compile.errors import CheckpointError
from moe_compile.models import tiny_model_names
from tests.test_export import optimized

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ATOL = 1e-4
# Full-model export on by default: ORT MoE nodes with biases and clamped SwiGLU (gpt-oss), the dense decomposition
# with a shared expert (deepseek-v3: sigmoid, groups, correction bias, scaling), a non-HF module (user-gpt-fast),
# an export adapter (llama4: complex-valued RoPE exported as its real-valued equivalent).
DEFAULT_FULL = ("tiny-gpt-oss", "tiny-deepseek-v3", "tiny-user-gpt-fast", "tiny-llama4")
# Families whose whole-model ONNX export is not possible with torch 2.13 / transformers 5.24 (their blocks are).
FULL_MODEL_LIMITS: dict[str, str] = {}
# Families exported through an adapter of moe_compile/checkpoint/onnx_adapters.py.
ADAPTED = {"tiny-llama4": ["llama4_real_rotary"]}
# Families whose routing ORT's MoE op cannot express: their blocks export as a dense decomposition.
DENSE_FAMILIES = {"tiny-deepseek-v3", "tiny-glm4-moe", "tiny-llama4"}
ALL = os.environ.get("MOE_COMPILE_ONNX_ALL") == "1"


def run_ort(path, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _fused_or_skip(name):
    model = optimized(name)
    if not model.moe_compile.fused:
        pytest.skip(f"{name}: optimize fuses no block")
    return model


@pytest.mark.parametrize("name", tiny_model_names())
def test_full_model_onnx_matches_torch(name, tmp_path):
    if not ALL and name not in DEFAULT_FULL:
        pytest.skip("whole-model ONNX export of this family runs with MOE_COMPILE_ONNX_ALL=1 (~10-250 s each)")
    model = _fused_or_skip(name)
    if name in FULL_MODEL_LIMITS:
        with pytest.raises(CheckpointError, match="export its MoE blocks"):
            mc.export(model, tmp_path / "onnx", format="onnx", example_input_ids=torch.randint(0, 128, (2, 7)))
        assert not (tmp_path / "onnx").exists()
        return
    out = mc.export(model, tmp_path / "onnx", format="onnx", example_input_ids=torch.randint(0, 128, (2, 7)))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["kind"] == "onnx" and manifest["onnx"]["inputs"] == ["input_ids"]
    assert manifest["onnx"]["ort_cpu_max_abs_error"] <= ATOL
    assert manifest["onnx"]["adapters"] == ADAPTED.get(name, [])
    path = out / "model.onnx"
    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path)).graph
    moe_nodes = [n for n in graph.node if n.domain == "com.microsoft" and n.op_type == "MoE"]
    lowered = [b["onnx_lowering"] for b in manifest["blocks"]]
    assert len(moe_nodes) == lowered.count("com.microsoft::MoE")
    if name in DENSE_FAMILIES:
        assert lowered and all(v.startswith("dense (sigmoid scoring") for v in lowered)
    else:
        assert len(moe_nodes) == len(model.moe_compile.fused)

    # another batch and sequence length than the example: the axes are dynamic where the manifest says so
    shape = (1, 11) if manifest["onnx"]["dynamic"] else (2, 7)
    ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(5))
    (got,) = run_ort(path, {"input_ids": ids.numpy()})
    with torch.no_grad():
        out_t = model(ids)
    expected = getattr(out_t, "logits", out_t).numpy()  # the model as it is (adapters removed after the export)
    assert np.abs(got - expected).max() <= ATOL
    with pytest.raises(CheckpointError, match="onnxruntime"):  # an ONNX export is not a torch checkpoint
        mc.load(out, model=model)


class AllBlocks(nn.Module):
    """Fused blocks of every family side by side: one export checks them all (block level)."""

    def __init__(self, blocks: dict[str, nn.Module]):
        super().__init__()
        self.names = list(blocks)
        self.blocks = nn.ModuleList(blocks.values())

    def forward(self, *xs):
        outs = []
        for block, x in zip(self.blocks, xs):
            out = block(x)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return tuple(outs)


def test_every_fused_block_onnx_matches_torch(tmp_path):
    blocks, inputs = {}, []
    generator = torch.Generator().manual_seed(0)
    for name in tiny_model_names():
        model = optimized(name)
        for block_name in model.moe_compile.fused[:1]:  # one per family: the export's cost grows with the graph
            block = model.get_submodule(block_name)
            blocks[f"{name}:{block_name}"] = block
            x = torch.randn(2, 5, block.spec.hidden_size, generator=generator)
            if block.spec.activation == "swiglu_oai":
                x = x * 30  # drive the expert pre-activations past GPT-OSS's clamp limit (7)
            inputs.append(x)
    wrapper = AllBlocks(blocks).eval()
    out = mc.export(wrapper, tmp_path / "blocks", format="onnx", example_inputs=tuple(inputs))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    lowering = {b["name"]: b["onnx_lowering"] for b in manifest["blocks"]}
    assert len(lowering) == len(blocks)
    assert sum(v == "com.microsoft::MoE" for v in lowering.values()) >= 8
    assert any(v.startswith("dense") for v in lowering.values())

    assert manifest["onnx"]["dynamic"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    other = [torch.randn(3, 9, x.shape[-1], generator=generator) * x.std() for x in inputs]  # new token counts
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), other)})
    with torch.no_grad():
        expected = wrapper(*other)
    for label, g, e in zip(blocks, got, expected):
        assert np.abs(g - e.numpy()).max() <= ATOL * e.abs().max().item(), label  # relative: tiny blocks' outputs

    # the GPT-OSS blocks really ran with clamped pre-activations
    gpt = [(b, x) for b, x in zip(blocks.values(), other) if b.spec.activation == "swiglu_oai"]
    assert gpt
    for block, x in gpt:
        pre = torch.einsum("th,eih->eti", x.reshape(-1, x.shape[-1]), block.w13) + block.b13[:, None]
        assert pre.abs().max() > block.spec.limit


def test_dense_decomposition_is_exact_for_every_routing_variant():
    """dense_moe (the ONNX fallback) equals the reference op for routing variants beyond the tiny families."""
    from moe_compile.checkpoint.onnx_export import dense_moe
    from moe_compile.kernels import reference
    from moe_compile.spec import MoESpec

    g = torch.Generator().manual_seed(0)
    e, h, i, t = 8, 16, 12, 10
    for spec in [MoESpec(e, 2, h, i, scoring="sigmoid", n_group=4, topk_group=2, routed_scaling=2.5,
                         correction_bias=True, renormalize=True),
                 MoESpec(e, 1, h, i, scoring="sigmoid", weight_on_input=True),
                 MoESpec(e, 3, h, i, activation="gelu", gated=False, router_bias=True, expert_bias=True),
                 MoESpec(e, 2, h, i, activation="swiglu_oai", renormalize=True, expert_bias=True)]:
        rows = 2 * i if spec.gated else i
        x = torch.randn(t, h, generator=g)
        rw, rb, cb = torch.randn(e, h, generator=g), torch.randn(e, generator=g), torch.randn(e, generator=g)
        w13, w2 = torch.randn(e, rows, h, generator=g) * 0.3, torch.randn(e, h, i, generator=g) * 0.3
        b13, b2 = torch.randn(e, rows, generator=g), torch.randn(e, h, generator=g)
        args = (x, rw, rb if spec.router_bias else None, cb if spec.correction_bias else None, w13, w2,
                b13 if spec.expert_bias else None, b2 if spec.expert_bias else None)
        expected = reference.torch_fused_moe(*args, **spec.op_kwargs())
        torch.testing.assert_close(dense_moe(*args, spec), expected, atol=1e-5, rtol=1e-5)


def test_onnx_export_needs_example_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="example_input_ids"):
        mc.export(optimized("tiny-qwen3-moe"), tmp_path / "x", format="onnx")


def test_llama4_real_rotary_is_exact_and_temporary():
    """Llama 4 export adapter: the real-valued RoPE equals the complex one (fp32); undone on exit, also on error."""
    from transformers.models.llama4 import modeling_llama4

    from moe_compile.checkpoint.onnx_adapters import onnx_adapters

    model = optimized("tiny-llama4").eval()
    (rotary,) = [m for m in model.modules() if isinstance(m, modeling_llama4.Llama4TextRotaryEmbedding)]
    original_apply = modeling_llama4.apply_rotary_emb
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(9).expand(2, 9)
    g = torch.Generator().manual_seed(4)
    head_dim = rotary.inv_freq.numel() * 2
    xq, xk = torch.randn(2, 9, 4, head_dim, generator=g), torch.randn(2, 9, 2, head_dim, generator=g)
    with torch.no_grad():
        freqs_cis = rotary(ids, positions)
        assert freqs_cis.is_complex()
        want_q, want_k = original_apply(xq, xk, freqs_cis)
        expected = model(ids).logits
        with onnx_adapters(model) as applied:
            assert applied == ["llama4_real_rotary"]
            real = rotary(ids, positions)
            assert not real.is_complex() and real.shape == (*freqs_cis.shape, 2)
            torch.testing.assert_close(real, torch.view_as_real(freqs_cis), atol=1e-6, rtol=0)
            got_q, got_k = modeling_llama4.apply_rotary_emb(xq, xk, real)
            torch.testing.assert_close(got_q, want_q, atol=1e-6, rtol=0)
            torch.testing.assert_close(got_k, want_k, atol=1e-6, rtol=0)
            patched = model(ids).logits
        torch.testing.assert_close(patched, expected, atol=1e-6, rtol=0)
        assert modeling_llama4.apply_rotary_emb is original_apply and "forward" not in vars(rotary)
        with pytest.raises(RuntimeError, match="boom"), onnx_adapters(model):
            raise RuntimeError("boom")
        assert modeling_llama4.apply_rotary_emb is original_apply and "forward" not in vars(rotary)
        assert rotary(ids, positions).is_complex()
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
