"""Shared test settings: seeds, the named tolerance table, and the GPU skip marker."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MOE_COMPILE_QUIET", "1")
# Tiny models gain nothing from intra-op threads; on a busy 2-core CI machine spinning OpenMP workers cost more
# than the ops (measured ~10x on the model tests). Subprocesses (CLI, transformers 4.x runs) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# Relative L2 error ||out - ref|| / ||ref|| allowed per dtype, paired with what that dtype can represent.
# fp32: the fused op and the original compute the same products in a different order.
# bf16/fp16: per-expert outputs are rounded once in the original and accumulated in fp32 by us.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run on the device machine)")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
