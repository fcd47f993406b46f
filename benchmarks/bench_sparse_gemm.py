"""Where 2:4 sparse tensor cores pay at prefill: one expert's GEMMs, dense against PyTorch's 2:4 kernels, on one card,
in one run, eager and CUDA-graph replay.

An expert's prefill GEMM is out [M, N] = x [M, K] . w [N, K]^T with M = the tokens routed to it (T * top_k / E on
average). Triton exposes no sparse MMA, so a sparse tensor-core prefill would go through cuSPARSELt (PyTorch's
`torch._cslt_sparse_mm`, or `F.linear` on a `SparseSemiStructuredTensor`) one expert at a time, or a kernel of
our own. This measures, per expert GEMM shape of each model and M:

  dense          x @ w.T through cuBLAS (bf16)
  cslt           torch._cslt_sparse_mm(compressed w, x.T) with the algorithm `_cslt_sparse_mm_search` picks
  cslt_linear    F.linear(x, to_sparse_semi_structured(w)) (PyTorch's tensor subclass; the same library)
  fp8_dense      torch._scaled_mm, e4m3 x e4m3 (row-wise scales), bf16 out
  fp8_cslt       torch._cslt_sparse_mm on e4m3 (cuSPARSELt's FP8 2:4), bf16 out

each eager (`*`) and replayed from a CUDA graph (`*+graph`: no host overhead). `vs_dense` = time / the dense time of
the same precision and mode; 2:4 pays where it is below 1. Floor = max(bytes / copy bandwidth, FLOPs / matmul rate
of the precision), both measured first in the same run (sparse: half the weight bytes, the dense FLOP rate: 2:4
tensor cores are nominally 2x that). A case PyTorch refuses is a row with its error in `note`.

  PYTHONPATH=$PWD python3 benchmarks/bench_sparse_gemm.py [--shapes qwen3-30b-a3b,mixtral-8x7b]
      [--tokens 256,1024,4096,16384] [--rep-ms 40] [--out DIR] [--list]

Writes DIR/sparse_gemm_<card>_<date>.csv and a plot; `--list` prints the cases and exits (no GPU needed).
Dimension legend: M = tokens routed to the expert, N = output features, K = reduction (input features).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils  # noqa: E402
from model_configs import SHAPES  # noqa: E402

from moe_compile.quant.fp8 import quantize_per_token  # noqa: E402
from moe_compile.quant.sparse24 import prune_24  # noqa: E402

IMPLS = ("dense", "cslt", "cslt_linear", "fp8_dense", "fp8_cslt")


@dataclass
class Row:
    card: str
    date: str
    git_commit: str
    shape: str
    gemm: str  # gate_up or down
    m: int
    n: int
    k: int
    impl: str
    graph: bool
    us: Optional[float]
    floor_us: float
    ratio_to_floor: Optional[float]
    vs_dense: Optional[float]  # this time / the dense time of the same precision and mode
    err_vs_dense: Optional[float]  # against the dense GEMM of the same pruned weights
    note: str = ""


def expert_gemms(shape) -> dict[str, tuple[int, int]]:
    """gemm -> (N, K) of one expert: gate_up [2I, H] (gated), down [H, I]."""
    return {"gate_up": (2 * shape.inter, shape.hidden), "down": (shape.hidden, shape.inter)}


def candidates(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """impl -> a call returning [M, N] bf16; construction errors surface when the call runs."""
    from torch.sparse import to_sparse_semi_structured

    made: dict[str, Callable[[], torch.Tensor]] = {"dense": lambda: x @ w.t()}
    compressed = torch._cslt_compress(w)
    alg = torch._cslt_sparse_mm_search(compressed, x.t())
    made["cslt"] = lambda: torch._cslt_sparse_mm(compressed, x.t(), alg_id=alg).t()
    sparse_w = to_sparse_semi_structured(w)
    made["cslt_linear"] = lambda: torch.nn.functional.linear(x, sparse_w)
    (x8, x_scale), (w8, w_scale) = (_rowwise_e4m3(t) for t in (x, w))
    made["fp8_dense"] = lambda: torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.t(),
                                                 out_dtype=torch.bfloat16)
    compressed8 = torch._cslt_compress(w8)
    made["fp8_cslt"] = lambda: (torch._cslt_sparse_mm(compressed8, x8.t(), out_dtype=torch.bfloat16).t()
                                * (x_scale * w_scale.t()).to(torch.bfloat16))
    return made


def _rowwise_e4m3(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, C] -> (e4m3 [R, C], fp32 scales [R, 1]): quant.fp8's per-row scales, in _scaled_mm's layout."""
    q, scale = quantize_per_token(t)
    return q, scale.unsqueeze(1)


def measure(fn: Callable[[], torch.Tensor], graph: bool, rep_ms: int):
    """-> (us, output, note); a failure becomes a note."""
    try:
        if graph:
            g, out = utils.capture_graph(fn)
            timed = g.replay
        else:
            out, timed = fn(), fn
        torch.cuda.synchronize()
        return utils.bench_us(timed, rep_ms=rep_ms), out, ""
    except Exception as exc:  # noqa: BLE001  (a case PyTorch refuses is reported, not fatal)
        torch.cuda.synchronize()
        return None, None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:140]}"


def bench_gemm(shape_name, gemm, n, k, m, meta, ceilings, rep_ms) -> list[Row]:
    bandwidth, rate, fp8_rate = ceilings
    w = prune_24(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    reference = (x.float() @ w.float().t())
    try:
        made = candidates(x, w)
    except Exception as exc:  # noqa: BLE001  (e.g. no cuSPARSELt in this build: dense rows only)
        note = f"sparse setup failed: {type(exc).__name__}: {str(exc).splitlines()[0][:140]}"
        made = {"dense": lambda: x @ w.t()}
        print(f"{shape_name} {gemm} M={m}: {note}", flush=True)
    rows, dense_us = [], {}
    for impl in IMPLS:
        fp8, sparse = impl.startswith("fp8"), "cslt" in impl
        weight_bytes = n * k * (1 if fp8 else 2) // (2 if sparse else 1)
        nbytes = weight_bytes + m * k * (1 if fp8 else 2) + 2 * m * n
        floor = 1e6 * max(nbytes / bandwidth, 2 * m * n * k / (fp8_rate if fp8 else rate))
        for graph in (False, True):
            fn = made.get(impl)
            us, out, note = measure(fn, graph, rep_ms) if fn else (None, None, "not built (see the setup note)")
            key = ("fp8" if fp8 else "bf16", graph)
            if impl in ("dense", "fp8_dense") and us is not None:
                dense_us[key] = us
            err = None if out is None else ((out.float() - reference).norm() / reference.norm()).item()
            base = dense_us.get(key)
            rows.append(Row(**meta, shape=shape_name, gemm=gemm, m=m, n=n, k=k, impl=impl, graph=graph, us=us,
                            floor_us=floor, ratio_to_floor=None if us is None else us / floor,
                            vs_dense=None if us is None or base is None else us / base, err_vs_dense=err, note=note))
            r = rows[-1]
            label = impl + ("+graph" if graph else "")
            print(f"{shape_name:14s} {gemm:7s} [{n:5d}x{k:5d}] M={m:6d} {label:18s} "
                  + (f"{us:9.1f} us  x{r.ratio_to_floor:5.2f} floor" if us else note[:90])
                  + (f"  vs dense {r.vs_dense:5.2f}" if r.vs_dense else ""), flush=True)
    return rows


def plot(rows: list[Row], path: str) -> None:
    plt = utils.pyplot()
    if plt is None:
        return
    series = sorted({(r.shape, r.gemm) for r in rows})
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 4), squeeze=False)
    for ax, (shape, gemm) in zip(axes[0], series):
        for impl in ("cslt", "cslt_linear", "fp8_cslt"):
            points = sorted((r.m, r.vs_dense) for r in rows
                            if (r.shape, r.gemm, r.impl, r.graph) == (shape, gemm, impl, True) and r.vs_dense)
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{impl}+graph")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens routed to the expert (M)")
        ax.set_ylabel("time / dense time (below 1: 2:4 pays)")
        ax.set_title(f"{shape} {gemm}", fontsize=9)
        ax.legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"2:4 expert GEMMs vs dense: {r0.card}, {r0.date}, {r0.git_commit}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b,deepseek-v3")
    parser.add_argument("--tokens", default="256,1024,4096,16384", help="M: tokens routed to one expert")
    parser.add_argument("--rep-ms", type=int, default=40)
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    cases = [(name, gemm, n, k, int(m)) for name in args.shapes.split(",")
             for gemm, (n, k) in expert_gemms(SHAPES[name]).items() for m in args.tokens.split(",")]
    if args.list:
        for case in cases:
            print("{} {} N={} K={} M={}".format(*case))
        return
    meta = utils.run_meta()
    ceilings = (utils.copy_bandwidth(), utils.matmul_rate(), utils.fp8_matmul_rate())
    print(f"{meta['card']}: copy {ceilings[0] / 1e12:.2f} TB/s, bf16 {ceilings[1] / 1e12:.0f} TFLOP/s, "
          f"fp8 {ceilings[2] / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for case in cases:
        rows += bench_gemm(*case, meta, ceilings, args.rep_ms)
    utils.save_results(rows, args.out, "sparse_gemm", meta, plot)


if __name__ == "__main__":
    main()
