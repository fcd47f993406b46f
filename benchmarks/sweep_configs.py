"""Tile-config sweep of the triton backend's two expert GEMMs, each timed alone as a CUDA-graph replay on fixed
routing, plus the routing and alignment steps (torch and Triton): the data behind `kernels/triton/configs.py`.
At decode (GEMV configs) it compares GEMV tile shapes, other BLOCK_M and the tensor-core kernels.

  python benchmarks/sweep_configs.py [--cases qwen3-30b-a3b:1,deepseek-v3:8192,...]
Dimension legend: T = tokens, E = experts, K = top_k, H = hidden, I = expert intermediate.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_configs  # noqa: E402
import utils  # noqa: E402

from moe_compile.kernels import reference  # noqa: E402
from moe_compile.kernels import triton_moe as tm  # noqa: E402
from moe_compile.kernels.triton import configs  # noqa: E402
from moe_compile.kernels.triton.align import align_by_expert  # noqa: E402
from moe_compile.kernels.triton.configs import GemmConfig  # noqa: E402

DECODE = [GemmConfig(16, 128, 4, 4), GemmConfig(32, 128, 4, 4), GemmConfig(64, 128, 4, 4), GemmConfig(16, 256, 4, 3),
          GemmConfig(32, 256, 4, 3), GemmConfig(32, 128, 4, 6), GemmConfig(16, 128, 2, 6)]
PREFILL = [GemmConfig(64, 64, 8, 3), GemmConfig(128, 64, 8, 3), GemmConfig(128, 64, 8, 4), GemmConfig(64, 64, 4, 4),
           GemmConfig(128, 64, 4, 4), GemmConfig(256, 64, 8, 3), GemmConfig(128, 32, 8, 5)]
CASES = "qwen3-30b-a3b:1,qwen3-30b-a3b:8,qwen3-30b-a3b:512,qwen3-30b-a3b:2048,qwen3-30b-a3b:8192,gpt-oss-20b:1," \
        "mixtral-8x7b:8192,deepseek-v3:1,deepseek-v3:2048"


def graph_us(fn) -> float:
    g, _ = utils.capture_graph(fn)
    return utils.bench_us(g.replay)


def weights(shape):
    E, H, I = shape.experts, shape.hidden, shape.inter
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * H**-0.5
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * I**-0.5
    rw = torch.randn(E, H, device="cuda", dtype=torch.bfloat16) * H**-0.5
    return w13, w2, rw


GEMV = [(2, 256, 4), (4, 256, 4), (8, 256, 4), (16, 256, 4), (4, 512, 4), (8, 512, 8), (8, 128, 4), (16, 128, 2),
        (32, 128, 4)]  # (BLOCK_N, BLOCK_K, warps) of the GEMV decode kernels


def sweep_case(shape, tokens, w13, w2, rw, decode_only=False):
    s = model_configs.op_scalars(shape, None)
    x = torch.randn(tokens, shape.hidden, device="cuda", dtype=torch.bfloat16)
    cb = torch.rand(shape.experts, device="cuda") * 0.1 if shape.op_kwargs.get("correction_bias") else None
    route_args = (cb, s["top_k"], s["scoring"], s["renormalize"], s["n_group"], s["topk_group"], s["routed_scaling"])

    def logits():
        return reference.router_logits(x, rw, None)

    def route():
        return reference.route(logits(), *route_args)
    weights_, ids = route()
    base = tm._config(x, w13, w2, ids.numel())
    tag = f"{shape.name}:T{tokens}"
    print(f"{tag} base {base}", flush=True)
    print(f"{tag} logits {graph_us(logits):.1f} us, route torch {graph_us(route):.1f} us, route triton "
          f"{graph_us(lambda: tm._route(logits(), *route_args, None, 0)):.1f} us, route+tiles triton "
          f"{graph_us(lambda: tm._route(logits(), *route_args, None, base.block_m if tokens == 1 else 0)):.1f} us, "
          f"align 1-launch {graph_us(lambda: align_by_expert(ids, shape.experts, base.block_m)):.1f} us, "
          f"align 4-launch {graph_us(lambda: align_by_expert(ids, shape.experts, base.block_m, False)):.1f} us, "
          f"full op {graph_us(lambda: tm.triton_fused_moe(x, rw, None, cb, w13, w2, None, None, **s)):.1f} us",
          flush=True)
    topk_w = weights_.reshape(-1).contiguous()
    variants = []  # (label, MoEConfig)
    if base.gemv:
        for bn, bk, warps in GEMV:
            g = GemmConfig(bn, bk, warps, 1)
            variants.append((f"gemv BM{base.block_m} BN{bn} BK{bk} w{warps}", replace(base, gate_up=g, down=g)))
        mma = tm.select_config(ids.numel(), shape.experts, shape.hidden, shape.inter, 0, allow_gemv=False)
        variants.append((f"mma BM{mma.block_m} base", mma))
        for bm in (1, 2, 4, 8):
            if bm != base.block_m and bm >= base.block_m // 2:
                cfg = configs.gemv_config(ids.numel(), shape.experts, shape.hidden, shape.inter, 0, bm)
                variants.append((f"gemv BM{bm} default", cfg))
    elif not decode_only:
        block_ms = [base.block_m] + ([64, 128] if base.block_m >= 64 else [])
        for bm in dict.fromkeys(block_ms):
            for g in (DECODE if bm == 16 else PREFILL):
                for split in ((1, 2, 4) if bm == 16 else (1,)):
                    label = f"BM{bm} BN{g.block_n} BK{g.block_k} w{g.num_warps} s{g.num_stages} split{split}"
                    variants.append((label, replace(base, block_m=bm, gate_up=g, down=replace(g, split_k=split))))
    for label, cfg in variants:
        rows, tiles, n_tiles = align_by_expert(ids, shape.experts, cfg.block_m)
        act = tm._gate_up(x, w13, None, topk_w, rows, tiles, n_tiles, shape.inter, s["top_k"], cfg, False, "silu",
                          1.0, 7.0)
        res = []
        for which in ("gate_up", "down"):
            if which == "gate_up":
                fn = lambda: tm._gate_up(x, w13, None, topk_w, rows, tiles, n_tiles, shape.inter,  # noqa: E731
                                         s["top_k"], cfg, False, "silu", 1.0, 7.0)
            else:  # includes the zeroing of the fp32 output (a memset) where the combine is atomic
                fn = lambda: tm._down(act, w2, None, topk_w, rows, tiles, n_tiles, tokens, s["top_k"],  # noqa: E731
                                      cfg, False)
            try:
                res.append(f"{which} {graph_us(fn):7.1f} us")
            except Exception as exc:  # noqa: BLE001  (out of shared memory etc.: report and go on)
                res.append(f"{which} failed: {str(exc).splitlines()[0][:80]}")
        print(f"{tag} {label:32s} " + ", ".join(res), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default=CASES)
    p.add_argument("--decode-only", action="store_true", help="skip the tensor-core config sweep of larger T")
    args = p.parse_args()
    built = {}
    for case in args.cases.split(","):
        name, tokens = case.split(":")
        shape = model_configs.SHAPES[name]
        if name not in built:
            built.clear()
            torch.cuda.empty_cache()
            built[name] = weights(shape)
        sweep_case(shape, int(tokens), *built[name], decode_only=args.decode_only)


if __name__ == "__main__":
    main()
