"""Timing, ceilings, floors and CSV rows for the benchmarks.

Floor of one MoE layer = max(bytes / copy bandwidth, FLOPs / matmul rate), both ceilings measured in the same run:
  bytes = distinct activated experts x expert bytes + router weight (E*H) + x in and out (2*T*H), in bf16
  FLOPs = 2*T*K*(3*H*I) for the experts (gated: 2I*H up, I*H down) + 2*T*E*H for the router.
"""

from __future__ import annotations

import csv
import datetime
import os
import statistics
import subprocess
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch


@dataclass
class Row:
    card: str
    date: str
    git_commit: str
    shape: str
    tokens: int
    impl: str
    us: Optional[float]
    floor_us: float
    ratio_to_floor: Optional[float]
    active_experts: int
    gbps: Optional[float]  # floor bytes / time
    tflops: Optional[float]  # floor FLOPs / time
    err_vs_ref: Optional[float]  # ||out - fp32 reference|| / ||ref|| (ours) or vs the HF block (anchors)
    note: str = ""


_FLUSH: list = []


def _flush_l2() -> None:
    """Read 256 MB so the timed call finds nothing of its own in L2. A read, not triton do_bench's memset: a
    memset leaves ~50 MB of dirty lines whose write-back would land inside the timed call (~17 us at 3 TB/s)."""
    if not _FLUSH:
        _FLUSH.append(torch.ones(64 << 20, dtype=torch.int32, device="cuda"))
    _FLUSH[0].sum()


def bench_us(fn: Callable[[], object], rep_ms: int = 100) -> float:
    """Median microseconds of fn over about rep_ms of calls (at least 5), L2 flushed by a read before each call;
    device events around each call, after a warm-up call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    reps = max(5, min(500, int(rep_ms / max(start.elapsed_time(end), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        _flush_l2()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return 1000.0 * statistics.median(s.elapsed_time(e) for s, e in events)


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src), rep_ms=200)
    return 2 * src.numel() * 2 / (us * 1e-6)


def matmul_rate() -> float:
    """bf16 8192^3 matmul through torch (cuBLAS) on random data, FLOP/s."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    us = bench_us(lambda: a @ b, rep_ms=300)
    return 2 * 8192**3 / (us * 1e-6)


def fp8_matmul_rate() -> float:
    """FP8 e4m3 8192^3 matmul through torch._scaled_mm (cuBLAS, fast accumulation) on random data, FLOP/s."""
    a = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    us = bench_us(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16, use_fast_accum=True), rep_ms=300)
    return 2 * 8192**3 / (us * 1e-6)


def layer_bytes_flops(tokens: int, active: int, shape) -> tuple[int, int]:
    weights = active * shape.expert_bytes() + shape.experts * shape.hidden * 2
    activations = 2 * tokens * shape.hidden * 2
    flops = 2 * tokens * shape.top_k * 3 * shape.hidden * shape.inter + 2 * tokens * shape.experts * shape.hidden
    return weights + activations, flops


def floor_us(tokens: int, active: int, shape, bandwidth: float, rate: float) -> float:
    nbytes, flops = layer_bytes_flops(tokens, active, shape)
    return 1e6 * max(nbytes / bandwidth, flops / rate)


def capture_graph(fn: Callable[[], torch.Tensor]):
    """Warm up on a side stream, capture one call; returns (graph, static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a message) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: CSV only (pip install matplotlib for the plot)")
        return None
    return plt


def run_meta() -> dict:
    """Card, date and commit (MOE_GIT_COMMIT wins: the device machine's copy of the tree may have no .git)."""
    commit = os.environ.get("MOE_GIT_COMMIT", "")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return dict(card=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), git_commit=commit)


def write_csv(rows: list[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))


def read_csv(path: str, row_type: type) -> list:
    """Rows of a CSV written by `write_csv` (or a benchmark's own writer) as `row_type` dataclasses; empty fields of
    Optional fields read as None."""
    types = {name: str(field.type) for name, field in row_type.__dataclass_fields__.items()}  # "Optional[float]"...
    parsers = {"int": int, "float": float, "str": str}
    rows = []
    with open(path, newline="") as f:
        for record in csv.DictReader(f):
            values = {}
            for name, text in record.items():
                kind = types[name].removeprefix("Optional[").removesuffix("]")
                values[name] = None if text == "" and types[name].startswith("Optional") else parsers[kind](text)
            rows.append(row_type(**values))
    return rows


def save_results(rows: list, out_dir: str, name: str, meta: dict, plot: Callable[[list, str], None]) -> str:
    """Write `rows` to OUT_DIR/<name>_<card>_<date>.csv and their plot beside it; returns that path stem."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{name}_{meta['card'].replace(' ', '_')}_{meta['date']}")
    write_csv(rows, stem + ".csv")
    plot(rows, stem + ".png")
    print(f"wrote {stem}.csv and .png")
    return stem

