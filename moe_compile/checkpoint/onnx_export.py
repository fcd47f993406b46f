"""ONNX export: each fused MoE block becomes one `com.microsoft::MoE` node where ONNX Runtime's op computes the same
routing, otherwise a dense all-experts formulation in standard ONNX ops (exact: unselected experts get weight 0).

Path: `torch.onnx.export(..., dynamo=True, custom_translation_table={fused_moe: translate_fused_moe})`. The
translation (an onnxscript function) computes router logits with plain MatMul/Add, permutes the canonical
`w13 [E, 2I, H]` (gate rows then up rows) into ORT's interleaved SwiGLU layout (`swiglu_fusion=1`, the only one the
CPU kernel runs; constant-folded by the exporter) and emits `MoE(k, normalize_routing_weights, activation_type=
"swiglu", ...)`. Blocks whose routing ORT's op cannot express (sigmoid scoring, correction bias, group-limited top-k,
routed scaling, weights on the input, non-SiLU/GPT-OSS activations) run `dense_moe` during the export instead, which
the exporter lowers to standard ops. Shared experts and their gates stay plain ops outside the MoE node. Family
computations the exporter cannot lower (Llama 4's complex-valued RoPE) run an exact real-valued stand-in during the
export (`onnx_adapters.py`; the manifest's `onnx.adapters` names those applied).

ORT's `MoE` (com.microsoft, version 1): routing = softmax over E of `router_probs` (our logits) -> top-k ->
optional renormalisation; SwiGLU = `gate * sigmoid(alpha * gate) * (linear + beta)` with gate clamped to
`<= swiglu_limit` and linear to `[-limit, limit]` when a limit is given (GPT-OSS: alpha 1.702, beta 1, limit 7).
"""

from __future__ import annotations

import contextlib
import inspect as pyinspect
import logging
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moe_compile.checkpoint import atomic
from moe_compile.checkpoint.manifest import record_file, write_manifest
from moe_compile.checkpoint.onnx_adapters import onnx_adapters
from moe_compile.errors import CheckpointError, MissingDependencyError
from moe_compile.fused_block import finish_output
from moe_compile.kernels import reference
from moe_compile.spec import MoESpec

log = logging.getLogger("moe_compile")

ONNX_NAME = "model.onnx"
ORT_MOE = "com.microsoft::MoE"
DENSE = "dense"  # lowering of a block that ORT's MoE op cannot express
# Largest |onnxruntime - torch| accepted by the built-in check, relative to max |torch output| of that output.
VERIFY_ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"ONNX export needs onnx and onnxscript ({exc.name} is missing): "
                                     f"pip install 'moe-compile[onnx]'") from exc


def ort_moe_unfit(spec: MoESpec) -> str | None:
    """Why ORT's `com.microsoft::MoE` cannot compute this block exactly, or None when it can."""
    if spec.scoring != "softmax":
        return f"{spec.scoring} scoring (ORT's MoE routes by softmax)"
    if spec.correction_bias:
        return "a selection-only correction bias"
    if spec.n_group > 1 and spec.topk_group < spec.n_group:
        return "group-limited top-k"
    if spec.routed_scaling != 1.0:
        return f"routed scaling x{spec.routed_scaling:g}"
    if spec.weight_on_input:
        return "routing weights applied to the expert input"
    if not spec.gated or spec.activation not in ("silu", "swiglu_oai"):
        return f"{'gated ' if spec.gated else 'non-gated '}{spec.activation} experts"
    return None


# ----------------------------------------------------------------------------------------------------------------
# com.microsoft::MoE translation


_SCHEMA_REGISTERED = False


def register_ort_moe_schema() -> None:
    """onnxscript needs an `onnx.defs` schema for the contrib op before a function may call it (once per process)."""
    global _SCHEMA_REGISTERED
    from onnx import defs

    if _SCHEMA_REGISTERED:
        return
    try:
        defs.get_schema("MoE", 1, "com.microsoft")
        _SCHEMA_REGISTERED = True  # registered by someone else in this process
        return
    except defs.SchemaError:
        pass
    param, optional = defs.OpSchema.FormalParameter, defs.OpSchema.FormalParameterOption.Optional
    attr, kind = defs.OpSchema.Attribute, defs.OpSchema.AttrType
    inputs = [param("input", "T"), param("router_probs", "T"), param("fc1_experts_weights", "T"),
              param("fc1_experts_bias", "T", param_option=optional), param("fc2_experts_weights", "T"),
              param("fc2_experts_bias", "T", param_option=optional),
              param("fc3_experts_weights", "T", param_option=optional),
              param("fc3_experts_bias", "T", param_option=optional)]
    attributes = [attr(name, t, "", required=False) for name, t in [
        ("activation_type", kind.STRING), ("k", kind.INT), ("normalize_routing_weights", kind.INT),
        ("swiglu_fusion", kind.INT), ("use_sparse_mixer", kind.INT), ("activation_alpha", kind.FLOAT),
        ("activation_beta", kind.FLOAT), ("swiglu_limit", kind.FLOAT)]]
    defs.register_schema(defs.OpSchema(
        "MoE", "com.microsoft", 1, inputs=inputs, outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=attributes))
    _SCHEMA_REGISTERED = True


def translate_fused_moe(x, router_weight, router_bias, correction_bias, w13, w2, b13, b2, top_k, scoring,
                        renormalize, n_group, topk_group, routed_scaling, weight_on_input, activation, alpha, limit,
                        backend="auto"):
    """onnxscript translation of `moe_compile::fused_moe` to one `com.microsoft::MoE` node (traced, not scripted)."""
    import onnxscript
    from onnxscript import opset18 as op

    spec = MoESpec(num_experts=w13.shape[0], top_k=top_k, hidden_size=w13.shape[2], intermediate_size=w2.shape[2],
                   scoring=scoring, renormalize=renormalize, n_group=n_group, topk_group=topk_group,
                   routed_scaling=routed_scaling, correction_bias=correction_bias is not None,
                   weight_on_input=weight_on_input, activation=activation, gated=w13.shape[1] == 2 * w2.shape[2])
    reason = ort_moe_unfit(spec)
    if reason is not None:  # export_onnx routes such blocks through dense_moe; reaching here is a bug
        raise CheckpointError(f"fused_moe with {reason} cannot become {ORT_MOE}")
    experts, inter, hidden = spec.num_experts, spec.intermediate_size, spec.hidden_size
    ms = onnxscript.values.Opset("com.microsoft", 1)
    logits = op.MatMul(x, op.Transpose(router_weight, perm=[1, 0]))  # [T, E]
    if router_bias is not None:
        logits = op.Add(logits, router_bias)
    # [E, 2I, H] gate rows then up rows -> [E, I, 2, H] -> interleaved [E, 2I, H] (row 2i gate i, row 2i+1 up i)
    fc1 = op.Reshape(w13, op.Constant(value_ints=[experts, 2, inter, hidden]))
    fc1 = op.Reshape(op.Transpose(fc1, perm=[0, 2, 1, 3]), op.Constant(value_ints=[experts, 2 * inter, hidden]))
    fc1_bias = None
    if b13 is not None:
        fc1_bias = op.Reshape(b13, op.Constant(value_ints=[experts, 2, inter]))
        fc1_bias = op.Reshape(op.Transpose(fc1_bias, perm=[0, 2, 1]), op.Constant(value_ints=[experts, 2 * inter]))
    attrs: dict[str, Any] = {"k": top_k, "activation_type": "swiglu", "swiglu_fusion": 1,
                             "normalize_routing_weights": int(bool(renormalize))}
    if activation == "swiglu_oai":
        attrs.update(activation_alpha=float(alpha), activation_beta=1.0, swiglu_limit=float(limit))
    return ms.MoE(x, logits, fc1, fc1_bias, w2, b2, **attrs)


# ----------------------------------------------------------------------------------------------------------------
# dense formulation for the blocks ORT's op cannot express


def dense_moe(x: Tensor, router_weight: Tensor, router_bias: Tensor | None, correction_bias: Tensor | None,
              w13: Tensor, w2: Tensor, b13: Tensor | None, b2: Tensor | None, spec: MoESpec) -> Tensor:
    """`fused_moe` without data-dependent control flow: every expert runs on every token, unselected experts get
    weight 0 (exact up to summation order). x [T, H] -> [T, H]. Costs E/K times the expert FLOPs."""
    logits = reference.router_logits(x, router_weight, router_bias)  # [T, E]
    weights, ids = reference.route(logits, correction_bias, spec.top_k, spec.scoring, spec.renormalize, spec.n_group,
                                   spec.topk_group, spec.routed_scaling)  # [T, K] fp32
    acc = reference.acc_dtype(x.dtype)
    dense = torch.zeros(logits.shape, dtype=acc, device=x.device).scatter(1, ids, weights.to(acc))  # [T, E]
    coef = dense.t().unsqueeze(-1)  # [E, T, 1]
    if spec.weight_on_input:
        xin = (x.unsqueeze(0).to(acc) * coef).to(x.dtype)  # [E, T, H]
        coef = torch.zeros_like(dense).scatter(1, ids, 1.0).t().unsqueeze(-1)  # selection mask [E, T, 1]
    else:
        xin = x.unsqueeze(0)  # [1, T, H]
    h = torch.matmul(xin, w13.transpose(1, 2))  # [E, T, 2I]
    if b13 is not None:
        h = h + b13.unsqueeze(1)
    experts, tokens = h.shape[0], h.shape[1]
    a = reference.apply_activation(h.reshape(experts * tokens, h.shape[2]), spec.intermediate_size, spec.gated,
                                   spec.activation, spec.alpha, spec.limit).reshape(experts, tokens, -1)  # [E, T, I]
    y = torch.matmul(a, w2.transpose(1, 2))  # [E, T, H]
    if b2 is not None:
        y = y + b2.unsqueeze(1)
    return (y.to(acc) * coef).sum(dim=0).to(x.dtype)  # [T, H]


def _dense_forward(self, hidden_states: Tensor, *args, **kwargs):
    """`FusedMoEBlock.forward` with `dense_moe` in place of the op (same return contract)."""
    spec = self.spec
    x = hidden_states.reshape(-1, spec.hidden_size)  # [T, H]
    out = dense_moe(x, self.router_weight, self.router_bias, self.correction_bias, self.w13, self.w2, self.b13,
                    self.b2, spec)
    return finish_output(self, hidden_states, x, out)


@contextlib.contextmanager
def onnx_lowering(model: nn.Module) -> Iterator[dict[str, str]]:
    """Route the blocks ORT's MoE cannot express through `dense_moe` for the duration; yield block -> lowering."""
    from moe_compile.fused_block import fused_blocks

    lowering: dict[str, str] = {}
    patched = []
    try:
        for name, block in fused_blocks(model).items():
            reason = ort_moe_unfit(block.spec)
            lowering[name] = ORT_MOE if reason is None else f"{DENSE} ({reason})"
            if reason is not None:
                block.forward = types.MethodType(_dense_forward, block)
                patched.append(block)
        yield lowering
    finally:
        for block in patched:
            del block.forward


# ----------------------------------------------------------------------------------------------------------------
# export


class _LogitsOf(nn.Module):
    """input_ids [B, S] -> logits [B, S, V] of a causal LM, without a KV cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        params = pyinspect.signature(model.forward).parameters
        self.use_cache = "use_cache" in params

    def forward(self, input_ids: Tensor) -> Tensor:
        out = self.model(input_ids, use_cache=False) if self.use_cache else self.model(input_ids)
        if isinstance(out, (tuple, list)):
            return out[0]
        return getattr(out, "logits", out)


def export_onnx(model: nn.Module, out_dir: str | Path, force: bool = False,
                example_input_ids: Tensor | None = None, example_inputs: tuple | None = None,
                dynamic: bool = True, opset: int | None = None, verify: bool = True,
                extra_files: dict[str, Any] | None = None) -> Path:
    """Write `out_dir/model.onnx` (+ config and manifest), atomically.

    `example_input_ids` [B, S]: export the causal LM `input_ids -> logits` without a KV cache, batch and sequence
    dynamic (`dynamic=True`). `example_inputs`: export `model(*example_inputs)` as it is (all dims static unless
    `dynamic`, which marks every dim of every tensor input dynamic). `verify`: run the file in ONNX Runtime (CPU) on the
    example inputs and fail unless it matches PyTorch (`VERIFY_ATOL`).
    """
    _require_onnx()
    import onnx

    from moe_compile.checkpoint import base_manifest, save_hf_configs, write_extra_files

    if (example_input_ids is None) == (example_inputs is None):
        raise CheckpointError("ONNX export needs exactly one of example_input_ids= (causal LMs) or example_inputs=")
    if example_input_ids is not None:
        module: nn.Module = _LogitsOf(model)
        args = (example_input_ids,)
        input_names, output_names = ["input_ids"], ["logits"]
        shapes = ({0: "batch", 1: "sequence"},) if dynamic else None
    else:
        module, args = model, tuple(example_inputs)
        input_names, output_names = None, None
        shapes = _auto_dynamic_shapes(module, args) if dynamic else None
    register_ort_moe_schema()
    was_training = model.training
    model.eval()
    target = Path(out_dir).absolute()
    module.eval()
    dynamic_failure = None
    try:
        with onnx_lowering(model) as lowering, onnx_adapters(model) as adapters, torch.no_grad():
            try:
                program = _torch_onnx_export(module, args, input_names, output_names, opset, shapes)
            except Exception as exc:
                if shapes is None or type(exc).__name__ != "TorchExportError":  # only tracing depends on shapes
                    raise _export_error(model, exc) from exc
                dynamic_failure = _first_line(exc)
                log.warning("moe_compile: ONNX export with dynamic shapes failed (%s); exporting with the example "
                            "input's static shapes", dynamic_failure)
                try:
                    program = _torch_onnx_export(module, args, input_names, output_names, opset, None)
                except Exception as exc2:
                    raise _export_error(model, exc2) from exc2
            expected = module(*args)
    finally:
        model.train(was_training)
    with atomic.atomic_directory(target, force) as tmp:
        program.save(str(tmp / ONNX_NAME))
        written = sorted(p.name for p in tmp.iterdir())  # model.onnx and any external-data file
        for name in written:
            atomic.file_written(tmp / name)
        onnx.checker.check_model(str(tmp / ONNX_NAME))
        proto = onnx.load(str(tmp / ONNX_NAME), load_external_data=False)
        nodes = [f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in proto.graph.node]
        error = verify_with_ort(tmp / ONNX_NAME, args, expected) if verify else None
        files: dict[str, Any] = {}
        for name in written + save_hf_configs(model, tmp) + write_extra_files(tmp, extra_files):
            record_file(files, tmp, name)
        manifest = base_manifest("onnx", model)
        for entry in manifest["blocks"]:
            entry["onnx_lowering"] = lowering.get(entry["name"])
        manifest.update(files=files, onnx={
            "file": ONNX_NAME,
            "inputs": [i.name for i in proto.graph.input], "outputs": [o.name for o in proto.graph.output],
            "opsets": {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import},
            "ort_moe_nodes": nodes.count(ORT_MOE), "num_nodes": len(nodes),
            "dynamic": dynamic and dynamic_failure is None, "dynamic_failure": dynamic_failure,
            "causal_lm_logits": example_input_ids is not None, "use_cache": False, "adapters": adapters,
            "ort_cpu_max_abs_error": error})
        atomic.file_written(write_manifest(tmp, manifest))
    return target


def _auto_dynamic_shapes(module: nn.Module, args: tuple) -> Any:
    """Every dim of every tensor (nested in lists/tuples too) `Dim.AUTO`: dynamic unless the trace specialises it.
    A `*args` forward takes its inputs as one structure, as torch.export expects."""
    from torch.utils import _pytree as pytree

    auto = torch.export.Dim.AUTO
    shapes = pytree.tree_map(lambda a: {d: auto for d in range(a.dim())} if isinstance(a, Tensor) else None,
                             tuple(args))
    params = list(pyinspect.signature(module.forward).parameters.values())
    if params and params[0].kind is pyinspect.Parameter.VAR_POSITIONAL:
        return (shapes,)
    return shapes


def _torch_onnx_export(module, args, input_names, output_names, opset, shapes):
    return torch.onnx.export(
        module, args, dynamo=True, input_names=input_names, output_names=output_names, opset_version=opset,
        dynamic_shapes=shapes, verbose=False,
        custom_translation_table={torch.ops.moe_compile.fused_moe.default: translate_fused_moe})


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    summary = text.split("## Exception summary", 1)[-1].strip()  # torch.onnx puts the cause after this heading
    lines = [line.strip() for line in summary.splitlines() if line.strip() and not line.startswith("⬆")]
    return lines[0][:300] if lines else type(exc).__name__


def _export_error(model: nn.Module, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"torch.onnx could not export {type(model).__name__} ({_first_line(exc)}); export its MoE blocks or decoder "
        f"layers instead: mc.export(block, out_dir, format='onnx', example_inputs=(hidden_states,))")


def verify_with_ort(path: Path, args: tuple, expected: Any) -> float:
    """Max |onnxruntime(CPU) - torch| over the outputs; raises CheckpointError beyond `VERIFY_ATOL`."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError("verifying an ONNX export needs onnxruntime: pip install 'moe-compile[onnx]' "
                                     "(or pass verify=False)") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tensors = [a for a in args if isinstance(a, Tensor)]
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), tensors)}
    outputs = session.run(None, feeds)
    flat = [expected] if isinstance(expected, Tensor) else [t for t in expected if isinstance(t, Tensor)]
    error = 0.0
    for got, want in zip(outputs, flat):
        want = want.detach().float().cpu()
        diff = (torch.from_numpy(got).float() - want).abs().max().item()
        scale = max(want.abs().max().item(), 1e-6)
        tol = VERIFY_ATOL.get(flat[0].dtype, 5e-2) * scale
        if not diff <= tol:
            raise CheckpointError(f"the ONNX file disagrees with PyTorch in ONNX Runtime (max abs error {diff:.2e} > "
                                  f"{tol:.1e}); not written")
        error = max(error, diff)
    return error
