"""`experts_for_rows` (experts for routing decided elsewhere, as expert parallelism runs them): the Triton path
against the reference loop on the same rows, including slots that receive no row and rows all on one slot.

Dimension legend: T = rows, K = experts per row, E = local experts (slots), H = hidden, I = intermediate.
"""

from __future__ import annotations

import os

import pytest
import torch

from moe_compile.kernels import available_backends, reference
from moe_compile.kernels.given_routing import experts_for_rows

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.gpu
if not ((torch.cuda.is_available() or INTERPRET) and "triton" in available_backends()):
    pytest.skip("needs a CUDA GPU with the triton backend (or TRITON_INTERPRET=1 for Triton's CPU interpreter)",
                allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TOLERANCES = {torch.bfloat16: 1e-2, torch.float16: 3e-3}


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30))


# (T, K, E, H, I, ids)  ids: "random", "one" (every row on slot 0), "sparse" (slots 0 and E-1 only)
CASES = [(1, 1, 4, 128, 64, "random"), (37, 1, 64, 256, 96, "random"), (300, 1, 8, 97, 61, "sparse"),
         (64, 2, 16, 128, 64, "one"), (2048, 1, 32, 512, 256, "random")]
if INTERPRET:  # the CPU interpreter affords the small cases only
    CASES = [c for c in CASES if c[0] * c[3] <= 64 * 256]


@pytest.mark.parametrize("dtype", [torch.float16] if INTERPRET else [torch.bfloat16, torch.float16])  # (interpreter:
# its bf16 dot is wrong)
@pytest.mark.parametrize("T,K,E,H,I,pattern", CASES)
def test_triton_rows_match_the_reference(T, K, E, H, I, pattern, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(T + E)
    x = torch.randn(T, H, generator=gen, device=DEVICE).to(dtype)  # [T, H]
    w13 = (torch.randn(E, 2 * I, H, generator=gen, device=DEVICE) * H**-0.5).to(dtype)  # [E, 2I, H]
    w2 = (torch.randn(E, H, I, generator=gen, device=DEVICE) * I**-0.5).to(dtype)  # [E, H, I]
    if pattern == "one":
        ids = torch.zeros(T, K, dtype=torch.int64, device=DEVICE)
    elif pattern == "sparse":
        ids = torch.randint(0, 2, (T, K), generator=gen, device=DEVICE) * (E - 1)
    else:
        ids = torch.randint(0, E, (T, K), generator=gen, device=DEVICE)
    weights = torch.rand(T, K, generator=gen, device=DEVICE)  # [T, K] fp32
    args = (x, weights, ids, w13, w2, None, None, False, "silu", 1.702, 7.0)
    expected = reference.torch_experts(*args)
    got = experts_for_rows(*args, backend="triton")
    assert got.dtype == dtype and not got.isnan().any()
    assert _relative(got, expected) <= TOLERANCES[dtype]
    assert torch.equal(experts_for_rows(*args, backend="reference"), expected)


@pytest.mark.parametrize("hidden", [64, 97])
def test_rows_read_from_an_expert_parallel_payload(hidden):
    """Expert parallelism hands the experts x as a strided view of its all-to-all payload, with each row's slot and
    weight from the payload's head: the result equals the reference on contiguous copies."""
    from moe_compile.parallel import payload

    gen = torch.Generator(device=DEVICE).manual_seed(hidden)
    rows, experts, inter = 24, 6, 48
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    x = torch.randn(rows, hidden, generator=gen, device=DEVICE).to(dtype)  # [n, H]
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen, device=DEVICE) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen, device=DEVICE) * inter**-0.5).to(dtype)
    slots = torch.randint(0, experts, (rows,), generator=gen, device=DEVICE)
    weights = torch.rand(rows, generator=gen, device=DEVICE)
    got_x, got_slots, got_weights = payload.read(payload.pack(x, slots, weights), hidden)
    assert got_x.stride(0) % 16 == 0 and not got_x.is_contiguous()
    got = experts_for_rows(got_x, got_weights.unsqueeze(1), got_slots.unsqueeze(1), w13, w2, None, None, False,
                           "silu", 1.702, 7.0, backend="triton")
    expected = reference.torch_experts(x, weights.unsqueeze(1), slots.unsqueeze(1), w13, w2, None, None, False,
                                       "silu", 1.702, 7.0)
    assert _relative(got, expected) <= TOLERANCES[dtype]


def test_unknown_backend_is_a_clear_error():
    x = torch.zeros(1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        experts_for_rows(x, x, x, x, x, None, None, False, "silu", 1.0, 7.0, backend="cuda")
