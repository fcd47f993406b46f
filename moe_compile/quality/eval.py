"""Perplexity of a byte-level LM on held-out text (or any calibration text), fast enough for a quality gate."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from moe_compile.quality.corpus import heldout_bytes

SEQ_LEN = 256
DEFAULT_MAX_BYTES = 16384

TextLike = Union[str, bytes, torch.Tensor]


def encode(text: TextLike) -> torch.Tensor:
    """str (UTF-8) or bytes -> byte ids [N] (int64); a tensor of token ids passes through, flattened."""
    if isinstance(text, torch.Tensor):
        return text.reshape(-1).long()
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def windows(ids: torch.Tensor, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """[N] -> [B, seq_len + 1] non-overlapping windows (each predicts its last seq_len tokens); the tail is dropped."""
    n = (ids.numel() - 1) // seq_len
    if n == 0:
        raise ValueError(f"need more than {seq_len} tokens of text to measure perplexity, got {ids.numel()}")
    starts = torch.arange(n) * seq_len
    return torch.stack([ids[s: s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model: nn.Module, split: str = "heldout", max_bytes: int = DEFAULT_MAX_BYTES,
               text: Optional[TextLike] = None, seq_len: int = SEQ_LEN, batch_size: int = 16) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping `seq_len` windows.

    `text` (str, bytes or token ids) overrides `split`; `split="heldout"` reads the shipped held-out text.
    """
    if text is None:
        if split != "heldout":
            raise ValueError(f"unknown split {split!r}: use 'heldout' or pass text=")
        text = heldout_bytes(max_bytes)
    ids = encode(text)[: max_bytes + 1] if not isinstance(text, torch.Tensor) else encode(text)
    data = windows(ids, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in data.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch[:, :-1]).logits.float()  # [B, S, V]
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                               reduction="sum")
            total += loss.item()
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)
