"""Run one MoE layer forward for Nsight Compute: warm-up outside, then the profiled calls inside an NVTX range.

  ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section LaunchStats \
      --csv --page details python benchmarks/profile_layer.py --shape qwen3-30b-a3b --tokens 1 --format bf16

Formats: bf16 (fused_moe, triton backend), fp8, sparse24, fp8+sparse24 (fused_moe_packed, triton backend).
The kernels of the layer (routing, alignment, gate_up, down, combine) each get a row in ncu's report; the
benchmark's `bench_moe_layer.py` gives their sum as wall time, this gives each kernel's DRAM throughput, occupancy
and stall reasons, which is the evidence of where the time over the bytes floor goes.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_configs  # noqa: E402
from bench_moe_layer import Layer  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(model_configs.SHAPES))
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--format", default="bf16", choices=("bf16", "fp8", "sparse24", "fp8+sparse24"))
    p.add_argument("--calls", type=int, default=1, help="profiled calls (after 3 warm-up calls)")
    args = p.parse_args(argv)

    from moe_compile.kernels import triton_moe

    layer = Layer(model_configs.SHAPES[args.shape], triton_moe)
    x = torch.randn(args.tokens, layer.shape.hidden, device="cuda", dtype=torch.bfloat16)
    run = layer.triton(x) if args.format == "bf16" else layer.triton_packed(x, args.format)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with torch.cuda.nvtx.range("profile"):
        for _ in range(args.calls):
            run()
    torch.cuda.synchronize()
    print(f"profiled {args.calls} call(s): {args.shape} T={args.tokens} {args.format}, "
          f"{layer.active_experts(x)} active experts")


if __name__ == "__main__":
    main()
