"""Decode attention (one query token per sequence, a static KV cache) on one card, in one run, CUDA-graph replays:

  hf_sdpa       transformers' `sdpa` path: keys and values repeated to every query head, SDPA with the 4-D mask
  sdpa_folded   SDPA on the folded shapes (the G query heads of a kv head as G query rows; no copy)
  ours          `torch.ops.moe_compile.gqa_decode_attention`: split-KV Triton kernel, masked slots not read

Cases: batch x cache slots x visible keys (a static cache of `slots` with the first `visible` written). Floor =
bytes of the visible keys and values (+ query and output) / copy bandwidth measured in the same run.

  PYTHONPATH=$PWD python3 benchmarks/bench_decode_attention.py [--batches 1,8,64] [--slots 1024,4096]
      [--visible 530] [--out DIR]

Writes DIR/decode_attention_<card>_<date>.csv and a plot. Dimension legend: B = batch, Hkv = kv heads,
G = query heads per kv head, L = cache slots, D = head dim (Qwen3-30B-A3B: Hkv 4, G 8, D 128).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils  # noqa: E402

from moe_compile.kernels.attention_op import reference_decode_attention  # noqa: E402

KV_HEADS, GROUPS, HEAD_DIM = 4, 8, 128


@dataclass
class Row:
    card: str
    date: str
    git_commit: str
    batch: int
    slots: int
    visible: int
    impl: str
    us: Optional[float]
    floor_us: float
    ratio_to_floor: Optional[float]
    err_vs_fp32: Optional[float]
    note: str = ""


def candidates(query, key, value, mask, scale):
    """impl -> callable returning [B, Hkv, G, D]."""
    batch = query.shape[0]
    heads_query = query.reshape(batch, KV_HEADS * GROUPS, 1, HEAD_DIM)
    mask4 = mask[:, None, None, :]

    def hf_sdpa():  # transformers' repeat_kv + SDPA
        k, v = (t.repeat_interleave(GROUPS, dim=1) for t in (key, value))
        out = torch.nn.functional.scaled_dot_product_attention(heads_query, k, v, attn_mask=mask4, scale=scale)
        return out.reshape(batch, KV_HEADS, GROUPS, HEAD_DIM)

    def sdpa_folded():
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask4, scale=scale)

    def ours():
        return torch.ops.moe_compile.gqa_decode_attention(query, key, value, mask, scale)

    return {"hf_sdpa": hf_sdpa, "sdpa_folded": sdpa_folded, "ours": ours}


def bench_case(batch, slots, visible, meta, bandwidth) -> list[Row]:
    draw = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    query, key, value = draw(batch, KV_HEADS, GROUPS, HEAD_DIM), draw(batch, KV_HEADS, slots, HEAD_DIM), \
        draw(batch, KV_HEADS, slots, HEAD_DIM)
    mask = torch.zeros(batch, slots, dtype=torch.bool, device="cuda")
    mask[:, :visible] = True
    scale = HEAD_DIM ** -0.5
    ref = reference_decode_attention(query.float(), key.float(), value.float(), mask, scale)
    nbytes = 2 * batch * KV_HEADS * visible * HEAD_DIM * 2 + 2 * query.numel() * 2
    floor = 1e6 * nbytes / bandwidth
    rows = []
    for impl, fn in candidates(query, key, value, mask, scale).items():
        try:
            graph, out = utils.capture_graph(fn)
            us, err, note = utils.bench_us(graph.replay, rep_ms=50), rel_err(out, ref), ""
        except Exception as exc:  # noqa: BLE001  (a case that cannot run is reported, not fatal)
            us, err, note = None, None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        rows.append(Row(**meta, batch=batch, slots=slots, visible=visible, impl=impl, us=us, floor_us=floor,
                        ratio_to_floor=None if us is None else us / floor, err_vs_fp32=err, note=note))
        print(f"B={batch:3d} slots={slots:5d} visible={visible:5d} {impl:12s} "
              + (f"{us:7.1f} us  x{us / floor:5.2f} floor  err {err:.1e}" if us else note), flush=True)
    return rows


def rel_err(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def plot(rows: list[Row], path: str) -> None:
    plt = utils.pyplot()
    if plt is None:
        return
    cases = sorted({(r.slots, r.batch) for r in rows})
    labels = [f"B{b}\nL{s}" for s, b in cases]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
    impls = list(dict.fromkeys(r.impl for r in rows))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        ratios = [next((r.ratio_to_floor for r in rows if (r.slots, r.batch, r.impl) == (s, b, impl)), None) or 0
                  for s, b in cases]
        ax.bar([c + i * width for c in range(len(cases))], ratios, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))], labels)
    ax.set_ylabel("time / bytes floor (lower is better)")
    ax.set_yscale("log")
    r0 = rows[0]
    ax.set_title(f"decode attention, {rows[0].visible} visible keys: {r0.card}, {r0.date}, {r0.git_commit}",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--slots", default="1024,4096")
    parser.add_argument("--visible", type=int, default=530)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    meta = utils.run_meta()
    bandwidth = utils.copy_bandwidth()
    print(f"{meta['card']}: copy {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    for slots in (int(s) for s in args.slots.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            rows += bench_case(batch, slots, min(args.visible, slots), meta, bandwidth)
    utils.save_results(rows, args.out, "decode_attention", meta, plot)


if __name__ == "__main__":
    main()
