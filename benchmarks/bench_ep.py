"""Expert-parallel benchmarks (issue 7): MoE layers and a Mixtral-shaped model sharded over 2 or 4 GPUs.

  torchrun --nproc-per-node 2 benchmarks/bench_ep.py [--tokens 1,8,64,512,2048,8192] [--e2e-layers 8] [--out DIR]
  torchrun --nproc-per-node 2 benchmarks/bench_ep.py --smoke --out /tmp/ep   # CPU, gloo, tiny shapes: a check

Rows (one CSV per run, appended columns card/date/commit):
  layer  Qwen3-30B-A3B, DeepSeek-V3 and Mixtral-8x7B MoE layers (router + experts, no shared expert), per-rank
         batch T: one GPU running the whole layer (fused op, `auto` backend — the EP block's local experts run the
         same Triton grouped GEMM, so that is the like-for-like row — and `reference`) where it fits, and
         the expert-parallel block with contiguous / balanced / balanced+replica placement, overlap off and on.
         Routing is skewed on purpose (router bias falling linearly over expert ids, so contiguous placement puts
         the hot experts on rank 0); `imbalance` is the max/mean rank load that placement gives on the timed tokens.
  e2e    a Mixtral-8x7B-shaped model (H 4096, I 14336, 8 experts, top-2; `--e2e-layers` of its 32 layers, 8 by
         default so one GPU holds the baseline) in bf16, `optimize(profile="conservative")` with and without
         `expert_parallel=N`: prefill tokens/s and per-step decode latency through `generate` (every rank decodes
         the same number of steps: EP ranks run in lockstep). Where the bf16 model does not fit one GPU (32
         layers: 93 GB) there is no one-GPU row, and the EP model is built layer by layer, each layer sharded as
         soon as it exists (layerwise.py), so no rank ever holds more than one layer's full experts.
Times: median over iterations of the slowest rank (all-reduce MAX), synchronised before and after each call.
Group throughput = N * T / time; `tokens_per_s` is per GPU so one GPU and N GPUs compare directly.

Dimension legend: T = tokens per rank, E = experts, K = top_k, H = hidden, I = expert intermediate, N = ranks.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from moe_compile.detect.candidate import CanonicalWeights
from moe_compile.fused_block import FusedMoEBlock
from moe_compile.parallel import ExpertParallelMoEBlock, Placement, balanced_placement
from moe_compile.parallel.calibrate import block_expert_counts
from moe_compile.parallel.distributed import EPGroup, make_ep_group
from moe_compile.spec import MoESpec


@dataclass(frozen=True)
class LayerShape:
    name: str
    hidden: int  # H
    inter: int  # I
    experts: int  # E
    top_k: int  # K
    routing: dict = field(default_factory=dict)  # MoESpec routing fields

    def spec(self) -> MoESpec:
        return MoESpec(self.experts, self.top_k, self.hidden, self.inter, router_bias=True, **self.routing)

    def layer_bytes(self, dtype_bytes: int) -> int:
        return self.experts * 3 * self.hidden * self.inter * dtype_bytes


QWEN3 = dict(scoring="softmax", renormalize=True)
DSV3 = dict(scoring="sigmoid", renormalize=True, correction_bias=True, routed_scaling=2.5)
# Same numbers as benchmarks/model_configs.py SHAPES (kept here so this script does not follow the kernel benches)
SHAPES = [LayerShape("qwen3-30b-a3b", 2048, 768, 128, 8, QWEN3),
          LayerShape("deepseek-v3", 7168, 2048, 256, 8, {**DSV3, "n_group": 8, "topk_group": 4}),
          LayerShape("mixtral-8x7b", 4096, 14336, 8, 2, QWEN3)]
SMOKE_SHAPES = [LayerShape("qwen3-tiny", 64, 32, 8, 2, QWEN3),
                LayerShape("deepseek-tiny", 64, 32, 16, 4, {**DSV3, "n_group": 4, "topk_group": 2}),
                LayerShape("mixtral-tiny", 64, 128, 4, 2, QWEN3)]
MIXTRAL = dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
SKEW = 4.0  # router bias range: expert 0 gets +SKEW over the last one (softmax: ~e^4 = 55x the odds)


@dataclass
class Row:
    experiment: str
    shape: str
    ranks: int
    tokens_per_rank: int
    variant: str  # single/<backend> or ep/<placement>/overlap-<on|off>
    us: float  # median latency of one call, slowest rank
    tokens_per_s: float  # per GPU
    imbalance: float = float("nan")  # max/mean rank load (ep rows)
    card: str = ""
    date: str = ""
    commit: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_us(fn: Callable[[], object], device: torch.device, iters: int, warmup: int, group=None) -> float:
    """Median wall time of `fn` in microseconds, the slowest rank's (a collective over `group`)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        _sync(device)
        dist.barrier(group=group)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(1e6 * (time.perf_counter() - start))
    slowest = torch.tensor([statistics.median(samples)], device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return float(slowest)


def make_fused(shape: LayerShape, device: torch.device, dtype: torch.dtype, backend: str) -> FusedMoEBlock:
    """Random layer, identical on every rank (same seed), router biased towards low expert ids."""
    gen = torch.Generator(device=device).manual_seed(0)
    E, H, I = shape.experts, shape.hidden, shape.inter

    def rand(*size, std):
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

    router = rand(E, H, std=H**-0.5)  # [E, H]
    bias = torch.linspace(SKEW, 0.0, E, device=device).to(dtype)  # [E] skew: expert 0 hottest
    correction = torch.zeros(E, device=device) if shape.routing.get("correction_bias") else None
    weights = CanonicalWeights(rand(E, 2 * I, H, std=H**-0.5), rand(E, H, I, std=I**-0.5))  # [E, 2I, H], [E, H, I]
    return FusedMoEBlock(shape.spec(), router, bias, correction, weights, backend=backend)


def _placements(fused: FusedMoEBlock, x: torch.Tensor, ep: EPGroup) -> dict[str, tuple[Placement, list[float]]]:
    load = block_expert_counts(fused, x).to(x.device)  # [E] on this rank's tokens
    dist.all_reduce(load, group=ep.group)
    load = [float(v) for v in load.cpu()]
    E, N = fused.spec.num_experts, ep.size
    return {"contiguous": (Placement.contiguous(E, N), load),
            "balanced": (balanced_placement(load, N), load),
            "balanced+replicas": (balanced_placement(load, N, math.ceil(E / N) + 1, replicate=True), load)}


def _fits(nbytes: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info()
    return nbytes < 0.8 * free


def bench_layers(args, ep: EPGroup, device: torch.device, dtype: torch.dtype, meta: dict) -> list[Row]:
    rows = []
    for shape in (SMOKE_SHAPES if args.smoke else SHAPES):
        rows += _bench_shape(shape, args, ep, device, dtype, meta)  # its weights are freed on return
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def _bench_shape(shape: LayerShape, args, ep: EPGroup, device: torch.device, dtype: torch.dtype,
                 meta: dict) -> list[Row]:
    rows = []
    fused = make_fused(shape, device, dtype, "auto")
    for tokens in args.tokens:
        gen = torch.Generator(device=device).manual_seed(1 + ep.rank)  # each rank its own tokens
        x = torch.randn(tokens, shape.hidden, generator=gen, device=device, dtype=torch.float32).to(dtype)  # [T, H]
        for backend in ("auto", "reference"):
            fused.backend = backend
            us = time_us(lambda: fused(x), device, args.iters, args.warmup, ep.group)
            rows.append(Row("layer", shape.name, 1, tokens, f"single/{backend}", us, 1e6 * tokens / us, **meta))
        for name, (placement, load) in _placements(fused, x, ep).items():
            ratio = max(placement.rank_loads(load)) / (sum(load) / ep.size)
            for overlap in (False, True):
                block = ExpertParallelMoEBlock(fused, placement, ep, overlap=overlap)
                us = time_us(lambda: block(x), device, args.iters, args.warmup, ep.group)
                rows.append(Row("layer", shape.name, ep.size, tokens, f"ep/{name}/overlap-{'on' if overlap else 'off'}",
                                us, 1e6 * tokens / us, ratio, **meta))
                _log(ep, rows[-1])
    return rows


@torch.no_grad()
def trace_block(args, ep: EPGroup, device: torch.device, dtype: torch.dtype, meta: dict) -> None:
    """Where an EP block's time goes: torch profiler over a few calls (every rank runs them, rank 0 records)."""
    shape = (SMOKE_SHAPES if args.smoke else SHAPES)[0]
    fused = make_fused(shape, device, dtype, "auto")
    for tokens in (int(t) for t in args.trace.split(",")):
        x = torch.randn(tokens, shape.hidden, generator=torch.Generator(device=device).manual_seed(1 + ep.rank),
                        device=device, dtype=torch.float32).to(dtype)  # [T, H]
        placement, _ = _placements(fused, x, ep)["balanced"]
        block = ExpertParallelMoEBlock(fused, placement, ep, overlap=False)
        for _ in range(3):
            block(x)
        _sync(device)
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                block(x)
            _sync(device)
        if ep.rank == 0:
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, f"ep_trace_{shape.name}_T{tokens}_{ep.size}ranks{args.tag}.txt")
            sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            with open(path, "w") as f:
                f.write(f"# {shape.name}, {tokens} tokens per rank, {ep.size} ranks, balanced placement, overlap "
                        f"off, 5 calls; {meta['card']} {meta['date']} {meta['commit']}\n")
                f.write(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60))
            print("wrote", path, flush=True)
        dist.barrier(group=ep.group)


def _build_mixtral(args, device: torch.device, dtype: torch.dtype):
    if args.smoke:
        from moe_compile.models import build_tiny_model

        return build_tiny_model("tiny-mixtral", dtype=dtype).to(device)
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(**MIXTRAL, num_hidden_layers=args.e2e_layers)
    torch.manual_seed(0)  # same weights on every rank
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def bench_e2e(args, ep: EPGroup, device: torch.device, dtype: torch.dtype, meta: dict) -> list[Row]:
    rows = []
    vocab = 128 if args.smoke else MIXTRAL["vocab_size"]
    gen = torch.Generator().manual_seed(5 + ep.rank)
    prompt = torch.randint(0, vocab, (args.batch, args.prompt), generator=gen).to(device)  # [B, P]
    name = "mixtral-tiny" if args.smoke else f"mixtral-8x7b-{args.e2e_layers}l"
    # one GPU: every rank runs the whole model on its own prompt (no collectives in the model), where it fits
    one_gpu_fits = args.smoke or _fits(2 * 46_700_000_000 * args.e2e_layers // 32, device)
    fits = torch.tensor([float(one_gpu_fits)], device=device)
    dist.all_reduce(fits, op=dist.ReduceOp.MIN, group=ep.group)  # every rank takes the same branch
    for ranks in ((1, ep.size) if float(fits) > 0 else (ep.size,)):
        rows += _bench_model(ranks, name, prompt, args, ep, device, dtype, meta)  # the model is freed on return
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _build_sharded_mixtral(args, device: torch.device, dtype: torch.dtype, ranks: int):
    """All layers, sharded as they are built (layerwise.py): a model that does not fit one GPU fits N."""
    import moe_compile as mc
    from layerwise import build_layerwise
    from transformers import MixtralConfig

    def shard(index: int, layer: torch.nn.Module) -> None:
        mc.optimize(layer, profile="conservative", verify=False, expert_parallel=ranks)

    return build_layerwise(MixtralConfig(**MIXTRAL, num_hidden_layers=args.e2e_layers), device, dtype, shard)


@torch.no_grad()
def _bench_model(ranks: int, name: str, prompt: torch.Tensor, args, ep: EPGroup, device: torch.device,
                 dtype: torch.dtype, meta: dict) -> list[Row]:
    import moe_compile as mc

    if ranks > 1 and not args.smoke and not _fits(2 * 46_700_000_000 * args.e2e_layers // 32, device):
        model = _build_sharded_mixtral(args, device, dtype, ranks)
    else:
        model = _build_mixtral(args, device, dtype)
        mc.optimize(model, profile="conservative", verify=False, **({"expert_parallel": ranks} if ranks > 1 else {}))
    label = "single/conservative" if ranks == 1 else "ep/contiguous/overlap-auto"
    us = time_us(lambda: model(prompt), device, args.iters, args.warmup, ep.group)
    rows = [Row("e2e-prefill", name, ranks, prompt.numel(), label, us, 1e6 * prompt.numel() / us, **meta)]
    step_us = _decode_step_us(model, prompt, args, device, ep)
    rows.append(Row("e2e-decode", name, ranks, args.batch, label, step_us, 1e6 * args.batch / step_us, **meta))
    for row in rows:
        _log(ep, row)
    return rows


def _decode_step_us(model, prompt, args, device, ep: EPGroup) -> float:
    """Per decode step: (generate of S new tokens - generate of 1) / (S - 1), same lengths on every rank."""
    def generate(steps: int):
        return lambda: model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                      pad_token_id=0)

    long_us = time_us(generate(args.steps), device, max(1, args.iters // 4), 1, ep.group)
    short_us = time_us(generate(1), device, max(1, args.iters // 4), 1, ep.group)
    return (long_us - short_us) / (args.steps - 1)


def _log(ep: EPGroup, row: Row) -> None:
    if ep.rank == 0:
        print(f"{row.experiment:12s} {row.shape:18s} N={row.ranks} T={row.tokens_per_rank:5d} {row.variant:32s} "
              f"{row.us:10.1f} us  {row.tokens_per_s:12.1f} tok/s/GPU", flush=True)


def run_meta(device: torch.device) -> dict:
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    commit = os.environ.get("MOE_GIT_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=False).stdout.strip()
        except OSError:
            commit = ""
    return dict(card=card, date=datetime.date.today().isoformat(), commit=commit or "unknown")


def write_results(rows: list[Row], out_dir: str, tag: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"ep_{tag}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    _plot(rows, path[:-4] + ".png")
    return path


def _plot(rows: list[Row], path: str) -> Optional[str]:
    """Per layer shape: tokens/s per GPU against tokens per rank, one line per variant (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: CSV only (pip install matplotlib for the plot)")
        return None
    layer = [r for r in rows if r.experiment == "layer"]
    shapes = sorted({r.shape for r in layer})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for variant in sorted({r.variant for r in layer if r.shape == shape}):
            pts = sorted((r.tokens_per_rank, r.tokens_per_s) for r in layer
                         if r.shape == shape and r.variant == variant)
            ax.plot(*zip(*pts), marker="o", label=variant)
        ax.set(xscale="log", yscale="log", title=shape, xlabel="tokens per rank", ylabel="tokens/s per GPU")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU + gloo, tiny shapes, few iterations")
    parser.add_argument("--tokens", default=None, help="tokens per rank, comma separated")
    parser.add_argument("--e2e-layers", type=int, default=8, help="Mixtral layers (32 = the full model)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="decode steps timed")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-layers", action="store_true", help="the end-to-end rows only")
    parser.add_argument("--trace", default=None, metavar="T1,T2",
                        help="also profile the first shape's balanced EP block at these tokens per rank (torch "
                             "profiler, rank 0): the op table goes to ep_trace_*.txt beside the CSV")
    parser.add_argument("--tag", default="", help="suffix for the result file names (keeps earlier runs)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    defaults = dict(tokens="1,8,300", batch=1, prompt=8, steps=3, iters=3, warmup=1) if args.smoke else \
        dict(tokens="1,8,64,512,2048,8192", batch=8, prompt=512, steps=32, iters=20, warmup=5)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.tokens = [int(t) for t in str(args.tokens).split(",")]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun: torchrun --nproc-per-node 2 benchmarks/bench_ep.py [--smoke]")
    device = torch.device("cpu") if args.smoke else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if args.smoke:
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if args.smoke else "nccl")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    ep = make_ep_group(dist.get_world_size(), device)
    meta = run_meta(device)
    rows = [] if args.skip_layers else bench_layers(args, ep, device, dtype, meta)
    if args.trace:
        trace_block(args, ep, device, dtype, meta)
    if not args.skip_e2e:
        rows += bench_e2e(args, ep, device, dtype, meta)
    if ep.rank == 0:
        tag = f"{'smoke' if args.smoke else meta['card'].replace(' ', '_')}_{ep.size}ranks_{meta['date']}{args.tag}"
        print("wrote", write_results(rows, args.out, tag))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
