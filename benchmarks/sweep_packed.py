"""Tile-config sweep of the packed decode kernels (FP8, 2:4, FP8 + 2:4; graph replay, L2 flushed), beside bf16.

  python benchmarks/sweep_packed.py [--shapes qwen3-30b-a3b,mixtral-8x7b] [--tokens 1,8,32]
                                    [--formats fp8,sparse24,fp8+sparse24] [--out FILE]

Each variant edits the tile config that `triton_packed.packed_config` picks ("new" is that config unchanged) and is
timed with the same routing and weights as the bf16 `triton` backend of the same run; "old" is the config of the
previous version (16-bit decode tiles, FP8 twice as deep and twice as wide below 8 down programs per SM, no swap,
FP8 inter quantized in the down kernel), "swapped" the swapped decode tiles (`swapped_decode_config`). Ratios to
bf16 and the error of "new" against the packed reference are printed per row; the text output goes to
benchmarks/results/ (card, date, commit in its header).
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
from bench_moe_layer import Layer, rel_err  # noqa: E402

OLD_FP8_WIDE_PROGRAMS_PER_SM = 8  # the previous version's rule for twice-wider FP8 decode tiles


def old_config(tokens, top_k, shape, fmt):
    """The previous version's choice (no swap, in-loop FP8 quantization of inter)."""
    import triton

    from moe_compile.kernels.triton.configs import expected_tiles, num_sms, select_config
    from moe_compile.kernels.triton_packed import as_packed_config

    rows = tokens * top_k
    cfg = select_config(rows, shape.experts, shape.hidden, shape.inter, 0, allow_gemv=False)
    if fmt.fp8:
        def widen(g):
            return replace(g, block_k=max(128, g.block_k) if fmt.sparse else min(256, 2 * g.block_k))
        cfg = replace(cfg, gate_up=widen(cfg.gate_up), down=widen(cfg.down))
        programs = expected_tiles(rows, shape.experts, cfg.block_m) * triton.cdiv(shape.hidden, cfg.down.block_n) \
            * cfg.down.split_k
        if not fmt.sparse and cfg.block_m == 16 and programs < OLD_FP8_WIDE_PROGRAMS_PER_SM * num_sms(0):
            cfg = replace(cfg, gate_up=replace(cfg.gate_up, block_n=2 * cfg.gate_up.block_n),
                          down=replace(cfg.down, block_n=2 * cfg.down.block_n))
    return as_packed_config(cfg)


def variants(fmt):
    def edit(gate_up=None, down=None, **top):
        def apply(cfg):
            return replace(cfg, gate_up=replace(cfg.gate_up, **(gate_up or {})),
                           down=replace(cfg.down, **(down or {})), **top)
        return apply

    def split2x(cfg):
        return replace(cfg, down=replace(cfg.down, split_k=2 * cfg.down.split_k))

    if fmt.fp8 and not fmt.sparse:
        return {"new": None, "old": "old", "inloop": edit(quantize_inter=False), "split2x": split2x,
                "down128": edit(down=dict(block_n=128)), "gu32": edit(gate_up=dict(block_n=32)),
                "stages4": edit(gate_up=dict(num_stages=4), down=dict(num_stages=4)),
                "bk128": edit(gate_up=dict(block_k=128, num_stages=6), down=dict(block_k=128, num_stages=6))}
    if fmt.sparse and not fmt.fp8:
        return {"new": None, "old": "old", "swapped": "swapped", "split2x": split2x,
                "bk256": edit(gate_up=dict(block_k=256, num_stages=3), down=dict(block_k=256, num_stages=3))}
    return {"new": None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b")
    parser.add_argument("--tokens", default="1,8,32")
    parser.add_argument("--formats", default="fp8,sparse24,fp8+sparse24")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from moe_compile.kernels import reference, triton_moe
    from moe_compile.kernels.triton_packed import (
        PackedFormat,
        packed_config,
        swapped_decode_config,
        triton_fused_moe_packed,
    )

    meta = utils.run_meta()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"sweep_packed_{meta['card'].replace(' ', '_')}_{meta['date']}.txt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    lines = [f"# packed decode sweep, {meta['card']} {meta['date']} {meta['git_commit']}; graph replay, us; "
             "ratio = new / bf16; err = new vs the packed reference"]

    def emit(line):
        lines.append(line)
        print(line, flush=True)
        with open(out, "w") as f:  # after every row: a cut run keeps what it measured
            f.write("\n".join(lines) + "\n")

    for name in args.shapes.split(","):
        shape = model_configs.SHAPES[name]
        layer = Layer(shape, triton_moe)
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, shape.hidden, device="cuda", dtype=torch.bfloat16)
            graph, _ = utils.capture_graph(layer.triton(x))
            bf16 = utils.bench_us(graph.replay)
            emit(f"{name:15s} T={tokens:4d} bf16={bf16:8.1f}")
            for fmt_name in args.formats.split(","):
                args_, kwargs = layer.packed_args(x, fmt_name)
                fmt = PackedFormat("fp8" in fmt_name, "sparse24" in fmt_name, shape.hidden, shape.inter)
                base = packed_config(tokens * kwargs["top_k"], shape.experts, fmt, 0)
                row = [f"  {fmt_name:13s}"]
                for label, change in variants(fmt).items():
                    if change == "old":
                        cfg = old_config(tokens, kwargs["top_k"], shape, fmt)
                    elif change == "swapped":  # the swapped decode tiles whatever packed_config picks
                        cfg = swapped_decode_config(tokens * kwargs["top_k"], shape.experts, fmt, 0, fmt.fp8)
                    else:
                        cfg = base if change is None else change(base)
                    try:
                        graph, static = utils.capture_graph(
                            lambda: triton_fused_moe_packed(*args_, **kwargs, config=cfg))
                        us = utils.bench_us(graph.replay)
                        row.append(f"{label}={us:8.1f}")
                        if label == "new":
                            err = rel_err(static, reference.torch_fused_moe_packed(*args_, **kwargs))
                            row.append(f"ratio={us / bf16:5.2f} err={err:.1e} |")
                    except Exception as exc:  # noqa: BLE001  (a variant that does not compile: say so, go on)
                        row.append(f"{label}=fail({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
                emit(" ".join(row))
            torch.cuda.empty_cache()
        del layer
        torch.cuda.empty_cache()
    print("wrote", out)


if __name__ == "__main__":
    main()
