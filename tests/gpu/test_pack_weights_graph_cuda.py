"""FP8 / 2:4 as graph passes on a CUDA GPU with FP8 tensor cores: `torch.compile(backend="moe_compile",
options={"fp8": True})` with Inductor packs each fused_moe node's experts once at compile time and runs the real
FP8 / 2:4 Triton kernels; its logits match the module-level passes' (the same packing, run eagerly)."""

from __future__ import annotations

import copy

import pytest
import torch

import moe_compile as mc
from moe_compile.counters import counters, reset
from moe_compile.models import build_tiny_model
from moe_compile.passes import quantize_fp8, sparsify_24
from tests.conftest import relative_error

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run on the device machine)", allow_module_level=True)
if torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs a GPU with FP8 tensor cores (sm_89+: Ada, Hopper)", allow_module_level=True)

pytestmark = pytest.mark.gpu
MODEL = "tiny-qwen3-moe"  # two MoE layers
LAYERS = 2
# the same packed kernels in both forms; Inductor fuses the bf16 ops around them differently (bf16 rounding)
SAME_KERNELS_BF16 = 2e-2
FEATURES = {"fp8": {"fp8": True}, "sparsity_24": {"sparsity_24": True},
            "fp8+sparsity_24": {"fp8": True, "sparsity_24": True}}


@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
def test_compiled_packing_runs_the_packed_kernels(features):
    torch._dynamo.reset()
    reset()
    model = mc.optimize(build_tiny_model(MODEL).to("cuda", torch.bfloat16), "conservative")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()
    packed = copy.deepcopy(model)
    if features.get("sparsity_24"):
        sparsify_24(packed)
    if features.get("fp8"):
        quantize_fp8(packed)
    with torch.no_grad():
        dense = model(ids).logits
        expected = packed(ids).logits
        actual = torch.compile(model, backend="moe_compile", options=features)(ids).logits
    c = counters["moe_compile"]
    assert c["sparsify_24_graph"] == (LAYERS if features.get("sparsity_24") else 0)
    assert c["quantize_fp8_graph"] == (LAYERS if features.get("fp8") else 0)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= SAME_KERNELS_BF16
    if features.get("sparsity_24"):  # half the weights gone: far from dense, so the packed weights are what ran
        assert relative_error(actual, dense) > 2 * relative_error(actual, expected)  # H100: 0.024 vs 0.006
