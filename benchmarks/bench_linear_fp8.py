"""FP8 attention linears against bf16, per projection shape and token count, on one card, in one run.

Implementations (each plain and CUDA-graph captured, `+graph`):
  bf16      `F.linear` in bf16 (cuBLAS)
  fp8       `FP8Linear`: the per-token e4m3 quantization of the input (one Triton launch) + `torch._scaled_mm`
            with row-wise scales and the bias in its epilogue
  fp8_gemm  `torch._scaled_mm` alone on an input quantized beforehand (graph only): what the quantization costs
Projections of the attention of each model shape (no bias, as in those models): `q` [H -> Hq*D], `kv` (k and v:
[H -> Hkv*D]), `o` [Hq*D -> H], and the fused `qkv` [H -> (Hq + 2 Hkv) D] some models use. The summary adds a layer's
q + 2 kv + o.

The ceilings (copy bandwidth, bf16 and FP8 matmul rates) are measured first, in the same run. Floor of a row =
max(bytes / copy bandwidth, FLOPs / matmul rate): bytes = weight (bf16: 2NK; FP8: NK + 4N scales) + input (2TK,
bf16) + output (2TN, bf16); FLOPs = 2TNK; the rate is the bf16 one for bf16 and the FP8 one (cuBLAS with fast
accumulation) for FP8 rows. `err_vs_bf16` is the FP8 output against the bf16 linear (quantization error),
`err_vs_emulated` against FP8Linear's emulated path (the same FP8 numerics in torch ops).

  PYTHONPATH=$PWD python3 benchmarks/bench_linear_fp8.py [--shapes qwen3-30b-a3b,mixtral-8x7b]
      [--tokens 1,8,64,512,2048,8192] [--rep-ms 40] [--fast-accum] [--out DIR] [--list]

Writes DIR/linear_fp8_<card>_<date>.csv and a plot; prints a summary table last (~1 min on an H100). `--list` prints
the cases and exits (runs without a GPU).
Dimension legend: T = tokens, K = in_features, N = out_features, H = hidden, D = head dim, Hq / Hkv = query / kv heads.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils  # noqa: E402

TOKENS = (1, 8, 64, 512, 2048, 8192)
IMPLS = ("bf16", "bf16+graph", "fp8", "fp8+graph", "fp8_gemm+graph")


@dataclass(frozen=True)
class AttentionShape:
    name: str
    hidden: int  # H
    q_heads: int  # Hq
    kv_heads: int  # Hkv
    head_dim: int  # D

    def projections(self) -> dict[str, tuple[int, int]]:
        """projection -> (K, N)."""
        q, kv = self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q": (self.hidden, q), "kv": (self.hidden, kv), "o": (q, self.hidden),
                "qkv": (self.hidden, q + 2 * kv)}


SHAPES = {
    "qwen3-30b-a3b": AttentionShape("qwen3-30b-a3b", 2048, 32, 4, 128),
    "mixtral-8x7b": AttentionShape("mixtral-8x7b", 4096, 32, 8, 128),
}
LAYER = {"q": 1, "kv": 2, "o": 1}  # one attention layer's separate projections (k and v share a shape)


@dataclass
class Row:
    card: str
    date: str
    git_commit: str
    shape: str
    proj: str
    k: int
    n: int
    tokens: int
    impl: str
    us: Optional[float]
    floor_us: float
    ratio_to_floor: Optional[float]
    ratio_to_bf16: Optional[float]  # this row's time over bf16's, in the same mode (plain / graph)
    gbps: Optional[float]  # floor bytes / time
    tflops: Optional[float]  # FLOPs / time
    err_vs_bf16: Optional[float]
    err_vs_emulated: Optional[float]
    note: str = ""


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bytes_flops(tokens: int, k: int, n: int, fp8: bool) -> tuple[int, int]:
    weight = n * k + 4 * n if fp8 else 2 * n * k
    return weight + 2 * tokens * k + 2 * tokens * n, 2 * tokens * n * k


def candidates(x, weight, module):
    """(impl, callable, captured in a CUDA graph)."""
    from moe_compile.quant.fp8_linear import quantize_rows

    q, scale = quantize_rows(x)
    w_t, w_scale, s_a = module.weight.t(), module.weight_scale.unsqueeze(0), scale.unsqueeze(1)

    def gemm_only():
        return torch._scaled_mm(q, w_t, scale_a=s_a, scale_b=w_scale, out_dtype=x.dtype,
                                use_fast_accum=module.use_fast_accum)

    def bf16():
        return F.linear(x, weight)

    def fp8():
        return module(x)

    return [("bf16", bf16, False), ("bf16+graph", bf16, True), ("fp8", fp8, False), ("fp8+graph", fp8, True),
            ("fp8_gemm+graph", gemm_only, True)]


def measure(fn, graph: bool, rep_ms: int):
    """-> (us, output, note); a failure becomes a note."""
    try:
        if graph:
            g, out = utils.capture_graph(fn)
            timed = g.replay
            timed()
        else:
            out = fn()
            timed = fn
        torch.cuda.synchronize()
        return utils.bench_us(timed, rep_ms=rep_ms), out, ""
    except Exception as exc:  # noqa: BLE001  (a case that cannot run is reported, not fatal)
        torch.cuda.synchronize()
        return None, None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def bench_projection(shape, proj, k, n, tokens, meta, bw, rate, fp8_rate, args) -> list[Row]:
    from moe_compile.quant.fp8_linear import FP8Linear

    linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)  # uniform(+-1/sqrt(K)) init
    weight = linear.weight.detach()
    module = FP8Linear.from_linear(linear)
    module.use_fast_accum = args.fast_accum
    rows = []
    for t in tokens:
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ref = F.linear(x, weight)
            module.kernel = False
            emulated = module(x)
            module.kernel = True
            times: dict[str, float] = {}
            for impl, fn, graph in candidates(x, weight, module):
                fp8 = impl.startswith("fp8")
                nbytes, flops = bytes_flops(t, k, n, fp8)
                floor = 1e6 * max(nbytes / bw, flops / (fp8_rate if fp8 else rate))
                us, out, note = measure(fn, graph, args.rep_ms)
                if us is not None:
                    times[impl] = us
                base = times.get("bf16+graph" if graph else "bf16")
                rows.append(Row(**meta, shape=shape.name, proj=proj, k=k, n=n, tokens=t, impl=impl, us=us,
                                floor_us=floor, ratio_to_floor=None if us is None else us / floor,
                                ratio_to_bf16=None if us is None or base is None else us / base,
                                gbps=None if us is None else nbytes / us * 1e-3,
                                tflops=None if us is None else flops / us * 1e-6,
                                err_vs_bf16=None if out is None else rel_err(out, ref),
                                err_vs_emulated=None if out is None or not fp8 else rel_err(out, emulated),
                                note=note))
                r = rows[-1]
                print(f"{shape.name:14s} {proj:3s} [{n:5d}x{k:5d}] T={t:5d} {impl:15s} "
                      + (f"{us:8.1f} us  x{r.ratio_to_floor:5.2f} floor" if us else f"skipped: {note[:70]}")
                      + (f"  /bf16 {r.ratio_to_bf16:5.2f}" if r.ratio_to_bf16 else "")
                      + (f"  err {r.err_vs_bf16:.1e}" if r.err_vs_bf16 is not None and fp8 else ""), flush=True)
        del x
    return rows


def summary(rows: list[Row]) -> None:
    """Per shape and T: one attention layer (q + 2 kv + o) and the fused qkv, bf16 vs FP8 (graph replay)."""
    us = {(r.shape, r.proj, r.tokens, r.impl): r.us for r in rows if r.us}
    floors = {(r.shape, r.proj, r.tokens, r.impl): r.floor_us for r in rows}
    print("\nshape           T      layer: bf16_us  fp8_us  fp8/bf16  fp8/floor  gemm_only/bf16 | "
          "qkv: bf16_us  fp8_us  fp8/bf16")
    for shape, t in sorted({(r.shape, r.tokens) for r in rows}):
        def layer(impl, table=us):
            parts = [table.get((shape, p, t, impl)) for p in LAYER]
            return sum(c * v for c, v in zip(LAYER.values(), parts)) if all(parts) else None

        bf16, fp8, gemm, floor = layer("bf16+graph"), layer("fp8+graph"), layer("fp8_gemm+graph"), \
            layer("fp8+graph", floors)
        qb, qf = us.get((shape, "qkv", t, "bf16+graph")), us.get((shape, "qkv", t, "fp8+graph"))

        def fmt(v, width=8, digits=1):
            return f"{v:{width}.{digits}f}" if v else " " * width

        print(f"{shape:14s} {t:5d} {fmt(bf16, 14)} {fmt(fp8)} {fmt(fp8 / bf16 if fp8 and bf16 else None, 9, 2)} "
              f"{fmt(fp8 / floor if fp8 and floor else None, 10, 2)} "
              f"{fmt(gemm / bf16 if gemm and bf16 else None, 15, 2)} | {fmt(qb, 11)} {fmt(qf)} "
              f"{fmt(qf / qb if qf and qb else None, 9, 2)}")


def plot(rows: list[Row], path: str) -> None:
    plt = utils.pyplot()
    if plt is None:
        return
    shapes = sorted({r.shape for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for proj in sorted({r.proj for r in rows if r.shape == shape}):
            for impl, style in (("fp8+graph", "-"), ("fp8_gemm+graph", ":")):
                pts = [(r.tokens, r.ratio_to_bf16) for r in rows
                       if r.shape == shape and r.proj == proj and r.impl == impl and r.ratio_to_bf16]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{proj} {impl}")
        ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
        ax.set(xscale="log", title=f"{shape}: FP8 time / bf16 time (graph replay)", xlabel="tokens",
               ylabel="ratio")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts")
    p.add_argument("--projections", default="q,kv,o,qkv", help="comma-separated, of q, kv, o, qkv")
    p.add_argument("--rep-ms", type=int, default=40, help="about this many ms of timed calls per case")
    p.add_argument("--fast-accum", action="store_true", help="FP8Linear with torch._scaled_mm's fast accumulation")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    args = p.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        p.error(f"unknown --shapes {unknown}; known: {', '.join(SHAPES)}")
    args.shape_list = [SHAPES[s] for s in args.shapes.split(",")]
    args.token_list = [int(t) for t in args.tokens.split(",")]
    args.projection_list = [x for x in args.projections.split(",") if x]
    bad = set(args.projection_list) - {"q", "kv", "o", "qkv"}
    if bad:
        p.error(f"unknown --projections {sorted(bad)}; known: q, kv, o, qkv")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cases = [(shape, proj, *shape.projections()[proj]) for shape in args.shape_list for proj in args.projection_list]
    if args.list:
        for shape, proj, k, n in cases:
            print(f"{shape.name:14s} {proj:3s} K={k:5d} N={n:5d} T={args.token_list} impls={', '.join(IMPLS)}")
        return
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        sys.exit("bench_linear_fp8 needs a CUDA GPU with FP8 tensor cores (sm_89+); --list prints the cases")
    meta = utils.run_meta()
    bw, rate, fp8_rate = utils.copy_bandwidth(), utils.matmul_rate(), utils.fp8_matmul_rate()
    print(f"{meta['card']}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s, "
          f"fp8 matmul {fp8_rate / 1e12:.0f} TFLOP/s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"linear_fp8_{meta['card'].replace(' ', '_')}_{meta['date']}")
    rows = [Row(**meta, shape="ceilings", proj="", k=0, n=0, tokens=0, impl="copy_TBps/bf16_TFLOPs/fp8_TFLOPs",
                us=None, floor_us=0.0, ratio_to_floor=None, ratio_to_bf16=None, gbps=bw / 1e9, tflops=rate / 1e12,
                err_vs_bf16=None, err_vs_emulated=None, note=f"fp8 matmul {fp8_rate / 1e12:.1f} TFLOP/s")]
    for shape, proj, k, n in cases:
        rows += bench_projection(shape, proj, k, n, args.token_list, meta, bw, rate, fp8_rate, args)
        utils.write_csv(rows, stem + ".csv")  # after each case: a cut run keeps its rows
    measured = [r for r in rows if r.shape != "ceilings"]
    plot(measured, stem + ".png")
    summary(measured)


if __name__ == "__main__":
    main()
