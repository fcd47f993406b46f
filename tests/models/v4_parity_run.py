"""Run in a subprocess with transformers 4.57.1 first on PYTHONPATH (see test_transformers4.py); not a test module.

For each tiny model named on the command line: build it under 4.5x (per-expert ModuleLists, routers returning
(indices, weights), flagless GPT-OSS, ParallelExperts, DBRX's chunked loop), then inspect, optimize and compare it
with its original exactly as the transformers 5 tests do. Prints one JSON object: name -> measurements.
"""

from __future__ import annotations

import copy
import json
import sys
import traceback

import torch
import transformers
from torch import nn

import moe_compile as mc
from moe_compile.models import build_tiny_model
from tests.conftest import relative_error
from tests.models.expectations import config_experts_topk, count_fused, generate, logits

IDS = torch.tensor([[5, 9, 77, 3, 101, 64, 12, 40, 2], [88, 1, 31, 120, 7, 56, 19, 99, 64]])  # [2, 9]


def _has_expert_modulelist(model: nn.Module, experts: int) -> bool:
    return any(isinstance(m, nn.ModuleList) and len(m) == experts for m in model.modules())


def measure(name: str) -> dict:
    original = build_tiny_model(name)
    experts, top_k = config_experts_topk(original.config)
    report = mc.inspect(original)
    optimized = mc.optimize(copy.deepcopy(original), "conservative")
    return dict(
        fused=len(optimized.moe_compile.fused), fused_modules=count_fused(optimized),
        skipped=optimized.moe_compile.skipped,
        reported=[[b.num_experts, b.top_k] for b in report.blocks], config=[experts, top_k],
        fp32_error=relative_error(logits(optimized, IDS), logits(original, IDS)),
        same_tokens=bool(torch.equal(generate(optimized, name), generate(original, name))),
        per_expert_modulelist=_has_expert_modulelist(original, experts),
    )


def main(names: list[str]) -> None:
    results: dict = {"transformers": transformers.__version__}
    for name in names:
        try:
            results[name] = measure(name)
        except Exception:  # reported per model, so one failure does not hide the others
            results[name] = {"error": traceback.format_exc()}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
