"""`experts_for_rows` (experts for routing decided elsewhere, as expert parallelism runs them): the Triton path
against the reference loop on the same rows, including slots that receive no row and rows all on one slot.

Dimension legend: T = rows, K = experts per row, E = local experts (slots), H = hidden, I = intermediate.
"""

from __future__ import annotations

import pytest
import torch

from moe_compile.kernels import available_backends, reference
from moe_compile.kernels.given_routing import experts_for_rows

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available() or "triton" not in available_backends():
    pytest.skip("needs a CUDA GPU with the triton backend", allow_module_level=True)

TOLERANCES = {torch.bfloat16: 1e-2, torch.float16: 3e-3}


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30))


# (T, K, E, H, I, ids)  ids: "random", "one" (every row on slot 0), "sparse" (slots 0 and E-1 only)
CASES = [(1, 1, 4, 128, 64, "random"), (37, 1, 64, 256, 96, "random"), (300, 1, 8, 97, 61, "sparse"),
         (64, 2, 16, 128, 64, "one"), (2048, 1, 32, 512, 256, "random")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,K,E,H,I,pattern", CASES)
def test_triton_rows_match_the_reference(T, K, E, H, I, pattern, dtype):
    gen = torch.Generator(device="cuda").manual_seed(T + E)
    x = torch.randn(T, H, generator=gen, device="cuda").to(dtype)  # [T, H]
    w13 = (torch.randn(E, 2 * I, H, generator=gen, device="cuda") * H**-0.5).to(dtype)  # [E, 2I, H]
    w2 = (torch.randn(E, H, I, generator=gen, device="cuda") * I**-0.5).to(dtype)  # [E, H, I]
    if pattern == "one":
        ids = torch.zeros(T, K, dtype=torch.int64, device="cuda")
    elif pattern == "sparse":
        ids = torch.randint(0, 2, (T, K), generator=gen, device="cuda") * (E - 1)
    else:
        ids = torch.randint(0, E, (T, K), generator=gen, device="cuda")
    weights = torch.rand(T, K, generator=gen, device="cuda")  # [T, K] fp32
    args = (x, weights, ids, w13, w2, None, None, False, "silu", 1.702, 7.0)
    expected = reference.torch_experts(*args)
    got = experts_for_rows(*args, backend="triton")
    assert got.dtype == dtype and not got.isnan().any()
    assert _relative(got, expected) <= TOLERANCES[dtype]
    assert torch.equal(experts_for_rows(*args, backend="reference"), expected)


def test_unknown_backend_is_a_clear_error():
    x = torch.zeros(1, 8, device="cuda")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        experts_for_rows(x, x, x, x, x, None, None, False, "silu", 1.0, 7.0, backend="cuda")
