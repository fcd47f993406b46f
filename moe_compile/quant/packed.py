"""`PackedExperts`: a fused block's expert weights in a packed storage format (FP8 and/or 2:4), and its forward.

Formats (`weight_format`):
  * `fp8`      — w13 [E, 2I, H], w2 [E, H, I] float8_e4m3fn, scales w13_scale [E, 2I], w2_scale [E, H] fp32;
  * `sparse24` — w13 [E, 2I, H/2], w2 [E, H, I/2] in the original dtype + uint8 metadata (see `sparse24`);
  * `fp8+sparse24` — both: the compressed values in fp8 with per-output-channel scales.
FP8 formats quantize activations per token at run time (`act_quant="fp8_per_token"`).
The forward is one `torch.ops.moe_compile.fused_moe_packed` call.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from moe_compile.quant.chunks import row_chunks
from moe_compile.quant.fp8 import FP8_DTYPE, dequantize_per_channel
from moe_compile.quant.sparse24 import decompress_24

log = logging.getLogger("moe_compile")


def unpack_weight(w: Tensor, scale: Optional[Tensor], meta: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """Dense weight [..., N, K] in `dtype` from packed storage: dequantize (scale) then decompress (meta), a few rows
    at a time (quant.chunks: a DeepSeek-V3 layer's fp32 intermediate alone would be 28 GB)."""
    if scale is None and meta is None:
        return w.to(dtype)
    k = w.shape[-1] * (2 if meta is not None else 1)
    out = torch.empty(*w.shape[:-1], k, dtype=dtype, device=w.device)
    rows_w, rows_out = w.reshape(-1, w.shape[-1]), out.view(-1, k)
    rows_s = None if scale is None else scale.reshape(-1)
    rows_m = None if meta is None else meta.reshape(-1, meta.shape[-1])
    for rows in row_chunks(rows_w.shape[0], k):
        dense = rows_w[rows] if rows_s is None else dequantize_per_channel(rows_w[rows], rows_s[rows], torch.float32)
        if rows_m is not None:
            dense = decompress_24(dense, rows_m[rows])
        rows_out[rows] = dense.to(dtype)
    return out


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
        self.offloaded_bytes = 0  # previous weights kept in host memory for undo (see `convert_blocks`)
        self._undo: list = []

    def record(self, block: nn.Module, offload: bool = False) -> None:
        """Keep `block`'s current weights for undo; with `offload` they move to host memory (and back on undo), so
        the GPU memory they held is free for the next block's new weights."""
        saved = (block.w13, block.w2, block.packed)
        device = _weights_device(saved)
        if offload and device is not None and device.type != "cpu":
            self.offloaded_bytes += _move_weights(saved, torch.device("cpu"))
        else:
            device = None

        def restore() -> None:
            if device is not None:
                block.w13, block.w2, block.packed = None, None, None  # free the new weights first: room to move back
                _move_weights(saved, device)
            block.w13, block.w2, block.packed = saved

        self._undo.append(restore)
        self.count += 1

    def add_undo(self, restore, count: int) -> None:
        """A pass that rewrote `count` modules in one go: `restore()` puts them all back."""
        self._undo.append(restore)
        self.count += count

    def undo(self) -> None:
        for step in reversed(self._undo):
            step()
        self._undo.clear()


def _weights_device(saved: tuple) -> Optional[torch.device]:
    w13, _, packed = saved
    return w13.device if w13 is not None else (packed.w13.device if packed is not None else None)


def _move_weights(saved: tuple, device: torch.device) -> int:
    """Move dense Parameters (in place: every module sharing them sees the move) and a PackedExperts to `device`;
    returns the bytes moved."""
    w13, w2, packed = saved
    moved = 0
    for param in (w13, w2):
        if param is not None:
            param.data = param.data.to(device)
            moved += param.numel() * param.element_size()
    if packed is not None:
        packed.to(device)
        moved += sum(b.numel() * b.element_size() for b in packed.buffers())
    return moved


def expert_weight_bytes(blocks: list[nn.Module]) -> int:
    """Bytes of the expert weights the blocks hold now (dense parameters or packed buffers)."""
    total = 0
    for block in blocks:
        tensors = [block.w13, block.w2] if block.packed is None else list(block.packed.buffers())
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def offload_needed(blocks: list[nn.Module]) -> bool:
    """Whether a pass over `blocks` should keep their previous weights in host memory: on a GPU whose free memory is
    less than those weights take now (new packed weights take at most as much), holding both could run out."""
    if not blocks:
        return False
    device = _weights_device((blocks[0].w13, blocks[0].w2, blocks[0].packed))
    if device is None or device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return free < expert_weight_bytes(blocks)


def convert_blocks(result: ModulePassResult, planned: list[tuple[nn.Module, Callable[[], PackedExperts]]],
                   offload: Optional[bool] = None) -> None:
    """Build and install each block's packed weights in turn (all or nothing: a failure undoes the blocks done so
    far). `offload` None decides by free GPU memory (`offload_needed`); when on, each block's previous weights move
    to host memory as soon as its packed ones are installed, so the peak is the old weights plus one new block."""
    offload = offload_needed([block for block, _ in planned]) if offload is None else offload
    try:
        for block, build in planned:
            packed = build()
            result.record(block, offload)
            install(block, packed)
    except BaseException:
        result.undo()
        raise
    if result.offloaded_bytes:
        log.info("moe_compile: %s kept the previous expert weights (%.1f GB) in host memory for undo: the GPU had "
                 "too little free memory for both", result.name, result.offloaded_bytes / 1e9)


def install(block: nn.Module, packed: PackedExperts) -> None:
    """Make `block` (a FusedMoEBlock) run `packed`; its dense w13 / w2 parameters are dropped."""
    block.packed = packed
    block.w13 = None
    block.w2 = None
