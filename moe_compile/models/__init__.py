"""Built-in tiny models, built offline from configs, so everything runs on a laptop with no network."""

from moe_compile.models.tiny import TINY_MODELS, build_tiny_model, tiny_model_names

__all__ = ["TINY_MODELS", "build_tiny_model", "tiny_model_names"]
