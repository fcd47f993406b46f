"""Build a transformers model too large for one device's memory in its full dtype: from the meta device, one
decoder layer at a time, each layer optimized (fused, then FP8 or sharded) as soon as it exists, so the full-size
expert weights of only one layer are ever materialised. `mc.optimize` takes any module with MoE blocks, which is
what makes this work: a loader can convert each layer while the next one loads.

Random weights (normal, std 0.02; norms 1; biases 0), drawn on the device, the same on every rank for one seed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _init_(module: nn.Module, std: float = 0.02) -> None:
    is_norm = "norm" in type(module).__name__.lower()
    for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if tensor.is_floating_point():
            if is_norm or name == "bias":
                tensor.data.fill_(1.0 if is_norm else 0.0)
            else:
                tensor.data.normal_(0.0, std)


def materialise(module: nn.Module, device: torch.device) -> None:
    module.to_empty(device=device)
    for sub in module.modules():
        _init_(sub)


def build_layerwise(config, device: torch.device, dtype: torch.dtype,
                    optimize_layer: Callable[[int, nn.Module], None], seed: int = 0) -> nn.Module:
    """The causal LM of `config` on `device`; `optimize_layer(index, layer)` runs on each decoder layer right after
    it is materialised (it must shrink the layer in place, e.g. `mc.optimize(layer, fp8=True)`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    inner = model.model
    for child in model.children():  # lm_head (embeddings, norm and rotary live in `inner`)
        if child is not inner:
            materialise(child, device)
    for name, child in inner.named_children():
        if name != "layers":
            materialise(child, device)
    if getattr(inner, "rotary_emb", None) is not None:  # computed frequencies, not random: rebuild on the device
        with torch.device(device):
            inner.rotary_emb = type(inner.rotary_emb)(config=config)
    for index, layer in enumerate(inner.layers):
        materialise(layer, device)
        optimize_layer(index, layer)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return model.eval()
