"""FP8 attention linears on the CPU: `FP8Linear`'s emulated numerics, the `quantize_linears_fp8` pass on real tiny
transformers models (which linears, counts, undo), its gated step in `optimize`, checkpoints, and odd shapes."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import moe_compile as mc
from moe_compile.counters import counters
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.models import build_tiny_model
from moe_compile.passes.quantize_linears_fp8 import quantize_linears_fp8
from moe_compile.quant import FP8_DTYPE, sqnr
from moe_compile.quant.fp8_linear import FP8Linear
from tests.conftest import relative_error

E4M3_MAX = 448.0
FP8_LINEAR_MIN_SQNR_DB = 25.0  # W8A8 e4m3 (per-channel weights, per-token inputs) vs the high-precision linear
# the emulated path against an fp64 computation on the same quantized operands: fp32 rounding only, or bf16
# rounding of the dequantized operands and the output (8 bits of mantissa)
EMULATION_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def fp8_linears(model) -> dict[str, FP8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def fused(name: str, dtype=torch.float32, **overrides):
    return mc.optimize(build_tiny_model(name, dtype=dtype, **overrides), "conservative", verify=False)


# ---- FP8Linear ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_path_equals_a_direct_dequantized_computation(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 48).to(dtype)
    module = FP8Linear.from_linear(linear)
    x = torch.randn(2, 5, 96, dtype=dtype)  # leading dims [B, S]
    out = module(x)
    assert out.shape == (2, 5, 48) and out.dtype == dtype and module.path.startswith("emulated")
    # the same numbers computed directly, in fp64: per-channel weight scales, per-token input scales
    w = linear.weight.double()
    w_scale = w.abs().amax(dim=1) / E4M3_MAX  # [N]
    assert torch.equal(module.weight_scale, w_scale.float()) and module.weight.dtype == FP8_DTYPE
    w_deq = (w / w_scale[:, None]).to(FP8_DTYPE).double() * w_scale[:, None]
    xf = x.reshape(10, 96).double()
    x_scale = (xf.abs().amax(dim=1) / E4M3_MAX).float().double()  # [T], fp32 like the stored scales
    x_deq = (xf / x_scale[:, None]).to(FP8_DTYPE).double() * x_scale[:, None]
    expected = (x_deq @ w_deq.T + linear.bias.double()).reshape(2, 5, 48)
    assert relative_error(out, expected) < EMULATION_TOLERANCE[dtype]
    assert sqnr(linear(x).double(), out) > FP8_LINEAR_MIN_SQNR_DB  # and FP8 stays close to the original linear


def test_dtype_casts_keep_the_fp8_weight_and_fp32_scales():
    module = FP8Linear.from_linear(nn.Linear(32, 16))
    weight = module.weight.clone()
    module.to(torch.float16)
    assert module.weight.dtype == FP8_DTYPE and torch.equal(module.weight.view(torch.uint8), weight.view(torch.uint8))
    assert module.weight_scale.dtype == torch.float32 and module.bias.dtype == torch.float16
    assert module(torch.randn(3, 32, dtype=torch.float16)).dtype == torch.float16


def test_gradients_reach_the_input_straight_through_the_rounding():
    module = FP8Linear.from_linear(nn.Linear(32, 16))
    x = torch.randn(4, 32, requires_grad=True)
    out = module(x)
    out.sum().backward()
    with torch.no_grad():
        assert torch.equal(out, module(x))  # the same forward values with and without gradients
    torch.testing.assert_close(x.grad, module.dense_weight().sum(0).expand(4, 32), rtol=1e-5, atol=1e-6)


def test_bad_storage_is_refused_with_the_remedy():
    with pytest.raises(ValueError, match="float8_e4m3fn weight .* FP8Linear.from_linear"):
        FP8Linear(torch.randn(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match=r"weight_scale must have shape \(4,\)"):
        FP8Linear(torch.randn(4, 8).to(FP8_DTYPE), torch.ones(8))


# ---- the pass: which linears ----

def _attention(layers, owner, names):
    return {f"{layer}.{owner}.{n}" for layer in layers for n in names}


QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPECTED = {  # model -> the linears FP8 must take: the attention projections of every decoder layer, nothing else
    "tiny-qwen3-moe": _attention(["model.layers.0", "model.layers.1"], "self_attn", QKVO),
    "tiny-qwen2-moe": _attention(["model.layers.0", "model.layers.1"], "self_attn", QKVO),  # shared expert: no
    "tiny-qwen3-moe-mixed": _attention([f"model.layers.{i}" for i in range(3)], "self_attn", QKVO),  # dense layer 1
    "tiny-deepseek-v3": _attention(["model.layers.0", "model.layers.1"], "self_attn",  # MLA; dense MLP of layer 0: no
                                   ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")),
    "tiny-dbrx": _attention(["transformer.blocks.0", "transformer.blocks.1"], "norm_attn_norm.attn",
                            ("Wqkv", "out_proj")),  # fused qkv, one level down
    "tiny-user-gpt-fast": _attention(["layers.0", "layers.1"], "attn", ("qkv", "proj")),  # a user's own modules
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pass_replaces_exactly_the_attention_linears(name):
    model = fused(name)
    ids = IDS.clamp(max=model.config.vocab_size - 1) if hasattr(model.config, "vocab_size") else IDS
    before = logits(model, ids)
    high_precision = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n not in EXPECTED[name]}
    counted = counters["moe_compile"]["quantize_linears_fp8"]
    result = quantize_linears_fp8(model)
    assert set(fp8_linears(model)) == EXPECTED[name] and result.count == len(EXPECTED[name])
    assert counters["moe_compile"]["quantize_linears_fp8"] - counted == result.count
    assert all(model.get_submodule(n) is m for n, m in high_precision.items())  # lm_head, routers, MLPs untouched
    assert all(b.router_weight.dtype == torch.float32 for b in model.modules() if isinstance(b, FusedMoEBlock))
    assert relative_error(logits(model, ids), before) < 0.1  # FP8 noise, not a broken model
    assert quantize_linears_fp8(model).count == 0  # nothing left: the negative case


def test_linears_whose_owner_reads_the_weight_itself_are_skipped():
    """Jamba's Mamba mixer computes `dt_proj.weight @ ...` itself: an FP8 weight there would break it."""
    model = fused("tiny-jamba")
    result = quantize_linears_fp8(model)
    reasons = {n: r for n, r in result.skipped.items() if n.endswith("dt_proj")}
    assert reasons and all("reads dt_proj.weight" in r for r in reasons.values())
    assert result.count > 0 and logits(model).isfinite().all()


def test_include_patterns_restrict_the_pass():
    model = fused("tiny-qwen3-moe")
    result = quantize_linears_fp8(model, include=["*.o_proj"])
    assert set(fp8_linears(model)) == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}
    assert "not matched by include" in result.skipped["model.layers.0.self_attn.q_proj"]


def test_undo_restores_the_model_bit_exactly():
    model = fused("tiny-qwen3-moe", torch.bfloat16)
    before_logits, before_state = logits(model), {k: v.clone() for k, v in model.state_dict().items()}
    originals = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    result = quantize_linears_fp8(model)
    assert not torch.equal(logits(model), before_logits)
    result.undo()
    assert not fp8_linears(model) and all(model.get_submodule(n) is m for n, m in originals.items())
    assert torch.equal(logits(model), before_logits)
    state = model.state_dict()
    assert state.keys() == before_state.keys() and all(torch.equal(state[k], v) for k, v in before_state.items())


def test_odd_shapes_run_emulated_and_are_skipped_where_the_kernel_is_wanted():
    """hidden 40, head_dim 10: no projection has K and N multiples of 16."""
    model = fused("tiny-qwen3-moe", hidden_size=40, head_dim=10)
    before = logits(model)
    kernel_only = quantize_linears_fp8(model, skip_unaligned=True)
    assert kernel_only.count == 0 and len(kernel_only.skipped) == 8
    assert all("not multiples of 16" in reason for reason in kernel_only.skipped.values())
    result = quantize_linears_fp8(model)
    assert result.count == 8 and all(m.path.startswith("emulated") for m in fp8_linears(model).values())
    assert logits(model).isfinite().all() and relative_error(logits(model), before) < 0.1


# ---- optimize: the gated step ----

def calibration_ids():
    return torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(1))


def test_optimize_gates_attention_as_a_step_of_fp8_and_reports_it():
    model = build_tiny_model("tiny-qwen3-moe")
    mc.optimize(model, "conservative", fp8=True, calibration_text=calibration_ids(), fp8_calibration="max",
                quality_thresholds={"fp8": 1.0}, verify=False, fp8_attention=True)
    r = model.moe_compile
    q, q8 = r.quality["fp8_attention"], r.quality["fp8"]
    assert q["gated"] and q["applied"] and q["linears"] == 8 and q["threshold"] == 1.0
    assert q["ppl_base"] == q8["ppl_base"]  # measured against the model before any FP8: one budget for the feature
    assert r.pass_counts["quantize_linears_fp8"] == 8 and "quantize_linears_fp8" in r.passes
    assert len(fp8_linears(model)) == 8 and "quality gate fp8_attention" in str(r)


def test_a_rejected_attention_step_keeps_the_expert_fp8():
    model = build_tiny_model("tiny-qwen3-moe")
    counted = counters["moe_compile"]["quantize_linears_fp8"]
    mc.optimize(model, "conservative", fp8=True, calibration_text=calibration_ids(), fp8_calibration="max",
                quality_thresholds={"fp8": 1.0, "fp8_attention": -0.5},  # a bar no step can meet
                verify=False, fp8_attention=True)
    r = model.moe_compile
    assert not r.quality["fp8_attention"]["applied"] and "quality gate" in r.quality["fp8_attention"]["reason"]
    assert r.features["fp8"] is True and r.quality["fp8"]["applied"] and "fp8_attention" not in r.unavailable
    assert not fp8_linears(model) and "quantize_linears_fp8" not in r.pass_counts
    assert counters["moe_compile"]["quantize_linears_fp8"] == counted  # the rolled-back rewrites are not counted
    assert all(b.packed.weight_format == "fp8" for b in model.modules() if isinstance(b, FusedMoEBlock))


def test_fp8_keeps_attention_in_high_precision_unless_asked():
    model = build_tiny_model("tiny-qwen3-moe")
    mc.optimize(model, "conservative", fp8=True, fp8_calibration="max", verify=False)  # the default
    assert not fp8_linears(model) and "fp8_attention" not in model.moe_compile.quality
    assert model.moe_compile.quality["fp8"]["applied"]


def test_optimize_is_all_or_nothing_when_a_later_step_fails():
    """A failure after the attention step (here: the gate's measurement of it) leaves the model as it was."""
    model = build_tiny_model("tiny-qwen3-moe")
    before = logits(model)
    originals = {n: m for n, m in model.named_modules()}

    def fail_on_fp8(module, args, kwargs):
        if isinstance(module.q_proj, FP8Linear):
            raise RuntimeError("attention failed")

    hook = model.model.layers[0].self_attn.register_forward_pre_hook(fail_on_fp8, with_kwargs=True)
    with pytest.raises(RuntimeError, match="attention failed"):
        mc.optimize(model, "conservative", fp8=True, calibration_text=calibration_ids(), fp8_calibration="max",
                    quality_thresholds={"fp8": 1.0}, verify=False, fp8_attention=True)
    hook.remove()
    assert {n: m for n, m in model.named_modules()} == originals  # every module is the original object again
    assert torch.equal(logits(model), before)


def test_quality_model_attention_fp8_stays_within_one_percent():
    """The design's FP8 bar (perplexity within 1% of bf16) for experts and attention together, on the trained
    quality model, measured on its held-out text."""
    from moe_compile.quality import encode, load_quality_model
    from moe_compile.quality.corpus import heldout_bytes

    model = load_quality_model(torch.bfloat16)
    mc.optimize(model, "conservative", fp8=True, calibration_text=encode(heldout_bytes(4096)),
                fp8_calibration="max", verify=False, fp8_attention=True)
    q = model.moe_compile.quality["fp8_attention"]
    assert q["gated"] and q["applied"] and q["increase"] <= 0.01 and q["linears"] == 16


# ---- checkpoints ----

@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-gpt-oss"])  # gpt-oss: attention with biases
def test_checkpoint_round_trip_gives_identical_logits(name, tmp_path):
    from moe_compile.checkpoint import MANIFEST_NAME, WEIGHTS_NAME
    from moe_compile.checkpoint.restore import read_header

    model = build_tiny_model(name)  # fp32: a bf16 model rebuilt from its config differs in its rotary buffers
    mc.optimize(model, "conservative", fp8=True, fp8_calibration="max", verify=False, fp8_attention=True)
    saved = fp8_linears(model)
    out = mc.export(model, tmp_path / "ckpt")
    assert json.loads((out / MANIFEST_NAME).read_text())["format_version"] == 3
    header = read_header(out / WEIGHTS_NAME)
    q_proj = "model.layers.0.self_attn.q_proj"
    assert header[f"{q_proj}.weight"][1] == FP8_DTYPE and header[f"{q_proj}.weight_scale"][1] == torch.float32
    loaded = mc.load(out)
    assert fp8_linears(loaded).keys() == saved.keys()
    assert torch.equal(logits(loaded), logits(model))
    half = mc.load(out, dtype=torch.float16)
    layer = fp8_linears(half)[q_proj]
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.dtype == torch.float32
    assert (layer.bias is None) == (saved[q_proj].bias is None) and logits(half).dtype == torch.float16


def test_checkpoint_into_another_architecture_fails_clearly(tmp_path):
    from moe_compile.errors import CheckpointError

    model = build_tiny_model("tiny-qwen3-moe")
    mc.optimize(model, "conservative", fp8=True, fp8_calibration="max", verify=False, fp8_attention=True)
    out = mc.export(model, tmp_path / "ckpt")
    skeleton = build_tiny_model("tiny-qwen3-moe", head_dim=16)  # k_proj [32, 32] instead of [16, 32]
    with pytest.raises(CheckpointError, match=r"k_proj' as an FP8 linear \[16, 32\], but the model's module there "
                                              r"is Linear \[32, 32\]; is this the architecture it was exported"):
        mc.load(out, model=skeleton)
