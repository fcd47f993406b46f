"""`moe-compile optimize|export ... --gpus N`: expert parallelism from the command line.

The command re-launches itself under torchrun (`python -m torch.distributed.run --standalone`), one process per
GPU; each process loads the model, and `optimize(model, expert_parallel=N)` shards the experts over the processes
(NCCL). Rank 0 prints the tables; `--output` is written once, by rank 0, with the placement in the manifest.
A request for more GPUs than the machine has is lowered with a warning. With `--device cpu` the N processes run on
the CPU with gloo (for trying the flow, and for tests): same code, no GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch

from moe_compile.errors import MoECompileError
from moe_compile.parallel.distributed import in_torchrun

WORKER_ENV = "MOE_COMPILE_CLI_WORKER"  # set in the processes this module launches


def gpus_to_use(requested: int, device: torch.device) -> int:
    """The number of processes for `--gpus requested` on `device`, lowered (with a warning) to what exists."""
    if requested < 1:
        raise MoECompileError(f"--gpus must be at least 1, got {requested}")
    if device.type != "cuda":
        if requested > 1:
            warnings.warn(f"--gpus {requested} on --device cpu: running {requested} CPU processes with gloo "
                          "(expert parallelism without a GPU, for trying the flow)", stacklevel=2)
        return requested
    present = torch.cuda.device_count()
    if requested > present:
        warnings.warn(f"--gpus {requested}, but this machine has {present} GPU(s): using {present}", stacklevel=2)
        return present
    return requested


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1" and in_torchrun()


def launch(argv: Sequence[str], processes: int) -> int:
    """Run `moe-compile argv` in `processes` torchrun workers; returns the job's exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "moe_compile.cli", *argv]
    env = {**os.environ, WORKER_ENV: "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    completed = subprocess.run(command, env=env, check=False)
    if completed.returncode != 0:
        raise MoECompileError(f"the expert-parallel job ({processes} processes) failed with exit code "
                              f"{completed.returncode}; the failing rank's error is printed above")
    return 0


def worker_device(device: torch.device) -> torch.device:
    """This worker's device: its own GPU (LOCAL_RANK) on CUDA."""
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def expert_parallel_config(processes: int, placement: str, model: Any, calibration_tokens: int,
                           seed: int) -> Optional[Any]:
    """The ExpertParallelConfig for the CLI's options; `balanced` measures expert load on random token ids
    (the same on every rank), `contiguous` needs no statistics."""
    from moe_compile.parallel import ExpertParallelConfig

    if placement == "contiguous":
        return ExpertParallelConfig(size=processes)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise MoECompileError("--placement balanced measures routing on token ids, which needs a model with a "
                              "config.vocab_size; use --placement contiguous for this model")
    generator = torch.Generator().manual_seed(seed + 1 + rank())  # every rank its own tokens, summed by optimize
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, calibration_tokens), generator=generator).to(device)  # [1, T]
    return ExpertParallelConfig(size=processes, placement="balanced", calibration_inputs=[ids])


def leave_group() -> None:
    """End this worker's process group (torch warns about a group left open at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
