"""One MoE layer forward (router + experts), per model shape and token count, on one card, in one run:
our triton backend (eager and CUDA-graph replay), the torch reference, and the transformers block with each
`experts_implementation` (eager, batched_mm, grouped_mm; plain and CUDA-graph captured) and torch.compile.
With `--formats`, also `fused_moe_packed`'s triton backend on the same weights packed as FP8 (W8A8, per-channel
weight scales, per-token activation scales), 2:4 (bf16 values + metadata) and FP8 + 2:4 (`triton_<format>+graph`
rows, and `cuda_fp8+graph` for the experimental cuda backend's FP8 path up to its 16-token limit; their floor counts
the packed weight bytes, and the FP8 matmul rate for FP8 formats; their error is against the emulated packed
reference). The ceilings (copy bandwidth, bf16 and FP8 matmul rates) are measured first, in the
same run, to give each row its floor.

  python benchmarks/bench_moe_layer.py [--quick] [--shapes qwen3-30b-a3b,...] [--tokens 1,8,...] [--out DIR]
                                       [--formats fp8,sparse24,fp8+sparse24]

Writes DIR/moe_layer_<card>_<date>.csv and a roofline-style plot; prints a summary table last.
Dimension legend: T = tokens, E = experts, K = top_k, H = hidden, I = expert intermediate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_configs  # noqa: E402
import utils  # noqa: E402

from moe_compile.kernels import reference  # noqa: E402

TOKENS = (1, 8, 32, 128, 512, 2048, 8192)
QUICK_TOKENS = (1, 8, 128, 2048, 8192)
# batched_mm gathers each routed row's expert weights ([T*K, 2I, H]): skip it beyond this many gathered bytes
BATCHED_MM_MAX_BYTES = 6 << 30
PACKED_FORMATS = ("fp8", "sparse24", "fp8+sparse24")


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


class Layer:
    """One shape's block and op arguments, with one callable per implementation."""

    def __init__(self, shape, triton_moe):
        self.shape = shape
        self.block, self.cfg, self.w = model_configs.build(shape)
        self.scalars = model_configs.op_scalars(shape, self.cfg)
        self.tm = triton_moe
        self._packed: dict[str, tuple] = {}

    def packed(self, fmt):
        """(w13, w2, w13_scale, w2_scale, w13_meta, w2_meta) of this shape's weights in `fmt`, built once."""
        if fmt not in self._packed:
            from moe_compile.quant.fp8 import quantize_per_channel
            from moe_compile.quant.sparse24 import compress_24

            w13, w2, s13, s2, m13, m2 = self.w["w13"], self.w["w2"], None, None, None, None
            if "sparse24" in fmt:
                (w13, m13), (w2, m2) = compress_24(w13), compress_24(w2)
            if "fp8" in fmt:
                (w13, s13), (w2, s2) = quantize_per_channel(w13), quantize_per_channel(w2)
            self._packed[fmt] = (w13, w2, s13, s2, m13, m2)
            torch.cuda.empty_cache()
        return self._packed[fmt]

    def packed_weight_fraction(self, fmt) -> float:
        """Bytes of the packed expert weights over the bf16 expert weights (biases left out)."""
        packed = sum(t.numel() * t.element_size() for t in self.packed(fmt) if t is not None)
        return packed / (self.shape.experts * 3 * self.shape.hidden * self.shape.inter * 2)

    def packed_args(self, x, fmt):
        w13, w2, s13, s2, m13, m2 = self.packed(fmt)
        w = self.w
        return ((x, w["router_weight"], w["router_bias"], w["correction_bias"], w13, w2, w["b13"], w["b2"], s13, s2,
                 m13, m2), dict(self.scalars, act_quant="fp8_per_token" if "fp8" in fmt else "none"))

    def triton_packed(self, x, fmt):
        from moe_compile.kernels.triton_packed import triton_fused_moe_packed

        args, kwargs = self.packed_args(x, fmt)
        return lambda: triton_fused_moe_packed(*args, **kwargs)

    def packed_reference(self, x, fmt):
        args, kwargs = self.packed_args(x, fmt)
        return lambda: reference.torch_fused_moe_packed(*args, **kwargs)

    def op_args(self, x):
        w = self.w
        return (x, w["router_weight"], w["router_bias"], w["correction_bias"], w["w13"], w["w2"], w["b13"], w["b2"])

    def triton(self, x, config_edit=None):
        if config_edit is None:
            return lambda: self.tm.triton_fused_moe(*self.op_args(x), **self.scalars)
        s = self.scalars

        def run():
            logits = reference.router_logits(x, self.w["router_weight"], self.w["router_bias"])
            weights, ids = reference.route(logits, self.w["correction_bias"], s["top_k"], s["scoring"],
                                           s["renormalize"], s["n_group"], s["topk_group"], s["routed_scaling"])
            cfg = config_edit(self.tm.select_config(ids.numel(), self.shape.experts, self.shape.hidden,
                                                    self.shape.inter, 0))
            return self.tm.triton_experts(x, weights, ids, self.w["w13"], self.w["w2"], self.w["b13"], self.w["b2"],
                                          False, s["activation"], s["alpha"], s["limit"], config=cfg)
        return run

    def cuda(self, x):
        """The experimental `cuda` backend (csrc/moe_decode.cu, one persistent launch; opt in with
        MOE_COMPILE_CUDA_BACKEND=1) -> (callable, "") or (None, why it is unavailable)."""
        try:
            from moe_compile.kernels.cuda_moe import cuda_fused_moe
        except ImportError as exc:
            return None, str(exc).splitlines()[0][:100]
        return (lambda: cuda_fused_moe(*self.op_args(x), **self.scalars)), ""

    def cuda_fp8(self, x):
        """The `cuda` backend's FP8 W8A8 path on the FP8-packed weights -> (callable, "") or (None, why not)."""
        try:
            from moe_compile.kernels.cuda_moe import cuda_fused_moe_packed
        except ImportError as exc:
            return None, str(exc).splitlines()[0][:100]
        args, kwargs = self.packed_args(x, "fp8")
        return (lambda: cuda_fused_moe_packed(*args, **kwargs)), ""

    def triton_v2(self, x):
        """The previous version (benchmarks/NOTES.md, version 2), for before/after in one run: routing as torch
        ops, alignment as a memset + 3 launches, tensor-core decode kernels."""
        s, w, sh = self.scalars, self.w, self.shape

        def run():
            logits = reference.router_logits(x, w["router_weight"], w["router_bias"])
            weights, ids = reference.route(logits, w["correction_bias"], s["top_k"], s["scoring"], s["renormalize"],
                                           s["n_group"], s["topk_group"], s["routed_scaling"])
            cfg = self.tm.select_config(ids.numel(), sh.experts, sh.hidden, sh.inter, 0, allow_gemv=False)
            aligned = self.tm.align_by_expert(ids, sh.experts, cfg.block_m, allow_small=False)
            return self.tm._experts(x, weights.reshape(-1).contiguous(), aligned, w["w13"], w["w2"], w["b13"],
                                    w["b2"], False, s["activation"], s["alpha"], s["limit"], s["top_k"], cfg, None)
        return run

    def reference(self, x):
        return lambda: reference.torch_fused_moe(*self.op_args(x), **self.scalars)

    def hf(self, x, impl, module=None):
        block = self.block if module is None else module
        cfg = self.cfg  # the experts module reads the config object it was built from
        x3 = x.view(1, *x.shape)

        def run():
            cfg._experts_implementation = impl
            out = block(x3)
            out = out[0] if isinstance(out, tuple) else out
            return out.reshape(x.shape)
        return run

    def active_experts(self, x) -> int:
        s = self.scalars
        logits = reference.router_logits(x, self.w["router_weight"], self.w["router_bias"])
        _, ids = reference.route(logits, self.w["correction_bias"], s["top_k"], s["scoring"], s["renormalize"],
                                 s["n_group"], s["topk_group"], s["routed_scaling"])
        return int(ids.unique().numel())


def packed_format(name):
    """The packed format a candidate runs ("fp8", "sparse24", "fp8+sparse24"), or None."""
    if name.startswith("cuda_fp8"):
        return "fp8"
    return next((f for f in sorted(PACKED_FORMATS, key=len, reverse=True) if name == f"triton_{f}+graph"), None)


def candidates(layer, x, tokens, quick, compiled, formats=()):
    """(name, callable or None, use graph, skip reason) for one (shape, T)."""
    sh = layer.shape
    gathered = tokens * sh.top_k * 3 * sh.hidden * sh.inter * 2
    out = [("triton", layer.triton(x), False, ""), ("triton+graph", layer.triton(x), True, ""),
           ("triton_v2+graph", layer.triton_v2(x), True, ""), ("reference", layer.reference(x), False, "")]
    out += [(f"triton_{fmt}+graph", layer.triton_packed(x, fmt), True, "") for fmt in formats]
    (cuda, cuda_skip), cuda_limit = layer.cuda(x), 16  # cuda_moe.MAX_TOKENS: beyond it the backend runs triton
    if cuda is not None and tokens > cuda_limit:
        cuda_skip = f"past the cuda decode limit ({cuda_limit} tokens): runs triton"
    out += [("cuda", cuda, False, cuda_skip), ("cuda+graph", cuda, True, cuda_skip)]
    if "fp8" in formats:
        cuda_fp8, fp8_skip = layer.cuda_fp8(x)
        out.append(("cuda_fp8+graph", cuda_fp8, True, cuda_skip if cuda_fp8 is not None else fp8_skip))
    if tokens >= 2048:  # combine A/B: write [N, H] rows and sum over K instead of fp32 atomics
        out.append(("triton_rowsum+graph", layer.triton(x, lambda c: replace(c, atomic_combine=False)), True, ""))
    eager_skip = "quick: eager loop only up to 128 tokens" if quick and tokens > 128 else ""
    out.append(("hf_eager", layer.hf(x, "eager"), False, eager_skip))
    bmm_skip = f"batched_mm gathers {gathered / 2**30:.0f} GiB of weights" if gathered > BATCHED_MM_MAX_BYTES else ""
    for impl in ("batched_mm", "grouped_mm"):
        skip = bmm_skip if impl == "batched_mm" else ""
        out.append((f"hf_{impl}", layer.hf(x, impl), False, skip))
        out.append((f"hf_{impl}+graph", layer.hf(x, impl), True, skip))
    if compiled is None:
        out.append(("hf_compile", None, False, "quick: no torch.compile" if quick else "compile failed"))
    else:
        out.append(("hf_compile", layer.hf(x, "grouped_mm", compiled), False, ""))
    return out


def measure(name, fn, graph, reference_out, shape):
    """-> (us, err, note). Failures become notes, never abort the run."""
    try:
        if graph:
            g, static = utils.capture_graph(fn)
            timed, out = g.replay, static
            timed()
        else:
            out = fn()
            timed = fn
        torch.cuda.synchronize()
        us = utils.bench_us(timed)
        same_semantics = name.startswith(("triton", "cuda")) or name == "reference" or not shape.anchor_note
        err = rel_err(out, reference_out) if same_semantics else None
        return us, err, ""
    except Exception as exc:  # noqa: BLE001  (a baseline that cannot run is reported, not fatal)
        torch.cuda.synchronize()
        return None, None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def bench_shape(shape, tokens, quick, meta, bw, rate, triton_moe, deadline, impls=(), formats=(), fp8_rate=None):
    layer = Layer(shape, triton_moe)
    compiled = None
    if not quick:
        try:
            compiled = torch.compile(layer.block, dynamic=True)
        except Exception:  # noqa: BLE001
            compiled = None
    rows = []
    for t in tokens:
        x = torch.randn(t, shape.hidden, device="cuda", dtype=torch.bfloat16)
        active = layer.active_experts(x)
        floor = utils.floor_us(t, active, shape, bw, rate)
        nbytes, flops = utils.layer_bytes_flops(t, active, shape)
        ref_out = layer.reference(x)()
        for name, fn, graph, skip in candidates(layer, x, t, quick, compiled, formats):
            if impls and not any(name.startswith(p) for p in impls):
                continue
            if not skip and time.time() > deadline and not name.startswith(("triton", "cuda")):
                skip = "time budget of the run spent"
            fmt = packed_format(name)
            row_floor, row_bytes, row_ref = floor, nbytes, ref_out
            if fmt:  # packed weights: fewer bytes to stream (FP8: a faster matmul), the packed reference's numerics
                row_bytes = nbytes - int(active * shape.expert_bytes() * (1 - layer.packed_weight_fraction(fmt)))
                row_rate = fp8_rate if "fp8" in fmt and fp8_rate else rate
                row_floor = 1e6 * max(row_bytes / bw, flops / row_rate)
                row_ref = layer.packed_reference(x, fmt)() if not skip else None
            us, err, note = (None, None, skip) if skip else measure(name, fn, graph, row_ref, shape)
            if name.startswith("hf") and shape.anchor_note:
                note = (note + "; " if note else "") + shape.anchor_note
            rows.append(utils.Row(**meta, shape=shape.name, tokens=t, impl=name, us=us, floor_us=row_floor,
                                  ratio_to_floor=None if us is None else us / row_floor, active_experts=active,
                                  gbps=None if us is None else row_bytes / us * 1e-3,
                                  tflops=None if us is None else flops / us * 1e-6, err_vs_ref=err, note=note))
            print(f"{shape.name:14s} T={t:5d} {name:22s} "
                  + (f"{us:9.1f} us  x{us / row_floor:5.2f} floor" if us else f"skipped: {note[:70]}")
                  + (f"  err {err:.1e}" if err is not None else ""), flush=True)
    del layer
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return rows


def summary(rows):
    print("\nshape           T      floor_us  triton+graph  x_floor  v2+graph x_floor  "
          "best_hf (impl)          ours/best_hf")
    for key in sorted({(r.shape, r.tokens) for r in rows}, key=lambda k: (k[0], k[1])):
        group = [r for r in rows if (r.shape, r.tokens) == key and r.us]
        ours = next((r for r in group if r.impl == "triton+graph"), None)
        hf = [r for r in group if r.impl.startswith("hf")]
        best = min(hf, key=lambda r: r.us) if hf else None
        if ours is None:
            continue
        v2 = next((r for r in group if r.impl == "triton_v2+graph"), None)
        print(f"{key[0]:14s} {key[1]:5d} {ours.floor_us:10.1f} {ours.us:12.1f} {ours.ratio_to_floor:8.2f}  "
              + (f"{v2.us:8.1f} {v2.ratio_to_floor:7.2f}  " if v2 else " " * 18)
              + (f"{best.us:9.1f} ({best.impl:18s}) {ours.us / best.us:8.2f}" if best else "-"))


def format_summary(rows):
    """Packed formats side by side with bf16: fp8 / bf16, 2:4 / bf16 (same precision) and fp8+2:4 / fp8."""
    names = ("triton+graph",) + tuple(f"triton_{f}+graph" for f in PACKED_FORMATS)
    if not any(r.impl == names[1] or r.impl == names[2] for r in rows):
        return
    print("\nshape           T     bf16_us   fp8_us  sp24_us  fp8sp24_us  fp8/bf16  sp24/bf16  fp8sp24/fp8")
    for key in sorted({(r.shape, r.tokens) for r in rows}, key=lambda k: (k[0], k[1])):
        us = {r.impl: r.us for r in rows if (r.shape, r.tokens) == key and r.us}
        if names[0] not in us:
            continue
        bf16, fp8, sp, both = (us.get(n) for n in names)

        def ratio(a, b):
            return f"{a / b:9.2f}" if a and b else " " * 9

        print(f"{key[0]:14s} {key[1]:5d} {bf16:9.1f} " + " ".join(f"{v:8.1f}" if v else " " * 8 for v in (fp8, sp))
              + (f" {both:10.1f}" if both else " " * 11) + f" {ratio(fp8, bf16)}  {ratio(sp, bf16)}  "
              f"{ratio(both, fp8)}")


def plot(rows, path):
    plt = utils.pyplot()
    if plt is None:
        return
    shapes = sorted({r.shape for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        mine = [r for r in rows if r.shape == shape]
        tokens = sorted({r.tokens for r in mine})
        floors = [next(r.floor_us for r in mine if r.tokens == t) for t in tokens]
        ax.plot(tokens, floors, "k--", label="floor")
        for impl in ("triton+graph", "triton", "reference", "hf_grouped_mm+graph", "hf_grouped_mm", "hf_compile",
                     "hf_eager"):
            pts = [(r.tokens, r.us) for r in mine if r.impl == impl and r.us]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", title=shape, xlabel="tokens", ylabel="us per layer")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(paths: list[str], stem: str) -> None:
    """One CSV and plot from several runs' CSVs (each shape's rows, ceilings included, from the run that measured
    it), with the summary tables."""
    rows = [r for path in paths for r in utils.read_csv(path, utils.Row)]
    utils.write_csv(rows, stem + ".csv")
    measured = [r for r in rows if r.shape != "ceilings"]
    plot(measured, stem + ".png")
    summary(measured)
    format_summary(measured)
    print(f"merged {len(rows)} rows into {stem}.csv and .png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer token counts, no torch.compile, eager only <= 128")
    p.add_argument("--shapes", default=",".join(model_configs.SHAPES))
    p.add_argument("--tokens", default=None, help="comma-separated token counts")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--impls", default="", help="comma-separated name prefixes to run (default: all)")
    p.add_argument("--budget-s", type=float, default=330.0, help="after this, skip the remaining HF baselines")
    p.add_argument("--formats", default=",".join(PACKED_FORMATS),
                   help="packed weight formats to add as triton_<format>+graph rows (empty: none)")
    p.add_argument("--merge", nargs="+", metavar="CSV", help="no run: merge these result CSVs (runs of some shapes "
                   "each, e.g. under a time limit) into --stem's CSV and plot")
    p.add_argument("--stem", help="with --merge: output path without extension")
    args = p.parse_args(argv)
    if args.merge:
        merge(args.merge, args.stem or os.path.join(args.out, "moe_layer_merged"))
        return
    formats = tuple(f for f in args.formats.split(",") if f)
    unknown = set(formats) - set(PACKED_FORMATS)
    if unknown:
        p.error(f"unknown --formats {sorted(unknown)}; known: {', '.join(PACKED_FORMATS)}")
    from moe_compile.kernels import triton_moe  # raises ImportError with the reason when unavailable

    deadline = time.time() + args.budget_s
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else (QUICK_TOKENS if args.quick else TOKENS)
    meta = utils.run_meta()
    bw, rate = utils.copy_bandwidth(), utils.matmul_rate()
    fp8_rate = utils.fp8_matmul_rate() if any("fp8" in f for f in formats) else None
    print(f"{meta['card']}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s"
          + (f", fp8 matmul {fp8_rate / 1e12:.0f} TFLOP/s" if fp8_rate else ""), flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = f"moe_layer_{meta['card'].replace(' ', '_')}_{meta['date']}{'_quick' if args.quick else ''}"
    rows = [utils.Row(**meta, shape="ceilings", tokens=0, impl="copy_TBps/matmul_TFLOPs", us=None, floor_us=0.0,
                      ratio_to_floor=None, active_experts=0, gbps=bw / 1e9, tflops=rate / 1e12, err_vs_ref=None)]
    if fp8_rate:
        rows.append(utils.Row(**meta, shape="ceilings", tokens=0, impl="fp8_matmul_TFLOPs", us=None, floor_us=0.0,
                              ratio_to_floor=None, active_experts=0, gbps=None, tflops=fp8_rate / 1e12,
                              err_vs_ref=None))
    for name in args.shapes.split(","):
        rows += bench_shape(model_configs.SHAPES[name], tokens, args.quick, meta, bw, rate, triton_moe, deadline,
                            tuple(p for p in args.impls.split(",") if p), formats, fp8_rate)
        utils.write_csv(rows, os.path.join(args.out, stem + ".csv"))  # after each shape: a cut run keeps its rows
    measured = [r for r in rows if r.shape != "ceilings"]
    plot(measured, os.path.join(args.out, stem + ".png"))
    summary(measured)
    format_summary(measured)


if __name__ == "__main__":
    main()
