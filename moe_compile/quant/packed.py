"""`PackedExperts`: a fused block's expert weights in a packed storage format (FP8 and/or 2:4), and its forward.

Formats (`weight_format`):
  * `fp8`      — w13 [E, 2I, H], w2 [E, H, I] float8_e4m3fn, scales w13_scale [E, 2I], w2_scale [E, H] fp32;
  * `sparse24` — w13 [E, 2I, H/2], w2 [E, H, I/2] in the original dtype + uint8 metadata (see `sparse24`);
  * `fp8+sparse24` — both: the compressed values in fp8 with per-output-channel scales.
FP8 formats quantize activations per token at run time (`act_quant="fp8_per_token"`).
The forward is one `torch.ops.moe_compile.fused_moe_packed` call.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from moe_compile.quant.fp8 import FP8_DTYPE, dequantize_per_channel
from moe_compile.quant.sparse24 import decompress_24


def unpack_weight(w: Tensor, scale: Optional[Tensor], meta: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """Dense weight [..., N, K] in `dtype` from packed storage: dequantize (scale) then decompress (meta)."""
    dense = w if scale is None else dequantize_per_channel(w, scale, torch.float32)
    if meta is not None:
        dense = decompress_24(dense, meta)
    return dense.to(dtype)


class PackedExperts(nn.Module):
    def __init__(self, w13: Tensor, w2: Tensor, w13_scale: Optional[Tensor] = None, w2_scale: Optional[Tensor] = None,
                 w13_meta: Optional[Tensor] = None, w2_meta: Optional[Tensor] = None):
        super().__init__()
        self.register_buffer("w13", w13)
        self.register_buffer("w2", w2)
        self.register_buffer("w13_scale", w13_scale)
        self.register_buffer("w2_scale", w2_scale)
        self.register_buffer("w13_meta", w13_meta)
        self.register_buffer("w2_meta", w2_meta)

    @property
    def fp8(self) -> bool:
        return self.w13.dtype == FP8_DTYPE

    @property
    def sparse24(self) -> bool:
        return self.w13_meta is not None

    @property
    def weight_format(self) -> str:
        return "+".join(name for name, on in (("fp8", self.fp8), ("sparse24", self.sparse24)) if on) or "dense"

    @property
    def act_quant(self) -> str:
        return "fp8_per_token" if self.fp8 else "none"

    def extra_repr(self) -> str:
        return f"format={self.weight_format}, w13={tuple(self.w13.shape)}, w2={tuple(self.w2.shape)}"

    def dense(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(w13 [E, 2I, H], w2 [E, H, I]) dense in `dtype`: what the packed weights represent."""
        return (unpack_weight(self.w13, self.w13_scale, self.w13_meta, dtype),
                unpack_weight(self.w2, self.w2_scale, self.w2_meta, dtype))

    def forward(self, x: Tensor, router_weight: Tensor, router_bias: Optional[Tensor],
                correction_bias: Optional[Tensor], b13: Optional[Tensor], b2: Optional[Tensor], backend: str,
                **op_kwargs) -> Tensor:
        return torch.ops.moe_compile.fused_moe_packed(
            x, router_weight, router_bias, correction_bias, self.w13, self.w2, b13, b2,
            self.w13_scale, self.w2_scale, self.w13_meta, self.w2_meta, act_quant=self.act_quant, backend=backend,
            **op_kwargs)


class ModulePassResult:
    """What a module-level pass did: `count` blocks rewritten, `skipped` block -> reason, and `undo()` to put the
    previous weights back (used by the quality gate and by `optimize` on a failure)."""

    def __init__(self, name: str):
        self.name = name
        self.count = 0
        self.skipped: dict[str, str] = {}
        self._undo: list = []

    def record(self, block: nn.Module) -> None:
        saved = (block.w13, block.w2, block.packed)

        def restore() -> None:
            block.w13, block.w2, block.packed = saved

        self._undo.append(restore)
        self.count += 1

    def undo(self) -> None:
        for step in reversed(self._undo):
            step()
        self._undo.clear()


def install(block: nn.Module, packed: PackedExperts) -> None:
    """Make `block` (a FusedMoEBlock) run `packed`; its dense w13 / w2 parameters are dropped."""
    block.packed = packed
    block.w13 = None
    block.w2 = None
