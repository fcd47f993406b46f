"""Converting experts to FP8 / 2:4 on a GPU too small for old and new weights together: each block's previous
weights move to host memory once its packed ones are in (`quant.packed.convert_blocks`), so GPU memory falls as
the pass runs, and undo brings the exact weights back to the GPU."""

from __future__ import annotations

import pytest
import torch

import moe_compile as mc
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.models import build_tiny_model
from moe_compile.passes import quantize_fp8, sparsify_24

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run on the device machine)", allow_module_level=True)

pytestmark = pytest.mark.gpu
PASSES = {"fp8": quantize_fp8, "sparsity_24": sparsify_24}


@pytest.mark.parametrize("name", PASSES)
def test_offloaded_undo_frees_gpu_memory_and_restores_exact_weights(name):
    model = mc.optimize(build_tiny_model("tiny-qwen3-moe").to("cuda", torch.bfloat16), "conservative")
    blocks = [m for m in model.modules() if isinstance(m, FusedMoEBlock)]
    dense = [(b.w13, b.w2, b.w13.detach().clone(), b.w2.detach().clone()) for b in blocks]
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        expected = model(ids).logits
    copies_bytes = sum(c13.numel() * c13.element_size() + c2.numel() * c2.element_size() for *_, c13, c2 in dense)
    before = torch.cuda.memory_allocated()
    result = PASSES[name](model, offload=True)
    assert result.count == len(blocks) and result.offloaded_bytes == copies_bytes
    assert all(w13.device.type == "cpu" and w2.device.type == "cpu" for w13, w2, *_ in dense)  # kept on the host
    assert torch.cuda.memory_allocated() < before  # new packed weights are smaller than the dense ones they replace
    result.undo()
    for block, (w13, w2, c13, c2) in zip(blocks, dense):
        assert block.packed is None and block.w13 is w13 and block.w13.is_cuda and block.w2.is_cuda
        assert torch.equal(block.w13, c13) and torch.equal(block.w2, c2)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


def test_automatic_offload_stays_off_when_the_gpu_has_room():
    model = mc.optimize(build_tiny_model("tiny-qwen3-moe").to("cuda", torch.bfloat16), "conservative")
    result = quantize_fp8(model)
    assert result.count > 0 and result.offloaded_bytes == 0
    result.undo()
