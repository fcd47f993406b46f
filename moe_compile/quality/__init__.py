"""The quality harness: a small trained byte-level MoE LM and its perplexity, the yardstick for FP8 and 2:4."""

from moe_compile.quality.eval import encode, perplexity
from moe_compile.quality.model import QUALITY_MODEL_NAME, build_model, load_quality_model

__all__ = ["QUALITY_MODEL_NAME", "build_model", "encode", "load_quality_model", "perplexity"]
