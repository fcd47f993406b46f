"""`FP8Linear`: an `nn.Linear` with FP8 (e4m3) weights and dynamic per-token FP8 activations (W8A8).

Storage: `weight [N, K]` float8_e4m3fn with one fp32 scale per output channel, `weight_scale [N]`
(`quant.fp8.quantize_per_channel`), and the optional `bias [N]` in the original dtype. At run time the input is
quantized per token (one fp32 scale a row, `quant.fp8.quantize_per_token`), then:
  * kernel path (`path == "scaled_mm"`): on CUDA GPUs with FP8 tensor cores (sm_89+), `torch._scaled_mm` with
    row-wise scales: e4m3 x e4m3 -> fp32 accumulation, `scale_a [T, 1] x scale_b [1, N]` and the bias in the
    epilogue, output in the input's dtype. Its contract (torch 2.11): the first operand row-major, the second
    column-major (`weight.t()` of the contiguous [N, K] weight), K and N multiples of 16, fp32 scales of exactly
    those shapes, outputs in bf16 (fp16 from sm_90, fp32 on sm_90 with CUDA 12.9+: `kernel_takes`), and a bias
    only for bf16 / fp16 outputs, in the output's dtype (fp32 outputs get it added afterwards).
    The input's quantization is one Triton launch (`kernels.triton.packed.quantize_rows_kernel`).
  * emulated path (`path == "emulated"`): the numerics of the packed experts' reference
    (`kernels.reference.torch_fused_moe_packed`): quantize-dequantize the input per token, dequantize the weight
    to the input's dtype, `F.linear` in that dtype. It runs where the kernel cannot: on the CPU, on GPUs without FP8,
    for K or N not multiples of 16 and for input dtypes the kernel does not give (logged once on a GPU: no speedup
    there), and where gradients flow to the input (the kernel has no backward; the emulation passes gradients
    straight through the rounding).

The FP8 weight and its fp32 scales keep their storage format through `module.to(dtype)` / `model.half()`: only
the bias follows such a cast (the output always has the input's dtype).

Dimension legend: T = tokens (all leading dims of the input flattened), K = in_features, N = out_features.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_compile.quant.fp8 import (FP8_DTYPE, dequantize_per_channel, fake_quant_per_token, quantize_per_channel,
                                   quantize_per_token)

try:  # the one-launch row quantization of the packed-expert kernels; torch ops where Triton is missing
    import triton

    from moe_compile.kernels.triton.packed import quantize_rows_kernel
except ImportError:
    triton = quantize_rows_kernel = None

log = logging.getLogger("moe_compile")

KERNEL_ALIGNMENT = 16  # torch._scaled_mm: K and N multiples of 16
BIAS_DTYPES = (torch.bfloat16, torch.float16)  # outputs for which it adds the bias in its epilogue
QUANT_BLOCK_MAX = 4096  # columns a program of the row-quantization kernel handles per step
_WARNED: set[str] = set()
_FP8_CAPABLE: dict[int, bool] = {}


@torch.compiler.assume_constant_result
def fp8_capable(device_index: int) -> bool:
    """Whether CUDA device `device_index` has FP8 tensor cores (sm_89+: Ada, Hopper and later)."""
    if device_index not in _FP8_CAPABLE:
        _FP8_CAPABLE[device_index] = torch.cuda.get_device_capability(device_index) >= (8, 9)
    return _FP8_CAPABLE[device_index]


@torch.compiler.assume_constant_result
def kernel_takes(device_index: int, dtype: torch.dtype) -> bool:
    """Whether torch._scaled_mm's row-wise scaling produces `dtype` outputs on CUDA device `device_index` (as torch's
    own tests expect: bf16 on every FP8 GPU, fp16 from sm_90, fp32 only from cuBLAS 12.9+ on sm_90)."""
    capability = torch.cuda.get_device_capability(device_index)
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    return (dtype == torch.bfloat16 or (dtype == torch.float16 and capability >= (9, 0))
            or (dtype == torch.float32 and capability == (9, 0) and cuda >= (12, 9)))


def kernel_unsupported(device: torch.device, in_features: int, out_features: int) -> Optional[str]:
    """Why `torch._scaled_mm` cannot run an [out_features, in_features] FP8 weight on `device`; None if it can."""
    if device.type != "cuda":
        return f"FP8 kernels need a CUDA GPU, the weight is on {device.type}"
    if not fp8_capable(device.index if device.index is not None else torch.cuda.current_device()):
        return "this GPU has no FP8 tensor cores (sm_89+)"
    odd = [f"{name}={size}" for name, size in (("K", in_features), ("N", out_features))
           if size % KERNEL_ALIGNMENT]
    if odd:
        return f"{', '.join(odd)} not a multiple of {KERNEL_ALIGNMENT}, which torch._scaled_mm requires"
    return None


def fp8_linear_emulated(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The emulated FP8 linear: x [T, K] quantized-dequantized per token, weight [N, K] e4m3 with scale [N] fp32
    dequantized to x's dtype, F.linear in x's dtype -> [T, N]. Gradients reach x straight through the rounding."""
    w = dequantize_per_channel(weight, weight_scale, x.dtype)  # [N, K]
    xq = fake_quant_per_token(x.detach())  # [T, K]
    if x.requires_grad:  # the same values (x and xq are within 2x: exact differences), the gradient of x
        xq = x + (xq - x).detach()
    return F.linear(xq, w, None if bias is None else bias.to(x.dtype))


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [T, K] (CUDA, contiguous) -> (q [T, K] e4m3, scale [T] fp32) as `quant.fp8.quantize_per_token` computes
    them, in one Triton launch (torch ops where Triton is missing)."""
    if quantize_rows_kernel is None:
        return quantize_per_token(x)
    tokens, k = x.shape
    q = torch.empty(tokens, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(tokens, dtype=torch.float32, device=x.device)
    unused = torch.empty(1, dtype=torch.float32, device=x.device)  # the buffer it zeroes for the expert kernels
    quantize_rows_kernel[(tokens,)](x, q, scale, unused, k, x.stride(0), q.stride(0), 0, 0,  # zero_n = 0: none
                                    BLOCK=min(QUANT_BLOCK_MAX, triton.next_power_of_2(k)), ZERO_BLOCK=128,
                                    num_warps=4)
    return q, scale


class FP8Linear(nn.Module):
    """Drop-in replacement of an `nn.Linear` (see the module docstring); build it with `FP8Linear.from_linear`."""

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
                 use_fast_accum: bool = False):
        super().__init__()
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise ValueError(f"FP8Linear needs a 2-D {FP8_DTYPE} weight [N, K], got {weight.dtype} "
                             f"{tuple(weight.shape)}; build it with FP8Linear.from_linear(linear)")
        if tuple(weight_scale.shape) != (weight.shape[0],):
            raise ValueError(f"FP8Linear weight_scale must have shape ({weight.shape[0]},) (one per output channel), "
                             f"got {tuple(weight_scale.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())  # [N, K] e4m3
        self.register_buffer("weight_scale", weight_scale.to(torch.float32))  # [N]
        self.register_buffer("bias", bias)  # [N] in the original dtype, or None
        self.use_fast_accum = use_fast_accum  # torch._scaled_mm's faster, less exact FP8 accumulation
        self.kernel = True  # False forces the emulated path (same numerics, no speedup), e.g. to compare the two

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """Quantize `linear`'s weight per output channel (scale = amax / 448); its bias is copied as it is."""
        weight, scale = quantize_per_channel(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(weight, scale, bias)

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias_dtype: Optional[torch.dtype]) -> "FP8Linear":
        """An uninitialised module of this shape (filled by a checkpoint's weight load)."""
        bias = None if bias_dtype is None else torch.empty(out_features, dtype=bias_dtype)
        return cls(torch.empty(out_features, in_features, dtype=FP8_DTYPE), torch.empty(out_features), bias)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """[N, K] in `dtype`: the weight the FP8 one represents."""
        return dequantize_per_channel(self.weight, self.weight_scale, dtype)

    @property
    def path(self) -> str:
        """The path a bf16 input takes on the weight's device: "scaled_mm" or "emulated (why)"."""
        if not self.kernel:
            return "emulated (kernel=False)"
        reason = kernel_unsupported(self.weight.device, self.in_features, self.out_features)
        return "scaled_mm" if reason is None else f"emulated ({reason})"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=e4m3 per-channel, input=e4m3 per-token, path={self.path}")

    def _use_kernel(self, x: Tensor) -> bool:
        """x [T, K]: whether this call runs torch._scaled_mm (logs once on a GPU where it cannot)."""
        if not self.kernel or x.device.type != "cuda" or x.shape[0] == 0:
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False  # the emulation carries gradients to the input; torch._scaled_mm has no backward
        reason = kernel_unsupported(self.weight.device, self.in_features, self.out_features)
        if reason is None and not kernel_takes(x.device.index, x.dtype):
            reason = f"input dtype {x.dtype}: this GPU's row-wise FP8 kernel gives other outputs"
        if reason is not None and not torch.compiler.is_compiling():
            _warn_once(f"FP8Linear [{self.out_features}, {self.in_features}]: torch._scaled_mm cannot run it "
                       f"({reason}); running the emulated FP8 path instead (same numerics, no speedup)")
        return reason is None

    def _scaled_mm(self, x: Tensor) -> Tensor:
        """x [T, K] -> [T, N] in x's dtype on the FP8 tensor cores."""
        q, scale = quantize_rows(x.contiguous())  # [T, K] e4m3, [T] fp32
        fused_bias = self.bias is not None and x.dtype in BIAS_DTYPES
        out = torch._scaled_mm(q, self.weight.t(), scale_a=scale.unsqueeze(1),  # [T, K] x [K, N] column-major
                               scale_b=self.weight_scale.unsqueeze(0),  # [T, 1] x [1, N] row-wise scales
                               bias=self.bias.to(x.dtype) if fused_bias else None, out_dtype=x.dtype,
                               use_fast_accum=self.use_fast_accum)
        if self.bias is not None and not fused_bias:
            out = out + self.bias.to(x.dtype)
        return out

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [T, K]
        if self._use_kernel(x2):
            out = self._scaled_mm(x2)
        else:
            out = fp8_linear_emulated(x2, self.weight, self.weight_scale, self.bias)
        return out.reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        """Moves follow `fn`; the FP8 weight and its fp32 scales keep their dtypes (a cast would lose the format)."""
        kept = {name: self._buffers[name] for name in ("weight", "weight_scale")}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)
