"""A Mixtral-8x7B-shaped model (46.7B parameters: 93 GB in bf16, more than one H100 holds) end to end in FP8 on
one GPU: built layer by layer, each decoder layer optimized (`fp8=True`) as soon as it exists, so the bf16 experts
of only one layer are ever on the GPU; then `generate` through the FP8 packed-expert kernels.

  python benchmarks/bench_fp8_mixtral.py [--layers 32] [--batches 1,8] [--prompt 128] [--steps 16] [--out DIR]
  python benchmarks/bench_fp8_mixtral.py --smoke      # CPU, tiny shape: the same code path, emulated FP8

This is how a user fits such a model: `mc.optimize` takes any module with MoE blocks, so a loader can convert each
decoder layer while the next one loads. Reported: weights on the GPU, peak memory, prefill time and per-step decode
latency, the FP8 bytes-per-step floor from the copy bandwidth measured in the same run, and a check that greedy
decoding is deterministic and finite. No bf16 baseline on one GPU: it does not fit (that is the point).

Dimension legend: B = batch, P = prompt tokens, H = hidden, I = expert intermediate, E = experts, K = top_k.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils  # noqa: E402
from layerwise import build_layerwise  # noqa: E402

import moe_compile as mc  # noqa: E402
from moe_compile.fused_block import FusedMoEBlock  # noqa: E402

MIXTRAL_8X7B = dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
SMOKE = dict(hidden_size=64, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


@dataclass
class Row:
    card: str
    date: str
    git_commit: str
    layers: int
    batch: int
    prompt: int
    weights_gb: float
    peak_mem_gb: float
    build_s: float
    prefill_ms: float
    decode_step_ms: float
    decode_tok_s: float
    floor_step_ms: float
    ratio_to_floor: float
    deterministic: bool
    expert_format: str


def build_fp8_model(config_kwargs: dict, layers: int, device: torch.device, dtype: torch.dtype):
    """The model on `device` with every MoE block fused and in FP8, one decoder layer at a time."""
    from transformers import MixtralConfig

    def to_fp8(index: int, layer: torch.nn.Module) -> None:
        mc.optimize(layer, profile="conservative", fp8=True, verify=True)  # this layer's experts -> FP8 now
        fused = [m for m in layer.modules() if isinstance(m, FusedMoEBlock)]
        if len(fused) != 1 or fused[0].packed is None:
            raise RuntimeError(f"layer {index}: expected one FP8 fused MoE block, got {layer.moe_compile}")

    return build_layerwise(MixtralConfig(**config_kwargs, num_hidden_layers=layers), device, dtype, to_fp8)


def _weights_gb(model: torch.nn.Module) -> float:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device: torch.device, reps: int = 3) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, 1e3 * (time.perf_counter() - start))
    return best


def fp8_step_bytes(config_kwargs: dict, layers: int, batch: int) -> int:
    """Bytes one decode step must read at least: the FP8 experts the batch routes to (all E once B*K >= E,
    else B*K) with their scales, plus the bf16 attention and the lm_head (embedding rows are negligible)."""
    H, I, E, K = (config_kwargs[k] for k in ("hidden_size", "intermediate_size", "num_local_experts",
                                             "num_experts_per_tok"))
    heads, kv, vocab = config_kwargs["num_attention_heads"], config_kwargs["num_key_value_heads"], \
        config_kwargs["vocab_size"]
    head_dim = H // heads
    active = min(E, batch * K)
    experts = active * (3 * H * I + 2 * I * 4 + H * 4)  # fp8 weights + fp32 per-channel scales
    attention = 2 * (H * heads * head_dim + 2 * H * kv * head_dim + heads * head_dim * H) + 2 * E * H
    return layers * (experts + attention) + 2 * vocab * H


def run(args) -> list[Row]:
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shape = SMOKE if args.smoke else MIXTRAL_8X7B
    meta = utils.run_meta() if device.type == "cuda" else dict(card="cpu", date=time.strftime("%Y-%m-%d"),
                                                              git_commit="smoke")
    bandwidth = utils.copy_bandwidth() if device.type == "cuda" else 1e11
    start = time.perf_counter()
    model = build_fp8_model(shape, args.layers, device, dtype)
    build_s = time.perf_counter() - start
    formats = sorted({m.packed.weight_format for m in model.modules() if isinstance(m, FusedMoEBlock)})
    weights = _weights_gb(model)
    print(f"built {args.layers} layers in {build_s:.1f} s: {weights:.1f} GB of weights on {device} "
          f"(experts {', '.join(formats)})", flush=True)
    rows = []
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, shape["vocab_size"], (batch, args.prompt), generator=gen).to(device)  # [B, P]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        kwargs = dict(do_sample=False, pad_token_id=0)
        with torch.no_grad():
            prefill_ms = _time_ms(lambda: model(prompt), device)
            first = model.generate(prompt, max_new_tokens=args.steps, min_new_tokens=args.steps, **kwargs)
            again = model.generate(prompt, max_new_tokens=args.steps, min_new_tokens=args.steps, **kwargs)
            long_ms = _time_ms(lambda: model.generate(prompt, max_new_tokens=args.steps,
                                                      min_new_tokens=args.steps, **kwargs), device, reps=2)
            short_ms = _time_ms(lambda: model.generate(prompt, max_new_tokens=1, **kwargs), device, reps=2)
        step_ms = (long_ms - short_ms) / (args.steps - 1)
        floor_ms = 1e3 * fp8_step_bytes(shape, args.layers, batch) / bandwidth
        peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
        rows.append(Row(meta["card"], meta["date"], meta["git_commit"], args.layers, batch, args.prompt,
                        round(weights, 2), round(peak, 2), round(build_s, 1), round(prefill_ms, 2),
                        round(step_ms, 3), round(batch * 1e3 / step_ms, 1), round(floor_ms, 3),
                        round(step_ms / floor_ms, 2), bool(torch.equal(first, again)), "+".join(formats)))
        print(rows[-1], flush=True)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shape, emulated FP8")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32, smoke 2)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    args.layers = args.layers or (2 if args.smoke else 32)
    args.prompt = args.prompt or (8 if args.smoke else 128)
    args.steps = args.steps or (4 if args.smoke else 16)
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = run(args)
    os.makedirs(args.out, exist_ok=True)
    tag = "smoke" if args.smoke else rows[0].card.replace(" ", "_")
    path = os.path.join(args.out, f"fp8_mixtral_{args.layers}layers_{tag}_{rows[0].date}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    print("wrote", path)


if __name__ == "__main__":
    main()
