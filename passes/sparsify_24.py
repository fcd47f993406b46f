"""sparsify_24: 2:4 pruning of every fused MoE block's expert weights (module-level pass): magnitude, or weights
pruned beforehand from calibration activations (`moe_compile.quant.sparsegpt`).

In each group of 4 weights along the input dim (H for w13, I for w2) the 2 of largest magnitude are kept; the block
then stores compressed values [.., K/2] + uint8 metadata (`moe_compile.quant.sparse24`) and runs
`fused_moe_packed`. Router and shared expert are untouched. Must run before `quantize_fp8` (which then quantizes
the kept values). It saves weight memory (0.56x in bf16), not time: the 2:4 kernels are slower than dense ones.
Counts the blocks it rewrote (`counters["moe_compile"]["sparsify_24"]`); `result.undo()` puts the dense weights back.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Union

from torch import Tensor, nn

from moe_compile.counters import counters
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.quant.packed import ModulePassResult, PackedExperts, convert_blocks
from moe_compile.quant.sparse24 import compress_24

NAME = "sparsify_24"


def unsupported_24(w13: Tensor, w2: Tensor) -> Optional[str]:
    """Why these expert weights cannot be 2:4-compressed (a reduction dim not a multiple of 4), or None."""
    bad = [k for k in (w13.shape[-1], w2.shape[-1]) if k % 4]
    return f"reduction dim {bad[0]} is not a multiple of 4" if bad else None


def sparse24_experts(w13: Tensor, w2: Tensor) -> PackedExperts:
    """Expert weights magnitude-pruned to 2:4 and compressed (values [.., K/2] + uint8 metadata) as `PackedExperts`;
    of an already 2:4 weight, exactly its non-zeros. Shared by the module pass and the graph pass."""
    v13, m13 = compress_24(w13.detach())
    v2, m2 = compress_24(w2.detach())
    return PackedExperts(v13, v2, w13_meta=m13, w2_meta=m2)


Pruned = dict[str, Union[tuple[Tensor, Tensor], Callable[[], tuple[Tensor, Tensor]]]]


def _sparse24_block(block: FusedMoEBlock, pruned: Optional[Pruned], name: str) -> PackedExperts:
    """The block's packed 2:4 weights, reading its weights only now (each block's dense weights can then leave the
    GPU once converted: `convert_blocks`); a SparseGPT entry is taken out of `pruned` (and computed, when it is a
    callable) as it is used."""
    weights = (pruned or {}).pop(name, None)
    if callable(weights):
        weights = weights()
    w13, w2 = weights if weights is not None else (block.w13.detach(), block.w2.detach())
    return sparse24_experts(w13, w2)


def sparsify_24(model: nn.Module, pruned: Optional[Pruned] = None,
                offload: Optional[bool] = None) -> ModulePassResult:
    """pruned: per block name, (w13, w2) already 2:4-sparse (e.g. `quant.sparsegpt`) or a callable returning them,
    taken out of the dict as each block is converted; other blocks are magnitude-pruned. Blocks are converted one at
    a time, each reading its weights only when its turn comes; `offload` as in `quant.packed.convert_blocks`."""
    result = ModulePassResult(NAME)
    planned = []
    for name, block in model.named_modules():
        if not isinstance(block, FusedMoEBlock):
            continue
        packed = block.packed
        if packed is not None and packed.sparse24:
            result.skipped[name] = "already 2:4 sparse"
            continue
        if packed is not None:
            raise ValueError(f"{name}: sparsify_24 must run before quantize_fp8 "
                             f"(its weights are {packed.weight_format})")
        reason = unsupported_24(block.w13, block.w2)
        if reason:
            result.skipped[name] = reason
            continue
        planned.append((block, partial(_sparse24_block, block, pruned, name)))
    convert_blocks(result, planned, offload)
    counters["moe_compile"][NAME] += result.count
    return result
