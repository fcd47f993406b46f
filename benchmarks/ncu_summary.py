"""Nsight Compute CSVs (`ncu --csv --page details`, one file per profiled layer call) -> one markdown table:
per kernel its duration, DRAM and SM throughput (% of peak), achieved / theoretical occupancy, registers, grid and
waves, and for the expert GEMMs the achieved bandwidth or matmul rate.

  python benchmarks/ncu_summary.py ncu_qwen3-30b-a3b_T1_bf16.csv ... > summary.md

File names follow `benchmarks/profile_layer.py`'s runs: ncu_<shape>_T<tokens>_<format>.csv.
"""

from __future__ import annotations

import collections
import csv
import os
import sys

METRICS = (("Duration", "us"), ("DRAM Throughput", "dram %"), ("Compute (SM) Throughput", "sm %"),
           ("Achieved Occupancy", "occ %"), ("Theoretical Occupancy", "theor %"), ("Registers Per Thread", "regs"),
           ("Grid Size", "grid"), ("Waves Per SM", "waves"))


def kernels(path: str) -> list[tuple[str, dict[str, str]]]:
    """[(kernel name, {metric name: value})] in launch order."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if len(r) > 10]
    header, data = rows[0], rows[1:]
    col = {name: header.index(name) for name in ("ID", "Kernel Name", "Metric Name", "Metric Value", "Metric Unit")}
    found: dict[tuple[str, str], dict[str, str]] = collections.OrderedDict()
    for r in data:
        metrics = found.setdefault((r[col["ID"]], r[col["Kernel Name"]]), {})
        value, unit = r[col["Metric Value"]].replace(",", ""), r[col["Metric Unit"]]
        if unit == "ns":
            value = f"{float(value) / 1e3:.1f}"
        elif unit == "usecond":
            value = f"{float(value):.1f}"
        elif unit == "msecond":
            value = f"{float(value) * 1e3:.1f}"
        metrics[r[col["Metric Name"]]] = value
    return [(name.split("(")[0].replace("void ", "")[:40], m) for (_, name), m in found.items()]


def table(paths: list[str]) -> str:
    lines = ["| run | kernel | " + " | ".join(label for _, label in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for path in paths:
        run = os.path.basename(path).removeprefix("ncu_").removesuffix(".csv")
        for name, m in kernels(path):
            lines.append(f"| {run} | {name} | " + " | ".join(m.get(key, "") for key, _ in METRICS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
