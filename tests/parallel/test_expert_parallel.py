"""Expert parallelism on CPU with gloo: real process groups of 2 and 4 ranks (spawned), no mocks.

One spawn per world size runs every case (process start and imports dominate on 2 cores); each test then checks
its case in the ranks' result files. Tolerance: fp32 logits within 1e-5 of the single-process model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.parallel.workers import equality_worker, failing_worker, free_port, packed_worker, run_workers

FP32_ATOL = 1e-5
FAMILIES = ["tiny-qwen3-moe", "tiny-deepseek-v3", "tiny-gpt-oss", "tiny-mixtral"]  # plain, shared+grouped,
MODES = ["contiguous", "overlap", "balanced"]  # biases+tuple return, 4 experts
CASES_2 = [(name, mode) for name in FAMILIES for mode in MODES]
# 4 ranks: 8 experts 2 (3 with the replica slot) per rank; Mixtral's 4 experts one per rank
CASES_4 = [("tiny-deepseek-v3", "balanced"), ("tiny-qwen3-moe", "overlap"), ("tiny-mixtral", "contiguous")]


def _spawn(tmp_path_factory, world: int, cases: list) -> list[dict]:
    out = tmp_path_factory.mktemp(f"ep{world}")
    run_workers(equality_worker, world, free_port(), str(out), cases)
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def results_2(tmp_path_factory):
    return _spawn(tmp_path_factory, 2, CASES_2)


@pytest.fixture(scope="module")
def results_4(tmp_path_factory):
    return _spawn(tmp_path_factory, 4, CASES_4)


def _check(results: list[dict], name: str, mode: str, world: int) -> None:
    for rank, per_rank in enumerate(results):
        r = per_rank[f"{name}/{mode}"]
        assert r["size"] == world and r["ep_blocks"] == r["fused_blocks"] > 0, (rank, r)
        assert r["vs_fused"] <= FP32_ATOL, (rank, r)  # the single-process fused model
        assert r["vs_original"] <= FP32_ATOL, (rank, r)  # and the untouched transformers model
        assert r["overlapped"] == (mode != "contiguous"), (rank, r)


@pytest.mark.parametrize("name,mode", CASES_2)
def test_two_ranks_match_single_process(results_2, name, mode):
    _check(results_2, name, mode, 2)


@pytest.mark.parametrize("name,mode", CASES_4)
def test_four_ranks_match_single_process(results_4, name, mode):
    _check(results_4, name, mode, 4)


def test_shards_hold_only_local_experts(results_2, results_4):
    assert results_2[0]["tiny-qwen3-moe/contiguous"]["local_experts"] == [4, 4]  # 8 experts over 2 ranks
    assert results_4[0]["tiny-mixtral/contiguous"]["local_experts"] == [1, 1]  # 4 over 4
    assert results_4[0]["tiny-deepseek-v3/balanced"]["local_experts"] == [3]  # 2 + one replica slot
    assert "load per rank: contiguous" in results_4[0]["tiny-deepseek-v3/balanced"]["report"]


def test_generate_in_lockstep_matches(results_2):
    assert all(r[f"{FAMILIES[0]}/generate"] for r in results_2)


def test_sharded_export_gathers_experts_and_saves_placement(results_2):
    """Every rank exported at once; rank 0 wrote the gathered model. Loaded in one process it equals the original
    model, and its manifest gives back the placement the ranks used."""
    import torch

    import moe_compile as mc
    from moe_compile.models import build_tiny_model
    from moe_compile.parallel import saved_placement

    record = results_2[0][f"{FAMILIES[0]}/export"]
    assert all(r[f"{FAMILIES[0]}/export"]["path"] == record["path"] for r in results_2)
    loaded = mc.load(record["path"])
    original = build_tiny_model(FAMILIES[0])
    input_ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(input_ids).logits - original(input_ids).logits).abs().max().item() <= FP32_ATOL
    placements = {name: p.to_dict() for name, p in saved_placement(loaded).items()}
    assert placements == record["placement"] and len(placements) == len(loaded.moe_compile.fused)
    for per_rank in results_2:  # each rank loaded the checkpoint and sharded it again with the saved placement
        again = per_rank[f"{FAMILIES[0]}/export"]
        assert again["resharded_same"] and all(again["resharded_same"].values())
        assert again["resharded_vs_parallel"] <= FP32_ATOL


def test_rank_failing_before_init_is_an_error_not_a_hang():
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="worker 1 failed before init_process_group"):
        run_workers(failing_worker, 2, free_port(), deadline_s=45)
    assert time.monotonic() - start < 45


def test_packed_experts_are_refused_and_the_model_is_left_as_it_was():
    run_workers(packed_worker, 2, free_port())
