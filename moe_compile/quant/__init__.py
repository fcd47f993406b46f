"""Numerics for FP8 (e4m3, per-channel weights, dynamic per-token activations) and 2:4 sparsity of expert weights.

Plain torch, any device: the storage formats and the emulated (reference) numerics; the GPU kernels that run the
packed formats are `moe_compile.kernels.triton_packed`.
"""

from moe_compile.quant.fp8 import (E4M3_MAX, FP8_DTYPE, dequantize_per_channel, fake_quant_per_token,
                                   quantize_per_channel, quantize_per_token, sqnr)
from moe_compile.quant.packed import PackedExperts, unpack_weight
from moe_compile.quant.sparse24 import compress_24, decompress_24, is_24_sparse, mask_24, prune_24

__all__ = ["E4M3_MAX", "FP8_DTYPE", "PackedExperts", "compress_24", "decompress_24", "dequantize_per_channel",
           "fake_quant_per_token", "is_24_sparse", "mask_24", "prune_24", "quantize_per_channel",
           "quantize_per_token", "sqnr", "unpack_weight"]
