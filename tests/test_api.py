"""The public contract of `inspect` / `optimize`: what `model.moe_compile` reports, all-or-nothing on failure,
verify rollback, forced-unavailable features, dense and non-HF models, and training through the fused op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_compile as mc
import moe_compile.api
import moe_compile.rewrite
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.models import build_tiny_model
from moe_compile.prove import Proof
from moe_compile.report import OptimizeResult
from tests.conftest import TOLERANCES, relative_error

QWEN_BLOCKS = ["model.layers.0.mlp", "model.layers.1.mlp"]


def _ids(seq=7, seed=0):
    return torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(seed))


def _snapshot(model: nn.Module):
    """Everything that must be unchanged after a failed or read-only call: module objects, tensors, attributes."""
    modules = {name: module for name, module in model.named_modules()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(_ids()).logits
    return modules, state, logits


def _assert_unchanged(model: nn.Module, snapshot):
    modules, state, logits = snapshot
    now = dict(model.named_modules())
    assert now.keys() == modules.keys()
    assert all(now[name] is module for name, module in modules.items())  # same objects, nothing swapped
    current = model.state_dict()
    assert current.keys() == state.keys()
    assert all(torch.equal(current[k], v) for k, v in state.items())  # bitwise
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, logits)
    assert not hasattr(model, "moe_compile")


# ---- the report contract ----

def test_moe_compile_contract():
    model = build_tiny_model("tiny-qwen3-moe")
    with torch.no_grad():
        expected = model(_ids()).logits
    assert mc.optimize(model, "conservative") is model  # in place, same object
    r = model.moe_compile
    assert isinstance(r, OptimizeResult)
    assert r.fused == QWEN_BLOCKS
    assert r.skipped == {}
    assert r.passes == ["detect", "prove", "rewrite", "verify", "emit:eager"]
    assert r.pass_counts == {"rewrite": 2}
    assert r.backend == "auto" and r.profile == "conservative" and r.device == "cpu"
    assert 0.0 <= r.max_error <= TOLERANCES[torch.float32]
    assert r.max_error == max(r.block_errors.values())
    assert r.features["fuse_moe"] is True and r.features["compile"] is False
    assert set(r.features) >= {"fuse_moe", "compile", "cuda_graphs", "fp8", "sparsity_24"}
    assert r.unavailable == {}  # conservative asks for nothing this machine lacks
    assert {name: s.top_k for name, s in r.specs.items()} == {name: 2 for name in QWEN_BLOCKS}
    assert all(isinstance(model.get_submodule(name), FusedMoEBlock) for name in r.fused)
    assert "fused" in str(r) and r.to_dict()["max_error"] == r.max_error
    with torch.no_grad():
        assert relative_error(model(_ids()).logits, expected) <= TOLERANCES[torch.float32]


def test_unavailable_features_reported_for_auto():
    """`auto` for a feature this version lacks is reported in `.unavailable`, not applied, not an error."""
    model = build_tiny_model("tiny-olmoe")
    mc.optimize(model, "aggressive")
    r = model.moe_compile
    assert r.features["fuse_shared_expert"] is False
    assert "fuse_shared_expert" in r.unavailable and "not in this version" in r.unavailable["fuse_shared_expert"]
    assert r.fused  # the rest still applied


def test_second_optimize_keeps_the_record():
    model = build_tiny_model("tiny-qwen3-moe")
    mc.optimize(model, "conservative")
    first = model.moe_compile
    mc.optimize(model, "conservative")
    assert model.moe_compile.fused == first.fused
    assert model.moe_compile.block_errors == first.block_errors
    assert model.moe_compile.pass_counts["rewrite"] == 0  # nothing new rewritten


def test_backend_override_reference():
    model = build_tiny_model("tiny-deepseek-v3")
    with torch.no_grad():
        expected = model(_ids()).logits
    mc.optimize(model, "conservative", backend="reference")
    assert model.moe_compile.backend == "reference"
    assert [model.get_submodule(n).backend for n in model.moe_compile.fused] == ["reference"]
    with torch.no_grad():
        assert relative_error(model(_ids()).logits, expected) <= TOLERANCES[torch.float32]


# ---- all or nothing ----

def test_failure_mid_way_restores_everything(monkeypatch):
    """The 2nd block's verify raises: the 1st block, already swapped, is put back; the model is as before."""
    model = build_tiny_model("tiny-qwen3-moe")
    snapshot = _snapshot(model)
    calls = []
    real_verify = moe_compile.rewrite.verify_block

    def verify_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure on the second block")
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(moe_compile.rewrite, "verify_block", verify_then_fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        mc.optimize(model, "conservative")
    assert len(calls) == 2
    _assert_unchanged(model, snapshot)


def test_failure_in_emit_restores_every_block(monkeypatch):
    model = build_tiny_model("tiny-qwen3-moe")
    snapshot = _snapshot(model)

    def broken_emit(*args, **kwargs):
        raise RuntimeError("injected emit failure")

    monkeypatch.setattr(moe_compile.api, "apply_emit", broken_emit)
    with pytest.raises(RuntimeError, match="injected emit failure"):
        mc.optimize(model, "conservative")
    _assert_unchanged(model, snapshot)


def test_failure_restores_training_mode(monkeypatch):
    model = build_tiny_model("tiny-qwen3-moe").train()

    def failing_verify(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(moe_compile.rewrite, "verify_block", failing_verify)
    with pytest.raises(RuntimeError):
        mc.optimize(model, "conservative")
    assert all(m.training for m in model.modules())


def test_forced_unavailable_feature_raises_before_any_change():
    model = build_tiny_model("tiny-qwen3-moe")
    snapshot = _snapshot(model)
    with pytest.raises(mc.FeatureUnavailableError, match="specialize_phase"):
        mc.optimize(model, "conservative", specialize_phase=True)
    _assert_unchanged(model, snapshot)


# ---- verify rollback ----

def test_block_missing_tolerance_stays_and_is_reported(monkeypatch):
    """A wrong proven spec (renorm flipped) for the first block: verify catches it, the block keeps its original
    module and is reported; the second block is fused as usual."""
    model = build_tiny_model("tiny-qwen3-moe")
    original_first = model.get_submodule(QWEN_BLOCKS[0])
    with torch.no_grad():
        expected = model(_ids()).logits
    real_prove = moe_compile.rewrite.prove

    def wrong_first(candidate, *args, **kwargs):
        proof = real_prove(candidate, *args, **kwargs)
        if candidate.name == QWEN_BLOCKS[0]:
            return Proof(proof.spec.replace(renormalize=not proof.spec.renormalize), proof.layout, proof.error)
        return proof

    monkeypatch.setattr(moe_compile.rewrite, "prove", wrong_first)
    mc.optimize(model, "conservative")
    r = model.moe_compile
    assert r.fused == [QWEN_BLOCKS[1]]
    assert "misses its tolerance" in r.skipped[QWEN_BLOCKS[0]]
    assert model.get_submodule(QWEN_BLOCKS[0]) is original_first
    assert set(r.block_errors) == {QWEN_BLOCKS[1]} and r.max_error <= TOLERANCES[torch.float32]
    with torch.no_grad():
        assert relative_error(model(_ids()).logits, expected) <= TOLERANCES[torch.float32]


# ---- models without MoE, models that are not HF ----

def test_dense_model_fuses_nothing():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    snapshot = _snapshot(model)
    assert len(mc.inspect(model).blocks) == 0
    mc.optimize(model, "conservative")
    assert model.moe_compile.fused == [] and model.moe_compile.skipped == {}
    assert model.moe_compile.max_error == 0.0
    del model.moe_compile
    _assert_unchanged(model, snapshot)


def test_inspect_leaves_model_untouched():
    model = build_tiny_model("tiny-gpt-oss")
    snapshot = _snapshot(model)
    report = mc.inspect(model)
    assert [b.name for b in report.blocks] == QWEN_BLOCKS  # same block paths in GPT-OSS
    assert all(b.supported and b.spec is not None and b.spec.activation == "swiglu_oai" for b in report.blocks)
    assert report.num_supported == 2 and "swiglu_oai" in str(report)
    _assert_unchanged(model, snapshot)


class _Expert(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.w1, self.w3 = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)  # gate, up
        self.w2 = nn.Linear(i, h, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class HandWrittenMoE(nn.Module):
    """Not from transformers: router Linear + ModuleList of gated MLPs, softmax top-2 renormalised."""

    def __init__(self, h=24, i=40, e=6, k=2):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList(_Expert(h, i) for _ in range(e))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, H]
        weights, ids = self.gate(x).softmax(-1).topk(self.k, -1)  # [T, K]
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (ids == e).nonzero(as_tuple=True)
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(shape)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.moe, self.out = nn.Linear(24, 24), HandWrittenMoE(), nn.Linear(24, 24)
        with torch.no_grad():
            self.moe.gate.weight.mul_(20)  # decisive routing

    def forward(self, x):
        return self.out(self.moe(torch.relu(self.inp(x))))


def test_non_hf_module():
    net = TinyNet()
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        expected = net(x)
    mc.optimize(net, "conservative")
    assert net.moe_compile.fused == ["moe"]
    spec = net.moe_compile.specs["moe"]
    assert (spec.num_experts, spec.top_k, spec.renormalize, spec.activation) == (6, 2, True, "silu")
    with torch.no_grad():
        assert relative_error(net(x), expected) <= TOLERANCES[torch.float32]


# ---- training through the fused op ----

# fused parameter -> original parameter, per MoE block (Qwen3-MoE, transformers 5: canonical layout already)
_QWEN_PARAM_MAP = {"router_weight": "gate.weight", "w13": "experts.gate_up_proj", "w2": "experts.down_proj"}


def _original_name(fused_name: str) -> str:
    for block in QWEN_BLOCKS:
        prefix = block + "."
        if fused_name.startswith(prefix) and fused_name[len(prefix):] in _QWEN_PARAM_MAP:
            return prefix + _QWEN_PARAM_MAP[fused_name[len(prefix):]]
    return fused_name


def test_training_matches_original():
    """SGD through the fused model (op autograd) gives the losses and gradients of HF eager on the same data."""
    original = build_tiny_model("tiny-qwen3-moe").train()
    fused = mc.optimize(build_tiny_model("tiny-qwen3-moe").train(), "conservative")
    assert fused.moe_compile.fused == QWEN_BLOCKS and all(m.training for m in fused.modules())
    original_params = dict(original.named_parameters())
    pairs = [(name, p, original_params[_original_name(name)]) for name, p in fused.named_parameters()]
    assert len(pairs) == len(original_params)
    assert all(torch.equal(p, q) for _, p, q in pairs)  # same starting point, mapping checked
    opt_fused = torch.optim.SGD(fused.parameters(), lr=0.1)
    opt_original = torch.optim.SGD(original.parameters(), lr=0.1)
    for step in range(3):
        ids = _ids(seq=9, seed=step)
        losses = []
        for model, opt in ((fused, opt_fused), (original, opt_original)):
            opt.zero_grad()
            loss = model(ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        assert relative_error(losses[0], losses[1]) <= TOLERANCES[torch.float32], step
        for name, p, q in pairs:
            assert p.grad is not None and q.grad is not None, name
            assert relative_error(p.grad, q.grad) <= TOLERANCES[torch.float32], (step, name)
        opt_fused.step()
        opt_original.step()
    assert losses[0] < 10  # finite and trained


def test_compile_feature_on_cpu_emits_torch_compile():
    """Forcing `compile` on a CPU model wraps it with the moe_compile backend (the Inductor run itself is tested once,
    in tests/passes/test_backend.py)."""
    model = build_tiny_model("tiny-olmoe")
    mc.optimize(model, "conservative", compile=True)
    assert model.moe_compile.features["compile"] is True
    assert model.moe_compile.passes[-1] == "emit:torch.compile(backend=moe_compile, dynamic=True)"
    assert model._compiled_call_impl is not None


# ---- training scripts that use the router aux loss ----

@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-gpt-oss", "tiny-mixtral"])
def test_router_logits_and_aux_loss_survive_fusion(name):
    """`output_router_logits=True` (the load-balancing aux loss of MoE fine-tuning) records the same router logits
    after fusion, the aux loss trains the shared router weight, and the state_dict keys gain no router copy."""
    model = build_tiny_model(name)
    ids = _ids()
    expected = model(ids, labels=ids, output_router_logits=True)
    mc.optimize(model, "conservative")
    assert not any("router_module" in key for key in model.state_dict())
    actual = model(ids, labels=ids, output_router_logits=True)
    assert len(actual.router_logits) == len(expected.router_logits) > 0
    for got, want in zip(actual.router_logits, expected.router_logits):
        assert relative_error(got, want) <= TOLERANCES[torch.float32]
    assert relative_error(actual.aux_loss, expected.aux_loss) <= TOLERANCES[torch.float32]
    actual.aux_loss.backward()
    fused = next(m for m in model.modules() if isinstance(m, FusedMoEBlock))
    assert fused.router_weight.grad is not None and fused.router_weight.grad.abs().sum() > 0
