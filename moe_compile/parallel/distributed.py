"""torch.distributed plumbing for expert parallelism: join (or start) the process group, pick the expert-parallel
group, and adjust a request for more ranks than there are.

Backends: NCCL where the model lives on CUDA, gloo on CPU. `init_distributed` starts the default group from the
torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) with a finite timeout, so a rank that never
starts (a bad MASTER_PORT, a worker that died before init) ends in a `DistributedInitError` that says what to
check, never in a hang.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("moe_compile")

TIMEOUT_ENV = "MOE_COMPILE_DIST_TIMEOUT"  # seconds; init and collectives fail after this instead of hanging
DEFAULT_TIMEOUT_S = 300.0  # long enough for a slow rank to load its model, short enough to notice a dead one
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedInitError(RuntimeError):
    """torch.distributed could not be started; the message names the environment it used and what to check."""


@dataclass
class EPGroup:
    """The expert-parallel group this rank belongs to: `size` ranks sharing one copy of the experts."""

    group: Optional[dist.ProcessGroup]  # None: the default (world) group
    size: int  # N
    rank: int  # this rank's index inside the group, 0..N-1
    backend: str


def default_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))


def in_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device, timeout: Optional[timedelta] = None) -> bool:
    """Join the default process group, starting it from the torchrun environment if needed.

    Returns False (nothing started) outside torchrun when no group exists; raises `DistributedInitError` when the
    environment is there but the group cannot be formed within `timeout`.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if not dist.is_available() or not in_torchrun():
        return False
    backend = backend_for(device)
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    env = ", ".join(f"{name}={os.environ[name]}" for name in TORCHRUN_ENV)
    try:
        dist.init_process_group(backend=backend, timeout=timeout or default_timeout())
    except Exception as exc:  # ValueError for a malformed port, DistStoreError / RuntimeError for timeouts
        raise DistributedInitError(
            f"could not start torch.distributed ({backend}) from the torchrun environment ({env}): "
            f"{type(exc).__name__}: {exc}. Check that every rank started, that MASTER_ADDR/MASTER_PORT are the "
            f"same on all ranks and reachable, and that the port is free (timeout: {TIMEOUT_ENV})") from exc
    return True


def _ranks_available(device: torch.device) -> tuple[int, str]:
    """How many expert-parallel ranks this job can give, and what limits it."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if device.type == "cuda" and backend_for(device) == "nccl":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nodes = max(1, world // max(1, local_world))
        gpus = torch.cuda.device_count() * nodes
        if gpus < world:
            return gpus, f"{torch.cuda.device_count()} GPU(s) per node"
    return world, f"world size {world}"


def adjust_world_size(requested: int, device: torch.device) -> tuple[int, Optional[str]]:
    """The expert-parallel size to use for a request of `requested` ranks, and a warning when it was lowered.

    N must divide the world size (the world splits into world/N identical expert-parallel groups)."""
    if requested < 1:
        raise ValueError(f"expert_parallel must be a positive number of ranks, got {requested}")
    available, limit = _ranks_available(device)
    size = min(requested, available)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    while world % size:
        size -= 1
    if size == requested:
        return size, None
    return size, (f"expert_parallel={requested} asks for more ranks than this job has ({limit}"
                  f"{'' if size == available else f', and N must divide the world size {world}'}): using {size}")


def make_ep_group(size: int, device: torch.device) -> EPGroup:
    """The group of `size` consecutive ranks holding this rank (a collective: every rank must call it)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    backend = dist.get_backend()
    if size == world:
        return EPGroup(None, size, rank, backend)
    group, _ = dist.new_subgroups(group_size=size)  # creates every subgroup on every rank, returns ours
    return EPGroup(group, size, rank % size, backend)

