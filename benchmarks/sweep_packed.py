"""Tile-config sweep of the FP8 packed decode kernels (graph replay, L2 flushed), beside the bf16 kernel.

  python benchmarks/sweep_packed.py [--shapes qwen3-30b-a3b,mixtral-8x7b] [--tokens 1,8,32] [--out FILE]

Each variant edits the tile config `triton_packed.packed_config` picks (block_k, block_n, stages) and is timed with
the same routing and weights; the text output goes to benchmarks/results/ (card, date, commit in its header).
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
from bench_moe_layer import Layer  # noqa: E402


def variants():
    def edit(**change):
        def apply(cfg):
            return replace(cfg, gate_up=replace(cfg.gate_up, **change), down=replace(cfg.down, **change))
        return apply

    def wider_n(cfg):
        return replace(cfg, gate_up=replace(cfg.gate_up, block_n=2 * cfg.gate_up.block_n),
                       down=replace(cfg.down, block_n=2 * cfg.down.block_n))

    return {"chosen": None, "bk128": edit(block_k=128), "bk128_s6": edit(block_k=128, num_stages=6),
            "bk256_s3": edit(block_k=256, num_stages=3), "bk256_n2x": wider_n, "bk64": edit(block_k=64, num_stages=6)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b")
    parser.add_argument("--tokens", default="1,8,32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from moe_compile.kernels import triton_moe
    from moe_compile.kernels.triton_packed import FP8_DTYPE, PackedFormat, packed_config, triton_fused_moe_packed

    meta = utils.run_meta()
    lines = [f"# FP8 packed decode sweep, {meta['card']} {meta['date']} {meta['git_commit']}; graph replay, us"]
    for name in args.shapes.split(","):
        shape = model_configs.SHAPES[name]
        layer = Layer(shape, triton_moe)
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, shape.hidden, device="cuda", dtype=torch.bfloat16)
            graph, _ = utils.capture_graph(layer.triton(x))
            row = [f"{name:15s} T={tokens:5d} bf16={utils.bench_us(graph.replay):8.1f}"]
            args_, kwargs = layer.packed_args(x, "fp8")
            fmt = PackedFormat(True, False, shape.hidden, shape.inter)
            assert args_[4].dtype == FP8_DTYPE
            base = packed_config(tokens * kwargs["top_k"], shape.experts, fmt, 0)
            for label, change in variants().items():
                cfg = base if change is None else change(base)
                try:
                    graph, _ = utils.capture_graph(lambda: triton_fused_moe_packed(*args_, **kwargs, config=cfg))
                    row.append(f"{label}={utils.bench_us(graph.replay):8.1f}")
                except Exception as exc:  # noqa: BLE001  (a variant that does not compile: say so, go on)
                    row.append(f"{label}=fail({type(exc).__name__})")
            lines.append("  ".join(row))
            print(lines[-1], flush=True)
        del layer
        torch.cuda.empty_cache()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"sweep_fp8_decode_{meta['card'].replace(' ', '_')}_{meta['date']}.txt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
