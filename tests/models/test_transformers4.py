"""The transformers 4.5x layouts, in a subprocess with transformers 4.57.1 (installed by
scripts/setup_transformers4.sh into .venv/tf4) first on PYTHONPATH; the same checks as test_families.py.

Edges covered by 4.5x and not by 5.x: per-expert ModuleLists (Qwen, Mixtral, OLMoE, Jamba, DeepSeek/GLM), routers
returning (indices, weights) with 0.0 group masking and fp32-only accumulation (DeepSeek-V3, GLM4: proven in fp32),
GPT-OSS with no layout flags and dense router scores as its second output, Granite's ParallelExperts, DBRX's
chunked loop returning softmax probabilities, Llama4 under its hub-kernel decorator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_compile.models import TINY_MODELS
from tests.conftest import TOLERANCES
from tests.models.conftest import MODEL_TEST_THREADS

REPO = Path(__file__).resolve().parents[2]
TF4_DIR = REPO / ".venv" / "tf4"
VERSION = "4.57.1"
SUBPROCESS_TIMEOUT_S = 600  # all families together take about 30 s on a 2-core CPU
HF_NAMES = sorted(n for n, t in TINY_MODELS.items() if t.builder is None)
MODULELIST_FAMILIES = {"tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-mixtral", "tiny-olmoe", "tiny-deepseek-v3"}

pytestmark = pytest.mark.skipif(
    not (TF4_DIR / f"transformers-{VERSION}.dist-info").is_dir(),
    reason=f"transformers {VERSION} is not installed in {TF4_DIR}: run scripts/setup_transformers4.sh",
)


@pytest.fixture(scope="module")
def v4_results() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TF4_DIR), str(REPO)]), MOE_COMPILE_QUIET="1",
               OMP_NUM_THREADS=str(MODEL_TEST_THREADS))
    proc = subprocess.run([sys.executable, "-m", "tests.models.v4_parity_run", *HF_NAMES], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["transformers"] == VERSION
    return results


@pytest.mark.parametrize("name", HF_NAMES)
def test_v4_layout_matches_the_original(v4_results, name):
    r = v4_results[name]
    assert "error" not in r, r.get("error")
    moe_layers = TINY_MODELS[name].moe_layers
    assert r["reported"] == [r["config"]] * moe_layers  # inspect's experts and top-k are the config's
    assert r["fp32_error"] <= TOLERANCES[torch.float32]
    assert r["same_tokens"]
    skip_reason = TINY_MODELS[name].skip_reason
    if skip_reason:  # PhiMoE: skipped with the reason, in 4.5x too
        assert r["fused"] == 0 and len(r["skipped"]) == moe_layers
        assert all(skip_reason in reason for reason in r["skipped"].values())
        assert r["fp32_error"] == 0.0
    else:
        assert r["fused"] == r["fused_modules"] == moe_layers, r["skipped"]


@pytest.mark.parametrize("name", sorted(MODULELIST_FAMILIES))
def test_v4_models_really_use_per_expert_modules(v4_results, name):
    # guards the test itself: these must exercise the ModuleList layout, not a 3-D one
    assert v4_results[name]["per_expert_modulelist"]
