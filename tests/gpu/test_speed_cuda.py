"""`moe-compile bench --speed` on a CUDA GPU: rows before and after optimize with a floor from the measured copy
bandwidth, and the optimized model's greedy tokens (fp32 tiny model) equal to the original's."""

from __future__ import annotations

import pytest
import torch

from moe_compile.models import build_tiny_model
from moe_compile.speed import speed_table

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run on the device machine)", allow_module_level=True)

pytestmark = pytest.mark.gpu


def test_speed_table_on_cuda_has_floors_and_the_original_tokens():
    model = build_tiny_model("tiny-qwen3-moe").cuda().eval()
    rows, result = speed_table(model, [1, 4], prompt=8, steps=8)
    assert result.features["cuda_graphs"]
    assert [(r.batch, r.model) for r in rows] == [(1, "original"), (4, "original"), (1, "moe_compile balanced"),
                                                  (4, "moe_compile balanced")]
    for row in rows:
        assert row.floor_ms is not None and 0 < row.floor_ms < row.decode_step_ms and row.peak_mem_gb > 0
    assert all(row.tokens_match == 1.0 for row in rows[2:])
