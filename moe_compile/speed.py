"""Decode speed through `generate`, before and after `optimize`: what `moe-compile bench --speed` prints, and the
clock `benchmarks/bench_e2e.py` uses.

`StepClock` is a transformers StoppingCriteria that never stops: it stamps the host clock each time generate checks
it, i.e. once per generated token, after waiting for the device, so each stamp follows that step's device work: the
first stamp ends the prefill (+ first token) and the gaps are per-step wall times. `measure_generate` runs a
warm-up call (it compiles and captures whatever it will), then one timed call: the decode step is the median gap
(steady state), the mean keeps any re-compile inside the call.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Stamps the host clock once per generated token, after the device's work for it (see the module doc);
    `on_step` (optional) runs at each stamp (a profiler's `step()` for a steady-state trace)."""

    def __init__(self, device: torch.device, on_step: Optional[Callable[[], Any]] = None):
        self.device = device
        self.stamps: list[float] = []
        self.on_step = on_step

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        if self.on_step is not None:
            self.on_step()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def gaps_ms(self) -> list[float]:
        """Wall time of each decode step (the first stamp follows the prefill)."""
        return [1e3 * (b - a) for a, b in zip(self.stamps, self.stamps[1:])]


def timed_generate(model: nn.Module, ids: torch.Tensor, new_tokens: int, clock: Optional[StepClock] = None,
                   **kwargs: Any) -> tuple[float, torch.Tensor]:
    """(seconds, output ids) of one greedy `generate` of exactly `new_tokens` tokens."""
    from transformers import StoppingCriteriaList

    criteria = StoppingCriteriaList([clock]) if clock is not None else None
    synchronize(ids.device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, stopping_criteria=criteria, **kwargs)
    synchronize(ids.device)
    return time.perf_counter() - start, out


def measure_generate(model: nn.Module, ids: torch.Tensor, steps: int, **kwargs: Any) -> dict[str, Any]:
    """Warm-up call, then one timed call of steps + 1 tokens: prefill_ms, decode_step_ms (median step),
    decode_mean_ms, decode_tok_s, warmup_s, peak_mem_gb (CUDA; None elsewhere) and the output `tokens`."""
    cuda = ids.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(ids.device)
    warm, _ = timed_generate(model, ids, steps + 1, **kwargs)
    clock = StepClock(ids.device)
    synchronize(ids.device)
    start = time.perf_counter()
    _, out = timed_generate(model, ids, steps + 1, clock=clock, **kwargs)
    gaps = sorted(clock.gaps_ms())
    step_ms = gaps[len(gaps) // 2]
    return dict(prefill_ms=1e3 * (clock.stamps[0] - start), decode_step_ms=step_ms,
                decode_mean_ms=sum(gaps) / len(gaps), decode_tok_s=1e3 * ids.shape[0] / step_ms, warmup_s=warm,
                peak_mem_gb=torch.cuda.max_memory_allocated(ids.device) / 2**30 if cuda else None, tokens=out)


@dataclass
class SpeedRow:
    batch: int
    model: str  # "original" or "moe_compile <profile>"
    prefill_ms: float
    decode_step_ms: float
    decode_tok_s: float
    warmup_s: float
    peak_mem_gb: Optional[float]
    speedup: Optional[float]  # the original's decode step over this row's (optimized rows)
    tokens_match: Optional[float]  # fraction of greedy tokens equal to the original's (optimized rows)

    def to_dict(self) -> dict:
        return asdict(self)


def speed_table(model: nn.Module, batches: Sequence[int], prompt: int, steps: int, profile: str = "balanced",
                seed: int = 0, **overrides: Any) -> tuple[list[SpeedRow], Any]:
    """Time greedy `generate` of `model` at each batch (random prompts of `prompt` ids), optimize it in place with
    `profile` (and `overrides`), time it again: (rows, the optimize result)."""
    import moe_compile as mc

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    generator = torch.Generator(device=device).manual_seed(seed)
    prompts = {b: torch.randint(0, vocab, (b, prompt), device=device, generator=generator) for b in batches}
    original = {b: measure_generate(model, ids, steps) for b, ids in prompts.items()}
    mc.optimize(model, profile, **overrides)
    rows = [_row(b, "original", m) for b, m in original.items()]
    for b, ids in prompts.items():
        m = measure_generate(model, ids, steps)
        reference, tokens = original[b]["tokens"][:, prompt:], m["tokens"][:, prompt:]
        rows.append(_row(b, f"moe_compile {model.moe_compile.profile}", m,
                         speedup=original[b]["decode_step_ms"] / m["decode_step_ms"],
                         tokens_match=(tokens == reference).float().mean().item()))
    return rows, model.moe_compile


def _row(batch: int, name: str, m: dict[str, Any], **extra: Any) -> SpeedRow:
    values = {key: m[key] for key in ("prefill_ms", "decode_step_ms", "decode_tok_s", "warmup_s", "peak_mem_gb")}
    return SpeedRow(batch=batch, model=name, **values, speedup=extra.get("speedup"),
                    tokens_match=extra.get("tokens_match"))
