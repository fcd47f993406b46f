"""End to end through HF `generate`: a Qwen3-30B-A3B-shaped model (random weights, bf16, one GPU), prompt P,
batch 1 / 8 / 64: prefill time, per-step decode latency, decode tokens/s, warm-up (compile) time and peak memory,
side by side in one run: HF eager experts, HF grouped_mm, HF grouped_mm + static cache (HF compiles the decode
step), and moe_compile's `optimize(model, "balanced")`. The bytes-per-step floor uses the copy bandwidth
measured in the same run.

  python benchmarks/bench_e2e.py [--layers 48] [--batches 1,8,64] [--prompt 512] [--steps 16] [--out DIR]
                                 [--formats fp8,sparse24,fp8+sparse24] [--prefill compiled|eager] [--trace]
                                 [--dynamic-decode] [--decode-option KEY=VALUE ...] [--merge CSV ... --stem PATH]

moe_compile rewrites the model in place (it reuses the HF expert tensors: no extra memory), so it runs last.
`--formats` adds `moe_compile_<profile>_<format>` rows: a fresh model (same seed, same weights) optimized with
fp8=True and/or sparsity_24=True (ungated: no calibration text), its experts on the packed-weight kernels;
`fp8-experts` keeps the attention linears in bf16 (fp8_attention=False). With MOE_COMPILE_DEFERRED_STOP=1 in the
environment our rows defer generate's stop check by a step (emit/deferred_stop.py); `--dynamic-decode` compiles
our decode step with a dynamic batch (two compiles for all buckets); both are noted in the rows.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils  # noqa: E402

import moe_compile as mc  # noqa: E402
from moe_compile.emit import deferred_stop  # noqa: E402
from moe_compile.speed import StepClock, measure_generate, timed_generate  # noqa: E402  (the clock: see speed.py)

QWEN3_30B = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                 num_experts_per_tok=8, norm_topk_prob=True, num_attention_heads=32, num_key_value_heads=4,
                 head_dim=128, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=False)
EAGER_MAX_STEPS = 3  # HF's eager expert loop takes seconds per step at batch 64: a few steps suffice


@dataclass
class E2ERow:
    card: str
    date: str
    git_commit: str
    layers: int
    batch: int
    prompt: int
    impl: str
    prefill_ms: Optional[float]
    decode_step_ms: Optional[float]  # median step (steady state)
    decode_mean_ms: Optional[float]  # mean step of the timed call (with any re-compile / re-record in it)
    decode_tok_s: Optional[float]
    warmup_s: Optional[float]
    peak_mem_gb: Optional[float]
    floor_step_ms: float
    ratio_to_floor: Optional[float]
    tokens_match_hf: Optional[float]  # fraction of greedy tokens equal to HF grouped_mm's (batch 1 row)
    note: str = ""


def build_model(layers: int):
    """Built directly on the GPU in bf16; transformers' own init (normal, std 0.02) fills every weight."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(num_hidden_layers=layers, **QWEN3_30B)
    torch.manual_seed(0)  # the same weights each time it is built (the --formats rows rebuild it)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def set_experts_implementation(model, impl: str) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = impl


def expert_bytes(config) -> int:
    """bf16 bytes of one expert (gate, up and down projections)."""
    return 3 * config.hidden_size * config.moe_intermediate_size * 2


def non_expert_bytes(model) -> int:
    """bf16 weight bytes a decode step reads besides the experts (the embedding table aside: only `batch` rows of it
    are read). Counted on the unoptimized model: packed experts are buffers, not parameters."""
    c = model.config
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - c.num_hidden_layers * c.num_experts * expert_bytes(c) - c.vocab_size * c.hidden_size * 2


def step_floor_ms(config, non_expert: int, batch: int, context: int, bandwidth: float) -> float:
    """Bytes one decode step must read in bf16: non-expert weights, the activated experts (expected distinct experts
    under uniform routing), the KV cache; over the measured copy bandwidth."""
    c = config
    active = c.num_experts * (1 - (1 - c.num_experts_per_tok / c.num_experts) ** batch)
    kv = batch * context * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 2
    nbytes = non_expert + c.num_hidden_layers * active * expert_bytes(c) + kv
    return 1e3 * nbytes / bandwidth


def run(args) -> list[E2ERow]:
    meta = utils.run_meta()
    bandwidth = utils.copy_bandwidth()
    print(f"{meta['card']}: copy {bandwidth / 1e12:.2f} TB/s", flush=True)
    model = build_model(args.layers)
    args.non_expert_bytes = non_expert_bytes(model)  # before anything is optimized (every row's floor uses it)
    batches = [int(b) for b in args.batches.split(",")]
    rows, reference_tokens = [], {}
    impls = [("hf_eager", "eager", {}), ("hf_grouped_mm", "grouped_mm", {}),
             ("hf_static_cache", "grouped_mm", {"cache_implementation": "static"})]
    wanted = args.impls.split(",")
    for name, experts_impl, kwargs in [i for i in impls if i[0] in wanted]:
        set_experts_implementation(model, experts_impl)
        for b in batches:
            steps = min(args.steps, EAGER_MAX_STEPS) if experts_impl == "eager" else args.steps
            rows.append(_row(meta, model, b, args, name, steps, bandwidth, reference_tokens, kwargs))
            write_rows(rows, args.stem)  # partial results survive a time limit
    set_experts_implementation(model, "grouped_mm")
    if "moe_compile" in wanted:
        bf16_rows(model, args, meta, batches, bandwidth, reference_tokens, rows)
    for fmt in [f for f in args.formats.split(",") if f]:
        if getattr(model, "moe_compile", None) is not None:  # optimized by an earlier row: start from a fresh one
            free_model(model)
            model = None  # the last reference: collected (with its cycles) before the next model is built
            gc.collect()
            torch.cuda.empty_cache()
            model = build_model(args.layers)
        rows += packed_rows(model, fmt, args, meta, batches, bandwidth, reference_tokens)
        write_rows(rows, args.stem)
    return rows


def free_model(model) -> None:
    """Drop what an optimized model keeps besides its weights (kept static caches, compiled graphs and their CUDA
    graph pools); the caller then drops its reference and collects, so the next format's model fits."""
    from moe_compile.emit.generate import decode_caches, disable_cuda_graph_decode

    if decode_caches(model) is not None:
        disable_cuda_graph_decode(model)  # drops the kept caches and the compiled calls
    torch._dynamo.reset()


def bf16_rows(model, args, meta, batches, bandwidth, reference_tokens, rows: list[E2ERow]) -> None:
    """moe_compile in bf16, appended to `rows` (written after each batch: partial results survive a time limit)."""
    start = time.perf_counter()
    mc.optimize(model, args.profile, **args.overrides)
    optimize_s = time.perf_counter() - start
    print(f"optimize() {optimize_s:.1f} s", flush=True)
    decode_settings(model, args)
    for b in batches:
        row = _row(meta, model, b, args, f"moe_compile_{args.profile}", args.steps, bandwidth, reference_tokens, {})
        enabled = sorted(k for k, v in model.moe_compile.features.items() if v)
        row.note = f"optimize() {optimize_s:.1f}s; features {enabled}{args.run_note}"
        rows.append(row)
        write_rows(rows, args.stem)
    if args.trace:
        trace_decode(model, args, batches[0])


def decode_settings(model, args) -> None:
    """--dynamic-decode: one decode graph with a dynamic batch past the first bucket (emit/generate.py);
    --decode-option: extra moe_compile backend / Inductor options for the compiled decode step."""
    if args.dynamic_decode:
        from moe_compile.emit.generate import set_dynamic_decode

        set_dynamic_decode(model)
    if args.decode_option:
        config = model.generation_config.compile_config
        config.options = {**(config.options or {}), **args.decode_options}


def parse_options(pairs: list[str]) -> dict:
    """["combo_kernels=True", "max_autotune=False"] -> {"combo_kernels": True, ...} (values as Python literals)."""
    import ast

    options = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return options


FORMAT_OVERRIDES = {"fp8": dict(fp8=True), "fp8-experts": dict(fp8=True, fp8_attention=False),
                    "sparse24": dict(sparsity_24=True), "fp8+sparse24": dict(fp8=True, sparsity_24=True)}


def packed_rows(model, fmt: str, args, meta, batches, bandwidth, reference_tokens) -> list[E2ERow]:
    """moe_compile with packed expert weights in `fmt`; the floor stays the bf16 bytes floor (compare rows)."""
    if fmt not in FORMAT_OVERRIDES:
        raise SystemExit(f"unknown format {fmt!r}; known: {', '.join(FORMAT_OVERRIDES)}")
    start = time.perf_counter()
    mc.optimize(model, args.profile, **FORMAT_OVERRIDES[fmt], **args.overrides)
    decode_settings(model, args)
    optimize_s = time.perf_counter() - start
    print(f"optimize({fmt}) {optimize_s:.1f} s, {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated", flush=True)
    rows = []
    for b in batches:
        row = _row(meta, model, b, args, f"moe_compile_{args.profile}_{fmt}", args.steps, bandwidth,
                   reference_tokens, {})
        enabled = sorted(k for k, v in model.moe_compile.features.items() if v)
        row.note = (f"optimize() {optimize_s:.1f}s; features {enabled}; floor counts bf16 expert bytes"
                    f"{args.run_note}")
        rows.append(row)
    return rows


def trace_decode(model, args, batch: int) -> None:
    """Where a steady-state decode step's time goes: the kernel table (profiler scheduled by the step clock: 4 steps
    skipped, 1 warm-up, 4 recorded), the host-side table, and per step: the wall step inside generate, GPU kernel
    time, and the host time of the compiled step (Dynamo's guards, the CUDA-graph launch) beside generate's own."""
    from torch.profiler import ProfilerActivity, profile, schedule

    ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt), device="cuda")
    timed_generate(model, ids, 12)
    active = 4
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 schedule=schedule(wait=4, warmup=1, active=active, repeat=1)) as prof:
        clock = StepClock(ids.device, on_step=prof.step)
        timed_generate(model, ids, 12, clock=clock)
    events = prof.key_averages()
    kernels_only = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA  # not host ranges, nor
                    and not e.key.startswith("## ")]  # Inductor's "## Call CompiledFxGraph" span over the kernels
    gpu_ms = sum(e.self_device_time_total for e in kernels_only) / 1e3 / active

    def host_ms(prefix: str) -> float:
        return sum(e.cpu_time_total for e in events if e.key.startswith(prefix)) / 1e3 / active

    gaps = sorted(clock.gaps_ms())
    head = (f"generate(prompt {args.prompt}), batch {batch}, {args.layers} layers: {active} steady-state decode steps "
            f"profiled (after 5)\nper step: wall in generate {gaps[len(gaps) // 2]:.2f} ms (median, profiled steps "
            f"included), GPU kernel time {gpu_ms:.2f} ms; host, profiled: compiled step "
            f"{host_ms('Torch-Compiled Region'):.2f} ms (Dynamo cache lookup {host_ms('TorchDynamo Cache Lookup'):.2f}"
            f", cudaGraphLaunch {host_ms('cudaGraphLaunch'):.2f}), waiting for the GPU "
            f"{host_ms('cudaDeviceSynchronize'):.2f}, whole step {host_ms('ProfilerStep'):.2f}\n")
    kernels = events.table(sort_by="self_cuda_time_total", row_limit=40)
    host = events.table(sort_by="cpu_time_total", row_limit=30)
    with open(args.stem + f"_trace_batch{batch}.txt", "w") as f:
        f.write(head + "\nby GPU time\n" + kernels + "\nby host time\n" + host + "\n")
    print(head + kernels[:4000] + "\n" + host[:4000])


def _row(meta, model, batch, args, name, steps, bandwidth, reference_tokens, kwargs) -> E2ERow:
    ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(batch))
    floor = step_floor_ms(model.config, args.non_expert_bytes, batch, args.prompt + steps, bandwidth)
    try:
        print(f"{name:28s} batch {batch:3d}: warm-up call, then the timed one...", flush=True)
        m = measure_generate(model, ids, steps, **kwargs)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        return E2ERow(**meta, layers=args.layers, batch=batch, prompt=args.prompt, impl=name, prefill_ms=None,
                      decode_step_ms=None, decode_mean_ms=None, decode_tok_s=None, warmup_s=None, peak_mem_gb=None,
                      floor_step_ms=floor,
                      ratio_to_floor=None, tokens_match_hf=None, note=f"OOM: {str(exc).splitlines()[0]}")
    match = None
    tokens = m.pop("tokens")[0, args.prompt:]
    if name == "hf_grouped_mm":
        reference_tokens[batch] = tokens
    elif batch in reference_tokens:
        n = min(len(tokens), len(reference_tokens[batch]))
        match = (tokens[:n] == reference_tokens[batch][:n]).float().mean().item()
    print(f"{name:28s} batch {batch:3d}: step {m['decode_step_ms']:8.2f} ms (floor {floor:.2f}), "
          f"prefill {m['prefill_ms']:8.1f} ms, warm-up {m['warmup_s']:.1f} s", flush=True)
    return E2ERow(**meta, layers=args.layers, batch=batch, prompt=args.prompt, impl=name, floor_step_ms=floor,
                  ratio_to_floor=m["decode_step_ms"] / floor, tokens_match_hf=match, **m)


def plot(rows: list[E2ERow], path: str) -> None:
    plt = utils.pyplot()
    if plt is None:
        return
    batches = sorted({r.batch for r in rows})
    impls = list(dict.fromkeys(r.impl for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        sub = {r.impl: r for r in rows if r.batch == b}  # an impl may be missing at a batch (a partial run)
        values = [(sub[i].decode_step_ms if i in sub else None) or 0.0 for i in impls]
        ax.bar(range(len(impls)), values)
        ax.axhline(next(iter(sub.values())).floor_step_ms, color="k", linestyle="--", label="bytes floor")
        ax.set_xticks(range(len(impls)), [i.replace("_", "\n") for i in impls], fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"batch {b}: decode step (ms)")
        ax.legend()
    r0 = rows[0]
    fig.suptitle(f"Qwen3-30B-A3B shape, {r0.layers} layers, bf16 — {r0.card}, {r0.date}, {r0.git_commit}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_rows(rows: list[E2ERow], stem: str) -> None:
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def read_rows(path: str) -> list[E2ERow]:
    """Rows of a CSV written by `write_rows`."""
    return utils.read_csv(path, E2ERow)


def merge(paths: list[str], stem: str) -> None:
    """One CSV and plot from the CSVs of several runs (e.g. one batch per run, each under a time limit)."""
    rows = [r for path in paths for r in read_rows(path)]
    write_rows(rows, stem)
    plot(rows, stem + ".png")
    print(f"merged {len(rows)} rows into {stem}.csv and .png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--profile", default="balanced")
    parser.add_argument("--impls", default="hf_eager,hf_grouped_mm,hf_static_cache,moe_compile")
    parser.add_argument("--trace", action="store_true", help="profile a few decode steps of ours at the first batch")
    parser.add_argument("--formats", default="", help="packed expert formats to add after moe_compile (comma list: "
                        "fp8, sparse24, fp8+sparse24; each rebuilds the model)")
    parser.add_argument("--prefill", choices=("compiled", "eager"), default="compiled",
                        help="ours: eager keeps generate's prefill uncompiled (compile=False: a shorter warm-up; the "
                        "decode steps are the same CUDA-graph replays)")
    parser.add_argument("--dynamic-decode", action="store_true", help="ours: compile the decode step with a dynamic "
                        "batch (automatic dynamic shapes: two compiles for all buckets; set_dynamic_decode)")
    parser.add_argument("--decode-option", action="append", default=[], metavar="KEY=VALUE",
                        help="ours: an option of the compiled decode step (a moe_compile backend option or an Inductor "
                        "config name, e.g. combo_kernels=True); repeatable")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--merge", nargs="+", metavar="CSV", help="no run: merge these result CSVs into --stem's CSV "
                        "and plot (runs split by batch to fit a time limit)")
    parser.add_argument("--stem", help="with --merge: output path without extension")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.stem or os.path.join(args.out, "e2e_merged"))
        return
    args.overrides = {"compile": False} if args.prefill == "eager" else {}
    args.run_note = "; prefill eager (compile=False)" if args.prefill == "eager" else ""
    if args.dynamic_decode:
        args.run_note += "; decode compiled with a dynamic batch (--dynamic-decode)"
    args.decode_options = parse_options(args.decode_option)
    if args.decode_options:
        args.run_note += f"; decode options {args.decode_options}"
    if deferred_stop.enabled():
        args.run_note += f"; deferred stop checks ({deferred_stop.ENABLE_ENV}=1)"
    os.makedirs(args.out, exist_ok=True)
    meta = utils.run_meta()
    args.stem = os.path.join(args.out, f"e2e_{meta['card'].replace(' ', '_')}_{meta['date']}")
    rows = run(args)
    write_rows(rows, args.stem)
    plot(rows, args.stem + ".png")
    print(f"\nwrote {args.stem}.csv and .png")


if __name__ == "__main__":
    main()
