"""The all-to-all payload keeps each row's slot and fp32 weight bit-exact beside its hidden vector."""

from __future__ import annotations

import pytest
import torch

from moe_compile.parallel import payload


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hidden", [1, 97, 128])
def test_pack_then_read_round_trips(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(5, hidden, generator=gen).to(dtype)  # [n, H]
    slots = torch.tensor([0, 3, 7, 2**20, 1])
    weights = torch.tensor([0.125, 1e-30, 3.4e38, -2.5, float("nan")])  # bits that would not survive a cast
    packed = payload.pack(x, slots, weights)
    assert packed.dtype == dtype and packed.shape[1] % 16 == 0 and packed.stride(0) % 16 == 0
    got_x, got_slots, got_weights = payload.read(packed.clone(), hidden)  # a copy: what all-to-all delivers
    assert torch.equal(got_x, x) and torch.equal(got_slots, slots)
    assert torch.equal(got_weights.view(torch.int32), weights.view(torch.int32))
