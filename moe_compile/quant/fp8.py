"""FP8 (e4m3) numerics: per-output-channel weight quantization and dynamic per-token activation quantization.

Weights `w [..., N, K]` (N output channels, K the reduction dim) get one fp32 scale per output channel,
`scale [..., N] = amax_k |w| / 448`, and are stored as `torch.float8_e4m3fn`. Activations `x [T, K]` are quantized at
run time with one scale per token (row), so no calibration data is needed for them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moe_compile.quant.chunks import row_chunks

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
MIN_SCALE = 1e-12  # all-zero rows (e.g. padded experts) get this scale instead of a division by zero


def quantize_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [..., N, K] -> (q [..., N, K] float8_e4m3fn, scale [..., N] fp32) with w ≈ q * scale[..., None]."""
    return quantize_rows(w, None)


def quantize_rows(w: Tensor, scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """w [..., N, K] -> (q, scale [..., N] fp32): one scale per row (output channel), `scale` if given, else the
    row's amax / 448. Works a few rows at a time (quant.chunks), so a whole MoE layer needs no fp32 copy of itself."""
    k = w.shape[-1]
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    out_scale = torch.empty(w.shape[:-1], dtype=torch.float32, device=w.device)
    rows_w, rows_q, rows_s = w.detach().reshape(-1, k), q.view(-1, k), out_scale.view(-1)
    given = None if scale is None else scale.detach().to(device=w.device, dtype=torch.float32).reshape(-1)
    for rows in row_chunks(rows_w.shape[0], k):
        wf = rows_w[rows].float()
        s = (wf.abs().amax(dim=-1) / E4M3_MAX).clamp(min=MIN_SCALE) if given is None else given[rows]
        rows_q[rows] = (wf / s.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
        rows_s[rows] = s
    return q, out_scale


def dequantize_per_channel(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(q [..., N, K] fp8, scale [..., N]) -> [..., N, K] in `dtype`."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [T, K] -> (q [T, K] float8_e4m3fn, scale [T] fp32): dynamic scales, one per token."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / E4M3_MAX).clamp(min=MIN_SCALE)  # [T]
    q = (xf / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q, scale


def fake_quant_per_token(x: Tensor) -> Tensor:
    """Quantize x [T, K] per token to e4m3 and dequantize back to x's dtype (the emulated FP8 activation path)."""
    q, scale = quantize_per_token(x)
    return dequantize_per_channel(q, scale, x.dtype)


def sqnr(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's `compute_error`): 20 log10(|ref| / |ref - approx|)."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(ref.norm() / noise))
