"""Train the quality model: `python -m moe_compile.quality.train [--steps N] [--out DIR]`.

A byte-level Qwen3-MoE LM (see `model.CONFIG`) trained on the Python standard library's sources, through our fused
op: the model is optimized with the `conservative` profile first, so every MoE layer runs
`torch.ops.moe_compile.fused_moe` forward and backward. Deterministic (fixed seed, fixed file list, fixed batch
order); ~5 minutes on a 2-core CPU. Writes `model.safetensors` (fp16), `config.json` (model config, training
settings, measured held-out perplexity) and `heldout_files.txt` to `data/`.

The CI never runs this: it loads the shipped files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from moe_compile.quality import corpus
from moe_compile.quality.model import CONFIG, CONFIG_FILE, WEIGHTS_FILE, build_model

DATA_DIR = Path(__file__).parent / "data"


def batches(data: torch.Tensor, steps: int, batch_size: int, seq_len: int, seed: int):
    """Random windows [B, seq_len + 1] from the training bytes, reproducible from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
        yield torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()])


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)

    import moe_compile as mc
    from moe_compile.fused_block import FusedMoEBlock
    from moe_compile.quality.eval import perplexity

    torch.manual_seed(args.seed)
    files = corpus.stdlib_files()
    train_files, heldout_files = corpus.split_files(files)
    train = torch.frombuffer(bytearray(corpus.read_files(train_files)), dtype=torch.uint8).long()
    heldout = corpus.read_files(heldout_files)
    print(f"stdlib {corpus.stdlib_root()}: {len(train_files)} train files ({train.numel() / 1e6:.2f} MB), "
          f"{len(heldout_files)} held-out files ({len(heldout) / 1e6:.2f} MB)", flush=True)

    model = build_model(CONFIG, seed=args.seed)
    hf_params = dict(model.named_parameters())  # HF names; the fused blocks share these parameter objects
    mc.optimize(model, "conservative")
    fused = [m for m in model.modules() if isinstance(m, FusedMoEBlock)]
    live = {id(p) for p in model.parameters()}
    assert all(id(p) in live for p in hf_params.values()), "fused blocks must share the HF parameters"
    print(f"fused {len(fused)} MoE blocks; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters",
          flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    model.train()
    start = time.time()
    for step, batch in enumerate(batches(train, args.steps, args.batch_size, args.seq_len, args.seed)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=20)
        out = model(input_ids=batch[:, :-1], labels=None)
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - start:.0f}s)", flush=True)
    train_s = time.time() - start

    ppl = perplexity(model, text=heldout[:16385])
    print(f"held-out perplexity (fp32, 16 KiB): {ppl:.3f}  ({math.log2(ppl):.3f} bits/byte)", flush=True)
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    state = {name: p.detach().to(torch.float16).contiguous() for name, p in hf_params.items()
             if name != "lm_head.weight"}  # tied to model.embed_tokens.weight
    save_file(state, str(args.out / WEIGHTS_FILE), metadata={"format": "pt"})
    meta = {"model": CONFIG, "dtype": "float16", "python": sys.version.split()[0],
            "training": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                         "lr": args.lr, "seed": args.seed, "seconds": round(train_s, 1),
                         "train_files": len(train_files), "train_bytes": int(train.numel())},
            "heldout_perplexity_fp32_16k": round(ppl, 4)}
    (args.out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (args.out / "heldout_files.txt").write_text("\n".join(heldout_files) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
