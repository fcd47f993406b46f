"""sparsify_24_graph, quantize_fp8_graph: FP8 / 2:4 expert weights as graph passes over `fused_moe` nodes.

The graph form of the module-level `sparsify_24` / `quantize_fp8` passes, with the same numerics (shared helpers
`sparse24_experts` / `fp8_experts`). For each `fused_moe` node the w13 / w2 inputs are resolved to real tensors:
  * `get_attr` nodes (fx.symbolic_trace, the unlifted module of a torch.export program);
  * placeholders whose example input is a module parameter or buffer (Dynamo lifts those to graph inputs and hands
    the real tensors to the backend; the backend passes them on as option `example_inputs`).
They are packed once, at compile time, into a `PackedExperts` registered on the GraphModule (`moe_<format>_<layer>`),
and the node becomes a `fused_moe_packed` node with the same routing scalars (`act_quant="fp8_per_token"` for FP8).
The packed copies are frozen: the graph never sees later updates of the original weights.

Options: `sparsity_24` / `fp8` (True enables the pass), `fp8_scales` ({layer: (w13_scale [E, 2I], w2_scale [E, H])},
the layer being `node.meta["moe"]["layer"]` from annotate_moe, e.g. ModelOpt-calibrated scales via
`scales_by_layer`; other layers get max scales). `sparsify_24_graph` runs before `quantize_fp8_graph`, which then
quantizes the compressed values. Nodes whose weights are not constants (a graph input that is not a parameter,
a weight computed in the graph, weights trained under grad mode), nodes packed already and 2:4 on a reduction dim
not a multiple of 4 are skipped, each with a logged warning that names the reason; the graph is left as it was.
Counts the nodes rewritten.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from moe_compile.fused_block import fused_blocks
from moe_compile.kernels.op import available_packed_backends
from moe_compile.passes.base import GraphPass, PassResult
from moe_compile.passes.fused_nodes import argument, is_fused_moe
from moe_compile.passes.quantize_fp8 import fp8_experts
from moe_compile.passes.sparsify_24 import sparse24_experts, unsupported_24
from moe_compile.quant.packed import PackedExperts

log = logging.getLogger("moe_compile")

SPARSIFY_NAME = "sparsify_24_graph"
FP8_NAME = "quantize_fp8_graph"
PACKED_PREFIX = "moe_"  # packed submodules on the GraphModule: moe_<format>_<layer>
FUSED_MOE_PACKED = torch.ops.moe_compile.fused_moe_packed
_PACKED_SCHEMA = FUSED_MOE_PACKED.default._schema
_PACKED_TENSORS = ("w13", "w2", "w13_scale", "w2_scale", "w13_meta", "w2_meta")  # what a PackedExperts supplies
Weight = Union[Tensor, str]  # a resolved tensor, or the reason it could not be resolved


class _Skip(Exception):
    """A node this pass leaves as it is; the message is the reason (logged as a warning)."""


class _AlreadyPacked(_Skip):
    """Nothing left to do for this node (logged at info level)."""


def is_fused_moe_packed(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (FUSED_MOE_PACKED, FUSED_MOE_PACKED.default)


def packed_argument(node: torch.fx.Node, name: str) -> Any:
    """Argument `name` of a `fused_moe_packed` node, positional or keyword, else the schema default."""
    index = next(i for i, a in enumerate(_PACKED_SCHEMA.arguments) if a.name == name)
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, _PACKED_SCHEMA.arguments[index].default_value)


def scales_by_layer(model: nn.Module, scales: dict[str, tuple[Tensor, Tensor]]) -> dict[int, tuple[Tensor, Tensor]]:
    """Per-block scales (block name -> (w13_scale, w2_scale), as `quantize_fp8` and ModelOpt calibration give them)
    keyed by layer index instead, for option `fp8_scales`. The index of a block is its position among the model's
    fused blocks, which is its `fused_moe` node's layer in a graph that captures the whole model (no graph break)."""
    names = list(fused_blocks(model))
    unknown = sorted(set(scales) - set(names))
    if unknown:
        raise ValueError(f"scales given for {unknown}, which are not fused MoE blocks of this model ({names})")
    return {names.index(name): pair for name, pair in scales.items()}


# ---- resolving a weight input to the real tensor ----

def _resolve(gm: torch.fx.GraphModule, arg: Any, placeholders: dict[torch.fx.Node, Any]) -> Weight:
    """The real tensor behind a weight input, or why there is none."""
    if not isinstance(arg, torch.fx.Node):
        return arg if isinstance(arg, Tensor) else f"weight argument {arg!r} is not a tensor"
    if arg.op == "get_attr":
        value: Any = gm
        for part in arg.target.split("."):
            value = getattr(value, part, None)
        return value if isinstance(value, Tensor) else f"get_attr {arg.target!r} is not a tensor on the module"
    if arg.op == "placeholder":
        if arg not in placeholders:
            return (f"graph input {arg.name!r} has no example value (the pass needs the real inputs as option "
                    "`example_inputs`, which the torch.compile backend passes)")
        value = placeholders[arg]
        # Dynamo hands over module parameters as nn.Parameter and marks module buffers static
        if not (isinstance(value, nn.Parameter) or hasattr(value, "_dynamo_static_input_type")):
            return (f"graph input {arg.name!r} is not a module parameter or buffer: a weight that can change "
                    "between calls cannot be packed at compile time")
        return value
    return f"weight {arg.name!r} is computed in the graph ({arg.op} {arg.target}), not a constant"


def _constant(value: Weight, what: str, compiling: bool) -> Tensor:
    """The tensor to pack, else _Skip. `compiling`: under torch.compile, whose graph runs in the grad mode it was
    captured in (Dynamo guards on it), so a weight that requires grad under grad mode is being trained."""
    if isinstance(value, str):
        raise _Skip(f"{what}: {value}")
    if torch._subclasses.fake_tensor.is_fake(value) or value.is_meta:
        raise _Skip(f"{what}: a fake or meta tensor holds no values to pack")
    if compiling and value.requires_grad and torch.is_grad_enabled():
        raise _Skip(f"{what}: requires grad and grad mode is on, so it may be trained; a packed copy would drop its "
                    "gradients (compile under torch.no_grad() / torch.inference_mode(), or requires_grad_(False))")
    return value.detach()


def _placeholder_values(gm: torch.fx.GraphModule, options: dict[str, Any]) -> dict[torch.fx.Node, Any]:
    example_inputs = options.get("example_inputs")
    if example_inputs is None:
        return {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(placeholders, example_inputs))


# ---- rewriting a node ----

def _layer(node: torch.fx.Node) -> Optional[int]:
    return node.meta.get("moe", {}).get("layer")


def _register(gm: torch.fx.GraphModule, node: torch.fx.Node, packed: PackedExperts) -> str:
    """Add `packed` to gm as `moe_<format>_<layer>` (e.g. `moe_fp8_sparse24_0`); returns the name."""
    layer = _layer(node) if _layer(node) is not None else node.name
    base = f"{PACKED_PREFIX}{packed.weight_format.replace('+', '_')}_{layer}"
    name, suffix = base, 1
    while hasattr(gm, name):
        name, suffix = f"{base}_{suffix}", suffix + 1
    gm.add_submodule(name, packed)
    _set_sources(gm, [f"{name}.{t}" for t, _ in packed.named_buffers()])
    return name


def _set_sources(gm: torch.fx.GraphModule, added: list[str], removed: tuple[str, ...] = ()) -> None:
    """Keep a Dynamo graph's parameter-name -> source map in step with its buffers: AOTAutograd (under Inductor)
    looks every parameter and buffer of the GraphModule up there. A packed buffer is a constant of the graph."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is None:  # not a Dynamo graph
        return
    from torch._dynamo.source import ConstantSource

    sources = {k: v for k, v in sources.items() if k.split(".")[0] not in removed}  # a copy: Dynamo owns the original
    gm._param_name_to_source = {**sources, **{key: ConstantSource(key) for key in added}}


def _packed_backend(backend: str) -> str:
    """The node's backend if it has packed kernels; else `auto` (e.g. the `cuda` decode kernel that
    specialize_phase pins has no packed variant: the packed op then picks its best kernel)."""
    return backend if backend in available_packed_backends() else "auto"


def _rewrite(gm: torch.fx.GraphModule, node: torch.fx.Node, packed: PackedExperts) -> None:
    """Replace `node` (fused_moe or fused_moe_packed) by a fused_moe_packed node reading `packed`'s tensors."""
    read = argument if is_fused_moe(node) else packed_argument
    name = _register(gm, node, packed)
    graph = gm.graph
    old_inputs = [a for a in node.all_input_nodes if a.op == "get_attr"]
    with graph.inserting_before(node):
        tensors = {t: None if getattr(packed, t) is None else graph.get_attr(f"{name}.{t}") for t in _PACKED_TENSORS}
        args = [read(node, a) for a in ("x", "router_weight", "router_bias", "correction_bias")]
        args += [tensors["w13"], tensors["w2"], read(node, "b13"), read(node, "b2")]
        args += [tensors[t] for t in ("w13_scale", "w2_scale", "w13_meta", "w2_meta")]
        scalars = [a.name for a in _PACKED_SCHEMA.arguments[len(args):] if a.name not in ("act_quant", "backend")]
        kwargs = {s: read(node, s) for s in scalars}
        kwargs.update(act_quant=packed.act_quant, backend=_packed_backend(read(node, "backend")))
        new = graph.call_function(FUSED_MOE_PACKED.default, tuple(args), kwargs)
    new.meta = dict(node.meta)  # same output ([T, H] like x): val / example_value, stack trace, moe annotation
    new.meta["moe"] = {**node.meta.get("moe", {}), "packed_module": name, "weight_format": packed.weight_format}
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    for unused in [a for a in old_inputs if not a.users]:
        graph.erase_node(unused)
    _drop_unreferenced_packed(gm)


def _drop_unreferenced_packed(gm: torch.fx.GraphModule) -> None:
    """Free the packed submodules these passes added that no node reads any more (2:4 values replaced by their
    FP8 quantization)."""
    used = {n.target.split(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}
    ours = [n for n, m in gm.named_children() if isinstance(m, PackedExperts) and n.startswith(PACKED_PREFIX)]
    unused = tuple(n for n in ours if n not in used)
    for name in unused:
        delattr(gm, name)
    _set_sources(gm, [], unused)


# ---- the passes ----

def _dense_weights(gm: torch.fx.GraphModule, node: torch.fx.Node, inputs: dict) -> tuple[Tensor, Tensor]:
    """(w13, w2) of a fused_moe node as real tensors; `inputs` are the placeholders' example values."""
    return tuple(_constant(_resolve(gm, argument(node, w), inputs), w, bool(inputs)) for w in ("w13", "w2"))


def _plan_sparsify(gm: torch.fx.GraphModule, node: torch.fx.Node, inputs: dict) -> PackedExperts:
    if is_fused_moe_packed(node):
        raise _AlreadyPacked("already packed (module-level FP8 / 2:4, or this pass ran before)")
    w13, w2 = _dense_weights(gm, node, inputs)
    reason = unsupported_24(w13, w2)
    if reason:
        raise _Skip(reason)
    return sparse24_experts(w13, w2)


def _plan_fp8(gm: torch.fx.GraphModule, node: torch.fx.Node, inputs: dict, scales: dict) -> PackedExperts:
    given = scales.get(_layer(node))
    try:
        if is_fused_moe(node):
            return fp8_experts(*_dense_weights(gm, node, inputs), given)
        ours = node.meta.get("moe", {}).get("packed_module")  # set on the nodes sparsify_24_graph rewrote
        sparse = gm.get_submodule(ours) if ours else None
        if sparse is None or sparse.fp8:
            raise _AlreadyPacked("already packed (module-level FP8 / 2:4, or this pass ran before)")
        return fp8_experts(sparse.w13, sparse.w2, given, sparse.w13_meta, sparse.w2_meta)  # 2:4 from sparsify_24_graph
    except ValueError as exc:  # a given scale that does not fit the weights: fail before anything changed
        raise ValueError(f"option fp8_scales[{_layer(node)}]: {exc}") from exc


def _candidates(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if is_fused_moe(n) or is_fused_moe_packed(n)]


def _run(name: str, gm: torch.fx.GraphModule, options: dict[str, Any], plan) -> PassResult:
    inputs = _placeholder_values(gm, options)
    planned = []
    for node in _candidates(gm):  # plan every node first: an error (a bad given scale) leaves the graph unchanged
        try:
            planned.append((node, plan(node, inputs)))
        except _Skip as skip:
            level = logging.INFO if isinstance(skip, _AlreadyPacked) else logging.WARNING
            log.log(level, "%s: fused MoE node %s (layer %s) left as it is: %s", name, node.name, _layer(node), skip)
    for node, packed in planned:
        _rewrite(gm, node, packed)
    return PassResult(gm, bool(planned), len(planned))


def run_sparsify_24(gm: torch.fx.GraphModule, options: dict[str, Any]) -> PassResult:
    if not options.get("sparsity_24", False):
        return PassResult(gm, False, 0)
    return _run(SPARSIFY_NAME, gm, options, lambda node, inputs: _plan_sparsify(gm, node, inputs))


def run_quantize_fp8(gm: torch.fx.GraphModule, options: dict[str, Any]) -> PassResult:
    if not options.get("fp8", False):
        return PassResult(gm, False, 0)
    scales = dict(options.get("fp8_scales") or {})
    layers = {_layer(n) for n in _candidates(gm)}
    unused = sorted(set(scales) - layers, key=str)
    if unused and layers:  # (a graph without MoE layers, e.g. after a graph break, has no use for any)
        log.warning("%s: fp8_scales given for layers %s, which this graph does not have (its layers: %s)",
                    FP8_NAME, unused, sorted(layer for layer in layers if layer is not None))
    return _run(FP8_NAME, gm, options, lambda node, inputs: _plan_fp8(gm, node, inputs, scales))


SPARSIFY_24_GRAPH = GraphPass(SPARSIFY_NAME, run_sparsify_24, requires=("annotate_moe",),
                              description="2:4-compress fused_moe expert weights at compile time")
QUANTIZE_FP8_GRAPH = GraphPass(FP8_NAME, run_quantize_fp8, requires=("annotate_moe",),
                               description="FP8-quantize fused_moe expert weights at compile time")
WEIGHT_PASSES = [SPARSIFY_24_GRAPH, QUANTIZE_FP8_GRAPH]  # 2:4 first: FP8 then quantizes the compressed values
