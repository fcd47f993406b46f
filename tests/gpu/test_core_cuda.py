"""The core parity tests on a CUDA GPU in bf16 with the reference backend, and the compile backend on CUDA."""

from __future__ import annotations

import pytest
import torch

import moe_compile as mc
from moe_compile.counters import counters
from moe_compile.models import TINY_MODELS, build_tiny_model
from tests.conftest import TOLERANCES, relative_error

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run on the device machine)", allow_module_level=True)

pytestmark = pytest.mark.gpu
HF_FAMILIES = [name for name, tiny in TINY_MODELS.items() if tiny.builder is None and tiny.skip_reason is None]
PROMPT = torch.tensor([[3, 17, 42, 5, 99, 8, 61]])


def _cuda_bf16(name: str):
    return build_tiny_model(name).to(device="cuda", dtype=torch.bfloat16)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_bf16_cuda_parity_reference_backend(name):
    model = _cuda_bf16(name)
    ids = torch.randint(0, 128, (2, 11), device="cuda")
    expected = _logits(model, ids)
    mc.optimize(model, "conservative", backend="reference")
    assert len(model.moe_compile.fused) == TINY_MODELS[name].moe_layers, model.moe_compile.skipped
    assert relative_error(_logits(model, ids), expected) < TOLERANCES[torch.bfloat16]


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_bf16_cuda_greedy_generate_same_tokens(name):
    model = _cuda_bf16(name)
    prompt = PROMPT.cuda()
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False)
    mc.optimize(model, "conservative", backend="reference")
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False), expected)


def test_torch_compile_backend_runs_on_cuda():
    model = _cuda_bf16("tiny-qwen3-moe")
    ids = torch.randint(0, 128, (2, 9), device="cuda")
    mc.optimize(model, "conservative")
    eager = _logits(model, ids)
    counters.clear()
    compiled = torch.compile(model, backend="moe_compile")
    assert relative_error(_logits(compiled, ids), eager) < TOLERANCES[torch.bfloat16]
    assert counters["moe_compile"]["annotate_moe"] >= TINY_MODELS["tiny-qwen3-moe"].moe_layers


def test_balanced_profile_generates_on_cuda_fp32():
    """The balanced plumbing (static cache, CUDA-graph decode) in fp32, where no rounding can flip a token."""
    model = build_tiny_model("tiny-qwen3-moe").cuda()
    prompt = PROMPT.cuda()
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False)
    mc.optimize(model, "balanced")
    assert model.moe_compile.features["cuda_graphs"]  # decode from CUDA graphs; prefill eager with fused kernels
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), expected)
