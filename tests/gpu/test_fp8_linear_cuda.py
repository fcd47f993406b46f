"""FP8 attention linears on a CUDA GPU with FP8 tensor cores: `FP8Linear`'s torch._scaled_mm path against its
emulated path (the same quantization, dequantized operands in the activation dtype), the fallback for shapes the
kernel cannot take, CUDA-graph capture, and the tiny Qwen3-MoE end to end (forced FP8, and `aggressive` with
compile and CUDA-graph decoding)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import moe_compile as mc
from moe_compile.models import build_tiny_model
from moe_compile.quant import sqnr
from moe_compile.quant.fp8_linear import FP8Linear, kernel_takes, quantize_rows
from moe_compile.quant.fp8 import quantize_per_token
from tests.conftest import relative_error

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run on the device machine)", allow_module_level=True)
if torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs a GPU with FP8 tensor cores (sm_89+: Ada, Hopper)", allow_module_level=True)

pytestmark = pytest.mark.gpu
# kernel vs emulation: the same e4m3 operands; the emulation rounds the dequantized operands to the activation
# dtype (bf16: 8 bits of mantissa, fp16: 11) and accumulates in that dtype's matmul, the kernel in fp32 -- but
# Hopper's FP8 tensor-core accumulation keeps fewer bits than fp32 (measured 1.2e-4 at K=512 on an H100)
PATH_TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 5e-4}
FP8_LINEAR_MIN_SQNR_DB = 25.0  # W8A8 e4m3 vs the bf16 linear
LOGITS_PATH_TOLERANCE = 2e-2  # whole model, bf16: kernel path vs emulated path of every FP8 linear
IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def fp8_module(k: int, n: int, bias: bool, dtype=torch.bfloat16) -> tuple[nn.Linear, FP8Linear]:
    linear = nn.Linear(k, n, bias=bias, device="cuda", dtype=dtype)
    return linear, FP8Linear.from_linear(linear)


def emulated(module: FP8Linear, x: torch.Tensor) -> torch.Tensor:
    module.kernel = False
    try:
        return module(x)
    finally:
        module.kernel = True


@pytest.mark.parametrize("tokens", [1, 7, 64, 513])
@pytest.mark.parametrize("k,n,bias", [(2048, 512, False), (256, 384, True)])
def test_scaled_mm_path_equals_the_emulated_path(tokens, k, n, bias):
    torch.manual_seed(tokens)
    linear, module = fp8_module(k, n, bias)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    assert module.path == "scaled_mm" and module._use_kernel(x)
    with torch.no_grad():
        out = module(x)
        assert out.dtype == torch.bfloat16 and out.shape == (tokens, n)
        assert relative_error(out, emulated(module, x)) < PATH_TOLERANCE[torch.bfloat16]
        assert sqnr(linear(x), out) > FP8_LINEAR_MIN_SQNR_DB


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_activation_dtypes_and_leading_dims(dtype):
    """fp16 adds the bias in the kernel's epilogue; fp32 outputs cannot take one there, so it is added after."""
    _, module = fp8_module(512, 256, True, dtype)
    x = torch.randn(2, 9, 512, device="cuda", dtype=dtype)  # [B, S, K]
    assert module._use_kernel(x.reshape(-1, 512)) == kernel_takes(x.device.index, dtype)  # H100: both take it
    with torch.no_grad():
        out = module(x)
        assert out.shape == (2, 9, 256) and out.dtype == dtype
        assert relative_error(out, emulated(module, x)) < PATH_TOLERANCE[dtype]


def test_row_quantization_kernel_matches_the_reference_quantization():
    x = torch.randn(33, 2048, device="cuda", dtype=torch.bfloat16) * 3
    q, scale = quantize_rows(x)
    q_ref, scale_ref = quantize_per_token(x)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)  # amax / 448, up to the division's last bit
    mismatched = (q.float() != q_ref.float()).float().mean().item()
    assert mismatched < 1e-3  # such a bit may round a rare tie the other way: one e4m3 step, a few elements


def test_shapes_the_kernel_cannot_take_run_emulated_with_one_log_line(caplog):
    _, module = fp8_module(40, 24, True)  # K and N not multiples of 16
    x = torch.randn(5, 40, device="cuda", dtype=torch.bfloat16)
    assert module.path.startswith("emulated") and "multiple of 16" in module.path
    with caplog.at_level(logging.WARNING, logger="moe_compile"), torch.no_grad():
        first, second = module(x), module(x)
    assert torch.equal(first, second) and torch.equal(first, emulated(module, x))
    lines = [r for r in caplog.records if "FP8Linear [24, 40]" in r.getMessage()]
    assert len(lines) == 1 and "emulated FP8 path" in lines[0].getMessage()


def test_cuda_graph_replay_follows_new_inputs():
    _, module = fp8_module(1024, 512, True)
    static_x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            module(static_x)  # warm-up (Triton compile, cuBLASLt heuristics) off the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = module(static_x)
        for seed in (1, 2):
            torch.manual_seed(seed)
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            assert torch.equal(static_out, module(static_x))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids.cuda()).logits.float()


def test_tiny_qwen3_moe_attention_runs_the_kernel_end_to_end():
    model = build_tiny_model("tiny-qwen3-moe", dtype=torch.bfloat16).cuda()
    mc.optimize(model, "conservative", fp8=True, fp8_calibration="max", verify=False, fp8_attention=True)
    r = model.moe_compile
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert len(layers) == 8 and r.quality["fp8_attention"]["applied"] and r.pass_counts["quantize_linears_fp8"] == 8
    assert all(m.path == "scaled_mm" for m in layers.values())
    kernel = _logits(model, IDS)
    for m in layers.values():
        m.kernel = False
    assert relative_error(kernel, _logits(model, IDS)) < LOGITS_PATH_TOLERANCE


def test_aggressive_profile_applies_attention_fp8_and_decodes_from_cuda_graphs():
    """`auto` FP8 on an FP8 GPU, behind the gate; compile + CUDA-graph decoding run the FP8 linears."""
    model = build_tiny_model("tiny-qwen3-moe", dtype=torch.bfloat16).cuda()
    calibration = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(1))
    mc.optimize(model, "aggressive", calibration_text=calibration, fp8_calibration="max",
                quality_thresholds={"fp8": 1.0}, verify=False, fp8_attention=True)
    r = model.moe_compile
    assert r.features["fp8"] and r.quality["fp8_attention"]["gated"] and r.quality["fp8_attention"]["applied"]
    prompt = IDS[:1, :7].cuda()
    tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert tokens.shape == (1, 15) and torch.equal(tokens[:, :7], prompt)
