"""Device probe of the cuda fused_moe kernel: per-phase timings (from the kernel's %globaltimer stamps) and
tuning variants (nvcc -D macros of moe_decode.cu) against the triton backend on the benchmark decode shapes.

  python csrc/tools/probe_moe_decode.py [--variants "base;MOE_CP_ASYNC=1"] [--shapes a,b] [--tokens 1,8]
  python csrc/tools/probe_moe_decode.py --check-cases quick|all --shapes ""   # correctness lines only

A variant is "base" or comma-separated MOE_* macros of csrc/moe_decode_common.cuh (each builds its own library).

Not a test: prints a table. Weights are random (not the HF blocks), routing as the op computes it.
Dimension legend: T = tokens, E = experts, K = top_k, H = hidden, I = expert intermediate.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

os.environ.setdefault("MOE_COMPILE_CUDA_BACKEND", "1")  # the backend is opt-in; this tool is for it

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import model_configs  # noqa: E402
import utils  # noqa: E402

from moe_compile.kernels import cuda_moe, reference  # noqa: E402
from moe_compile.kernels.triton_moe import triton_fused_moe  # noqa: E402


def make_layer(shape, dtype=torch.bfloat16):
    o, (E, H, I) = shape.op_kwargs, (shape.experts, shape.hidden, shape.inter)
    r = lambda *s, scale=1.0: torch.randn(*s, device="cuda", dtype=dtype) * scale  # noqa: E731
    w = dict(router_weight=r(E, H, scale=H**-0.5), router_bias=r(E) if o.get("router_bias") else None,
             correction_bias=torch.rand(E, device="cuda") * 0.1 if o.get("correction_bias") else None,
             w13=r(E, 2 * I, H, scale=H**-0.5), w2=r(E, H, I, scale=I**-0.5),
             b13=r(E, 2 * I, scale=0.5) if o.get("expert_bias") else None,
             b2=r(E, H, scale=0.5) if o.get("expert_bias") else None)
    scalars = model_configs.op_scalars(shape, object())
    return w, scalars


def phases(args, scalars, lib):
    """Median-free phase boundaries of one launch, us from the first CTA's start."""
    timing = torch.zeros(4096, cuda_moe.TIME_POINTS, dtype=torch.int64, device="cuda")
    cuda_moe.launch(*args, *scalars.values(), timing=timing, lib=lib)
    torch.cuda.synchronize()
    t = timing[timing[:, 0] > 0].double()
    t0 = t[:, 0].min()
    last = t[:, 5].max()
    return "  ".join(f"{name} {((col - t0) / 1e3).max().item():6.1f}" for name, col in (
        ("start", t[:, 0]), ("router", t[:, 1]), ("barrier", t[:, 2]), ("listed", t[:, 3]),
        ("units", t[:, 4]))) + f"  end {(last - t0).item() / 1e3:6.1f}  (G={t.shape[0]})"


# T > 1 with aligned rows, then odd H and I (unaligned rows: the element-wise load path), at T = 1 and T = 7
CHECK_CASES = [(7, 32, 4, 96, 64, {}), (2, 32, 4, 96, 64, {}), (1, 32, 4, 97, 61, {}),
               (7, 32, 4, 97, 61, dict(activation="gelu", scoring="sigmoid"))]


def check_cases(which: str):
    """CHECK_CASES ("quick") or every case of the test module ("all") against the reference, one line each: the
    verdict, the grid barrier's timeout flag, and from the %globaltimer stamps how many CTAs of the grid started,
    reached the barrier, passed it and finished their units (a CTA that never started: not co-resident)."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "kernels"))
    import test_cuda_moe as t

    for case in CHECK_CASES if which == "quick" else t.CASES:
        T, E, K, H, I, overrides = case
        timing = torch.zeros(4096, cuda_moe.TIME_POINTS, dtype=torch.int64, device="cuda")
        workspace = cuda_moe.new_workspace(T, E, torch.device("cuda"))
        try:
            tensors, scalars = t.make_inputs(T, E, K, H, I, torch.bfloat16, **overrides)
            out, ids, weights = cuda_moe.launch(*tensors.values(), *scalars.values(), with_routing=True,
                                                timing=timing, workspace=workspace)
            ref_weights, ref_ids, choice = t.reference_routing(tensors, scalars)
            t.check_routing(ids, weights, ref_ids, ref_weights, choice, near_tie=2e-2)
            t.check_output(out, t.experts_reference(tensors, scalars, weights, ids), torch.bfloat16)
            verdict = "ok"
        except Exception as exc:  # noqa: BLE001  (a probe reports, it does not stop)
            verdict = f"FAIL {exc!r}"[:300]
        stamped = (timing > 0).sum(0).tolist()  # CTAs per time point
        print(f"case {t.case_id(case)} {overrides or ''}: {verdict}; barrier timed out: "
              f"{cuda_moe.barrier_timed_out(workspace)}; CTAs started / at barrier / past it / listed / done: "
              f"{stamped[:5]}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="base")
    p.add_argument("--shapes", default="qwen3-30b-a3b,gpt-oss-20b,deepseek-v3,mixtral-8x7b")
    p.add_argument("--tokens", default="1,8")
    p.add_argument("--check-cases", choices=("quick", "all"), help="first run CHECK_CASES (quick) or the test "
                   "module's cases (all) against the reference, one line each")
    a = p.parse_args()
    if a.check_cases:
        check_cases(a.check_cases)
    if not a.shapes:
        return
    variants = {v: cuda_moe.load_library(tuple(d for d in v.split(",") if d != "base")) for v in a.variants.split(";")}
    bw = utils.copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy {bw / 1e12:.2f} TB/s", flush=True)
    for name in a.shapes.split(","):
        shape = model_configs.SHAPES[name]
        w, scalars = make_layer(shape)
        for T in (int(t) for t in a.tokens.split(",")):
            x = torch.randn(T, shape.hidden, device="cuda", dtype=torch.bfloat16)
            args = (x, w["router_weight"], w["router_bias"], w["correction_bias"], w["w13"], w["w2"], w["b13"], w["b2"])
            logits = reference.router_logits(x, w["router_weight"], w["router_bias"])
            _, ids = reference.route(logits, w["correction_bias"], *[scalars[k] for k in (
                "top_k", "scoring", "renormalize", "n_group", "topk_group", "routed_scaling")])
            active = int(ids.unique().numel())
            floor = active * shape.expert_bytes() / bw * 1e6
            ref = reference.torch_fused_moe(*args, **scalars)
            g, _ = utils.capture_graph(lambda: triton_fused_moe(*args, **scalars))
            print(f"{name:14s} T={T:2d} active {active:3d} floor {floor:7.1f} us  triton+graph "
                  f"{utils.bench_us(g.replay):7.1f} us", flush=True)
            for vname, lib in variants.items():
                out = cuda_moe.launch(*args, *scalars.values(), lib=lib)[0]
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                g, _ = utils.capture_graph(lambda: cuda_moe.launch(*args, *scalars.values(), lib=lib)[0])
                us = utils.bench_us(g.replay)
                print(f"   {vname:40s} {us:7.1f} us  x{us / floor:4.2f}  err {err:.1e}  | {phases(args, scalars, lib)}",
                      flush=True)
        del w
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
