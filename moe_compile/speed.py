"""Decode speed through `generate`, before and after `optimize`: what `moe-compile bench --speed` prints, and the
clock `benchmarks/bench_e2e.py` uses.

`StepClock` is a transformers StoppingCriteria that never stops: it stamps the host clock each time generate checks
it, i.e. once per generated token, after waiting for the device, so each stamp follows that step's device work: the
first stamp ends the prefill (+ first token) and the gaps are per-step wall times. `measure_generate` runs a
warm-up call (it compiles and captures whatever it will), then one timed call: the decode step is the median gap
(steady state), the mean keeps any re-compile inside the call.

The floor of a decode step is the bytes it must read (`step_bytes`) over the device's copy bandwidth
(`copy_bandwidth`, measured here): every weight but the expert weights and the input embedding table (of which only
`batch` rows are read), the experts a batch activates (per fused block, E (1 - (1 - K/E)^batch) distinct experts
under uniform routing), and the KV cache in use (bytes per token and sequence measured from a short forward's
cache). Weights at their dtype.
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


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 29) -> float:
    """Device-to-device copy of `nbytes`, bytes read + written per second (the median of 10 copies)."""
    src = torch.empty(nbytes // 2, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return 2 * nbytes / sorted(times)[len(times) // 2]


@dataclass
class StepBytes:
    """What one decode step reads, by part (see the module doc)."""
    weights: int  # every weight but the experts and the input embeddings
    experts: float  # the expected activated experts' weights
    kv_per_token: int  # KV cache bytes per token of one sequence

    def total(self, batch: int, context: int) -> float:
        return self.weights + self.experts + self.kv_per_token * batch * context


def step_bytes(model: nn.Module, batch: int, kv_per_token: int) -> StepBytes:
    """What a decode step of `batch` sequences reads, by part, for an optimized model (experts in fused blocks)."""
    from moe_compile.fused_block import FusedMoEBlock
    from moe_compile.quant.packed import expert_weight_bytes

    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in unique.values())
    expert_total, active_total = 0, 0.0
    for block in model.modules():
        if isinstance(block, FusedMoEBlock):
            nbytes = expert_weight_bytes([block])  # dense parameters, or packed buffers (not parameters)
            expert_total += nbytes if block.packed is None else 0
            experts, top_k = block.spec.num_experts, block.spec.top_k
            active_total += nbytes * (1 - (1 - top_k / experts) ** batch)  # x the expected fraction activated
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    table = 0
    if embeddings is not None and (output is None or output.weight is not embeddings.weight):
        table = embeddings.weight.numel() * embeddings.weight.element_size()
    return StepBytes(weights=total - expert_total - table, experts=active_total, kv_per_token=kv_per_token)


def kv_bytes_per_token(model: nn.Module, tokens: int = 8) -> int:
    """KV cache bytes per token of one sequence: from the cache a forward of `tokens` ids leaves."""
    device = next(model.parameters()).device
    ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    seen: dict[int, torch.Tensor] = {}
    tensors = [getattr(layer, name, None) for layer in getattr(cache, "layers", []) for name in ("keys", "values")]
    tensors += list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", []))  # transformers 4
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            seen[id(tensor)] = tensor
    return sum(t.numel() * t.element_size() for t in seen.values()) // tokens


@dataclass
class SpeedRow:
    batch: int
    model: str  # "original" or "moe_compile <profile>"
    prefill_ms: float
    decode_step_ms: float
    decode_tok_s: float
    warmup_s: float
    peak_mem_gb: Optional[float]
    speedup: Optional[float] = None  # the original's decode step over this row's (optimized rows)
    tokens_match: Optional[float] = None  # fraction of greedy tokens equal to the original's (optimized rows)
    floor_ms: Optional[float] = None  # the step's bytes over the measured copy bandwidth (CUDA only)

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
    kv_per_token = kv_bytes_per_token(model)
    mc.optimize(model, profile, **overrides)
    floors = _floors(model, batches, prompt + steps, kv_per_token)
    rows = [_row(b, "original", m, floor_ms=floors.get(b)) for b, m in original.items()]
    for b, ids in prompts.items():
        m = measure_generate(model, ids, steps)
        reference, tokens = original[b]["tokens"][:, prompt:], m["tokens"][:, prompt:]
        rows.append(_row(b, f"moe_compile {model.moe_compile.profile}", m, floor_ms=floors.get(b),
                         speedup=original[b]["decode_step_ms"] / m["decode_step_ms"],
                         tokens_match=(tokens == reference).float().mean().item()))
    return rows, model.moe_compile


def _floors(model: nn.Module, batches: Sequence[int], context: int, kv_per_token: int) -> dict[int, float]:
    """batch -> decode-step floor in ms at `context` tokens (CUDA; empty elsewhere: no device bandwidth to use)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return {}
    bandwidth = copy_bandwidth(device)
    return {b: 1e3 * step_bytes(model, b, kv_per_token).total(b, context) / bandwidth for b in batches}


def _row(batch: int, name: str, m: dict[str, Any], **extra: Any) -> SpeedRow:
    values = {key: m[key] for key in ("prefill_ms", "decode_step_ms", "decode_tok_s", "warmup_s", "peak_mem_gb")}
    return SpeedRow(batch=batch, model=name, **values, **extra)
