"""The benchmarks' CPU-side tools: bench_e2e's result CSVs read back and merged (runs split by batch to fit a time
limit), and the case listings that need no GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def bench_e2e(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_e2e

    return bench_e2e


def _row(module, batch: int, impl: str, step_ms, note: str = ""):
    return module.E2ERow(card="card", date="2026-11-27", git_commit="abc1234", layers=48, batch=batch, prompt=512,
                         impl=impl, prefill_ms=12.5, decode_step_ms=step_ms, decode_mean_ms=step_ms,
                         decode_tok_s=None if step_ms is None else 1000.0 * batch / step_ms, warmup_s=60.0,
                         peak_mem_gb=57.6, floor_step_ms=2.03, ratio_to_floor=None, tokens_match_hf=1.0, note=note)


def test_e2e_rows_round_trip_and_merge(bench_e2e, tmp_path):
    first = [_row(bench_e2e, 1, "hf_static_cache", 11.22), _row(bench_e2e, 1, "moe_compile_balanced", 7.69, "a, b")]
    second = [_row(bench_e2e, 64, "moe_compile_balanced", None, "failed: OOM")]
    bench_e2e.write_rows(first, str(tmp_path / "b1"))
    bench_e2e.write_rows(second, str(tmp_path / "b64"))
    assert bench_e2e.read_rows(str(tmp_path / "b1.csv")) == first  # types and empty fields come back as written
    bench_e2e.merge([str(tmp_path / "b1.csv"), str(tmp_path / "b64.csv")], str(tmp_path / "all"))
    assert bench_e2e.read_rows(str(tmp_path / "all.csv")) == first + second
    assert (tmp_path / "all.png").stat().st_size > 0  # the plot, with an impl missing at one batch


def test_layer_runs_merge_into_one_table(monkeypatch, tmp_path, capsys):
    """bench_moe_layer --merge: runs of some shapes each (the device's time limit) become one CSV, plot and table."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_moe_layer
    import utils

    def row(shape, impl, us, tokens=8):
        return utils.Row(card="card", date="2026-11-27", git_commit="abc1234", shape=shape, tokens=tokens, impl=impl,
                         us=us, floor_us=100.0, ratio_to_floor=None if us is None else us / 100.0, active_experts=8,
                         gbps=None, tflops=None, err_vs_ref=None if us is None else 5e-3, note="")

    runs = [[row("ceilings", "copy_TBps/matmul_TFLOPs", None, 0), row("qwen3", "triton+graph", 110.0),
             row("qwen3", "hf_compile", 150.0), row("qwen3", "triton_fp8+graph", 60.0)],
            [row("deepseek", "triton+graph", 120.0), row("deepseek", "hf_eager", None)]]
    paths = []
    for i, rows in enumerate(runs):
        paths.append(str(tmp_path / f"run{i}.csv"))
        utils.write_csv(rows, paths[-1])
    bench_moe_layer.main(["--merge", *paths, "--stem", str(tmp_path / "all")])
    assert utils.read_csv(str(tmp_path / "all.csv"), utils.Row) == runs[0] + runs[1]
    assert (tmp_path / "all.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "qwen3" in table and "deepseek" in table and "0.55" in table  # fp8 / bf16 = 60 / 110


def test_parse_decode_options(bench_e2e):
    assert bench_e2e.parse_options(["combo_kernels=True", "mode=fast", "n=3"]) == {
        "combo_kernels": True, "mode": "fast", "n": 3}


@pytest.mark.parametrize("script, expected", [("bench_sparse_gemm.py", "qwen3-30b-a3b gate_up N=1536 K=2048 M=256"),
                                              ("bench_linear_fp8.py", "qwen3-30b-a3b")])
def test_case_listings_need_no_gpu(script, expected):
    listing = subprocess.run([sys.executable, str(BENCHMARKS / script), "--list"], capture_output=True, text=True,
                             check=True, cwd=BENCHMARKS.parent).stdout
    assert expected in listing
