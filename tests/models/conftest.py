"""Model tests run single-threaded: tiny models gain nothing from intra-op threads, and on a busy 2-core machine
OpenMP workers spinning for each small op cost more CPU than the ops themselves (measured: ~10x)."""

from __future__ import annotations

import pytest
import torch

MODEL_TEST_THREADS = 1


@pytest.fixture(scope="package", autouse=True)
def _single_threaded():
    previous = torch.get_num_threads()
    torch.set_num_threads(MODEL_TEST_THREADS)
    yield
    torch.set_num_threads(previous)
