"""Worker processes for the expert-parallel tests: real torch.distributed (gloo, CPU), one process per rank.

Each worker plays one torchrun rank (the torchrun environment variables, then `optimize` starts the group), runs
its cases and writes what it measured to `out_dir/rank{R}.json`; the tests assert on those files. Workers are
spawned with a deadline (`run_workers`), so a rank that dies or hangs fails the test with its error, never hangs it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEADLINE_S = 60.0  # one spawn of every case must finish well inside this, or the test fails instead of hanging
INIT_TIMEOUT_S = "20"  # MOE_COMPILE_DIST_TIMEOUT inside the workers: a missing rank fails init within this


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MOE_COMPILE_DIST_TIMEOUT=INIT_TIMEOUT_S)
    torch.set_num_threads(1)  # 2 cores, several processes: one thread each


def run_workers(fn, world: int, *args, deadline_s: float = DEADLINE_S) -> None:
    """Spawn `fn(rank, world, *args)` on `world` processes; raise on the first failure or when past the deadline."""
    context = mp.spawn(fn, args=(world, *args), nprocs=world, join=False)
    stop = time.monotonic() + deadline_s
    while not context.join(timeout=1.0):  # raises ProcessRaisedException / ProcessExitedException on a failure
        if time.monotonic() > stop:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"expert-parallel workers still running after {deadline_s:.0f} s")


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def _ep_config(mode: str, calibration: list, num_experts: int):
    from moe_compile.parallel import ExpertParallelConfig

    if mode == "contiguous":
        return ExpertParallelConfig(size=dist_world(), overlap=False)
    if mode == "overlap":
        return ExpertParallelConfig(size=dist_world(), overlap=True)
    # balanced: measured load, hottest experts replicated into one spare slot per rank, overlap on
    slots = -(-num_experts // dist_world()) + 1
    return ExpertParallelConfig(size=dist_world(), placement="balanced", calibration_inputs=calibration,
                                replicate=True, max_experts_per_rank=slots, overlap=True)


def dist_world() -> int:
    return int(os.environ["WORLD_SIZE"])


def equality_worker(rank: int, world: int, port: int, out_dir: str, cases: list) -> None:
    """For each (model name, mode): EP logits vs the single-process fused model and the original, on this rank's
    own tokens; and greedy generate tokens for the first case."""
    torchrun_env(rank, world, port)
    import moe_compile as mc
    from moe_compile.models import build_tiny_model
    from moe_compile.parallel import ExpertParallelMoEBlock, placement_report

    results = {}
    generator = torch.Generator().manual_seed(100 + rank)  # every rank its own tokens
    for name, mode in cases:
        original = build_tiny_model(name)
        single = mc.optimize(build_tiny_model(name), profile="conservative", verify=False)
        input_ids = torch.randint(0, 128, (2, 9 + rank), generator=generator)  # ranks differ in token count too
        calibration = [torch.randint(0, 128, (2, 16), generator=generator)]
        num_experts = single.moe_compile.specs[single.moe_compile.fused[0]].num_experts
        parallel = mc.optimize(build_tiny_model(name), profile="conservative",
                               expert_parallel=_ep_config(mode, calibration, num_experts))
        got = _logits(parallel, input_ids)
        blocks = [m for m in parallel.modules() if isinstance(m, ExpertParallelMoEBlock)]
        results[f"{name}/{mode}"] = {
            "vs_fused": (got - _logits(single, input_ids)).abs().max().item(),
            "vs_original": (got - _logits(original, input_ids)).abs().max().item(),
            "ep_blocks": len(blocks), "fused_blocks": len(single.moe_compile.fused),
            "overlapped": all(b.last_overlap for b in blocks),
            "local_experts": [b.w13.shape[0] for b in blocks],
            "size": parallel.moe_compile.expert_parallel["size"],
            "report": str(placement_report(parallel)),
        }
        if mode == "contiguous" and name == cases[0][0]:  # decode path: lockstep greedy generate, same lengths
            results[f"{name}/generate"] = _same_generation(single, parallel, rank)
        if mode == "balanced" and name == cases[0][0]:  # export is a collective: rank 0 writes the gathered model
            path = mc.export(parallel, Path(out_dir, f"export-{name}"))
            placement = {n: b.placement.to_dict() for n, b in parallel.named_modules()
                         if isinstance(b, ExpertParallelMoEBlock)}
            resharded = _reshard(path, dist_world())  # load, shard again with the saved placement
            same = {n: b.placement.to_dict() == placement[n] for n, b in resharded.named_modules()
                    if isinstance(b, ExpertParallelMoEBlock)}
            error = (_logits(resharded, input_ids) - got).abs().max().item()
            results[f"{name}/export"] = {"path": str(path), "placement": placement, "resharded_same": same,
                                         "resharded_vs_parallel": error}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _reshard(path, world: int):
    import moe_compile as mc
    from moe_compile.parallel import ExpertParallelConfig, saved_placement

    model = mc.load(path)
    return mc.optimize(model, profile="conservative",
                       expert_parallel=ExpertParallelConfig(world, placement=saved_placement(model)))


def _same_generation(single, parallel, rank: int) -> bool:
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(7 + rank))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        return torch.equal(single.generate(prompt, **kwargs), parallel.generate(prompt, **kwargs))


def failing_worker(rank: int, world: int, port: int) -> None:
    """Rank 1 raises before it joins the group; rank 0 starts `optimize(expert_parallel=2)` and waits for it."""
    torchrun_env(rank, world, port)
    if rank == 1:
        raise RuntimeError("worker 1 failed before init_process_group")
    import moe_compile as mc
    from moe_compile.models import build_tiny_model

    mc.optimize(build_tiny_model("tiny-mixtral"), profile="conservative", expert_parallel=world)


def packed_worker(rank: int, world: int, port: int) -> None:
    """FP8 experts cannot be sharded: optimize raises, and the model is left as it was (dense, unfused)."""
    torchrun_env(rank, world, port)
    import moe_compile as mc
    from moe_compile.fused_block import FusedMoEBlock
    from moe_compile.models import build_tiny_model

    model = build_tiny_model("tiny-qwen3-moe")
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    try:
        mc.optimize(model, profile="conservative", fp8=True, expert_parallel=world, verify=False)
    except ValueError as exc:
        assert "packed" in str(exc) and "without fp8" in str(exc), exc
    else:
        raise AssertionError("expert parallelism over FP8 packed experts did not raise")
    assert not any(isinstance(m, FusedMoEBlock) for m in model.modules())
    assert torch.equal(_logits(model, ids), before)
    dist.destroy_process_group()
