"""The shipped quality model: it loads without training, has learned, and FP8 keeps perplexity within 1%; the
`moe-compile bench --quality` table."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from moe_compile.cli import main
from moe_compile.quality import corpus, perplexity
from moe_compile.quality.bench import quality_table, variants
from tests.quality.conftest import EVAL_BYTES, QUALITY_LIMITS

DATA = resources.files("moe_compile.quality").joinpath("data")


def test_shipped_files():
    sizes = {p.name: len(p.read_bytes()) for p in DATA.iterdir()}
    assert sizes["model.safetensors"] < 5 * 2**20
    meta = json.loads(DATA.joinpath("config.json").read_text())
    assert meta["model"]["vocab_size"] == 256 and meta["dtype"] == "float16"
    heldout = corpus.shipped_heldout_files()
    assert heldout and len(heldout) == len(set(heldout))
    assert len(corpus.heldout_bytes(EVAL_BYTES)) == EVAL_BYTES


@pytest.fixture(scope="module")
def table():
    return {row.variant: row for row in quality_table(max_bytes=EVAL_BYTES)}


def test_trained_and_fp8_within_one_percent(table, fused_quality_model):
    assert list(table) == list(variants())
    bf16 = table["bf16"]
    assert bf16.perplexity < QUALITY_LIMITS["trained_max_ppl"]
    assert bf16.perplexity == pytest.approx(perplexity(fused_quality_model, max_bytes=EVAL_BYTES))  # undo is exact
    assert abs(table["fp8"].increase) < QUALITY_LIMITS["fp8_max_ppl_increase"]
    assert table["2:4"].increase > table["fp8"].increase  # magnitude 2:4 without retraining costs more
    assert table["fp8+2:4"].expert_bytes < table["fp8"].expert_bytes < table["2:4"].expert_bytes < bf16.expert_bytes


def test_sparsegpt_keeps_2_4_inside_the_gate_where_magnitude_does_not(table):
    """SparseGPT (calibrated on training text) keeps 2:4 under the 5% gate on held-out text; magnitude exceeds it."""
    from moe_compile.quant.gate import DEFAULT_THRESHOLDS

    assert table["2:4"].increase > DEFAULT_THRESHOLDS["sparsity_24"]
    assert table["2:4 sparsegpt"].increase < DEFAULT_THRESHOLDS["sparsity_24"] / 2
    assert table["fp8+2:4 sparsegpt"].increase < DEFAULT_THRESHOLDS["sparsity_24"]
    assert table["2:4 sparsegpt"].expert_bytes == table["2:4"].expert_bytes  # the same storage format


def test_24_of_the_dense_linears_costs_more_than_the_experts_alone(table):
    """ModelOpt's magnitude 2:4 of the attention linears on top of SparseGPT experts (where ModelOpt is installed):
    measured, dearer than the experts alone, the expert storage unchanged."""
    row = table.get("2:4 sparsegpt + linears")
    if row is None:
        pytest.skip("nvidia-modelopt not installed")
    assert row.increase > table["2:4 sparsegpt"].increase
    assert row.expert_bytes == table["2:4 sparsegpt"].expert_bytes


def test_bench_cli(capsys, tmp_path):
    out = tmp_path / "rows.json"
    assert main(["bench", "--quality", "--max-bytes", "2048", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for variant in variants():
        assert variant in text
    assert "emulated" in text
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == list(variants()) and rows[0]["increase"] == 0.0
    assert main(["bench"]) == 1  # no benchmark chosen: a handled error
