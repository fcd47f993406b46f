"""The quality model: a small byte-level language model with the Qwen3-MoE architecture, trained on the Python
standard library (`python -m moe_compile.quality.train`) and shipped as fp16 safetensors in `data/`.

It is the yardstick for FP8 and 2:4: perplexity on held-out stdlib text before and after a transformation.
Loading never trains: it builds the model from the shipped config and loads the shipped weights.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Optional

import torch
from torch import nn

QUALITY_MODEL_NAME = "quality-qwen3-moe"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# byte-level: vocab 256 = one token per byte, no tokenizer
CONFIG: dict[str, Any] = dict(
    vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=256, moe_intermediate_size=96, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=512, tie_word_embeddings=True,
    rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)


def build_model(config: Optional[dict[str, Any]] = None, seed: int = 0) -> nn.Module:
    """A randomly initialised quality model (what `train` starts from)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(**(config or CONFIG))
    cfg.architectures = [Qwen3MoeForCausalLM.__name__]
    model = Qwen3MoeForCausalLM(cfg)
    model.moe_compile_quality_model = True  # the quality gate's default calibration text is its held-out text
    return model


def _data() -> resources.abc.Traversable:
    return resources.files("moe_compile.quality").joinpath("data")


def shipped_config() -> dict[str, Any]:
    return json.loads(_data().joinpath(CONFIG_FILE).read_text())


def load_quality_model(dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The shipped, trained quality model in `dtype`, in eval mode (no training happens here)."""
    from safetensors.torch import load

    meta = shipped_config()
    model = build_model(meta["model"])
    state = load(_data().joinpath(WEIGHTS_FILE).read_bytes())
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"shipped quality weights do not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
    model.tie_weights()
    return model.to(dtype).eval()
