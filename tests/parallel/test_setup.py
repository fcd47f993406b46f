"""Expert-parallel setup in this process: starting torch.distributed from a broken torchrun environment fails fast
and says what to check; outside a distributed job `expert_parallel=N` warns and runs on one rank."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import moe_compile as mc
from moe_compile.models import build_tiny_model
from moe_compile.parallel import DistributedInitError, ExpertParallelConfig, init_distributed
from tests.parallel.workers import free_port

TORCHRUN = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "MOE_COMPILE_DIST_TIMEOUT")


@pytest.fixture
def torchrun_env(monkeypatch):
    for name in TORCHRUN:
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    yield set_env
    if dist.is_initialized():
        dist.destroy_process_group()


def test_bad_master_port_is_a_clear_error(torchrun_env):
    torchrun_env(RANK=0, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT="not-a-port")
    with pytest.raises(DistributedInitError, match="MASTER_PORT=not-a-port"):
        init_distributed(torch.device("cpu"))


def test_missing_master_times_out_instead_of_hanging(torchrun_env):
    # rank 1 of 2, and nobody listens on the port: the store connection gives up after the timeout
    torchrun_env(RANK=1, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), MOE_COMPILE_DIST_TIMEOUT=3)
    start = time.monotonic()
    with pytest.raises(DistributedInitError, match="every rank started"):
        init_distributed(torch.device("cpu"))
    assert time.monotonic() - start < 30


def test_outside_torchrun_warns_and_runs_on_one_rank(torchrun_env):
    model = build_tiny_model("tiny-mixtral")
    with pytest.warns(UserWarning, match="torchrun"):
        mc.optimize(model, profile="conservative", expert_parallel=2, verify=False)
    ep = model.moe_compile.expert_parallel
    assert ep["requested"] == 2 and ep["size"] == 1
    assert len(model.moe_compile.fused) == 2
    assert "expert parallel" in str(model.moe_compile)


def test_more_ranks_than_the_world_adjusts_down(torchrun_env):
    torchrun_env(RANK=0, WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    model = build_tiny_model("tiny-mixtral")
    with pytest.warns(UserWarning, match="more ranks than this job has"):
        mc.optimize(model, profile="conservative", expert_parallel=4, verify=False)
    assert model.moe_compile.expert_parallel["size"] == 1


def test_config_validation():
    assert ExpertParallelConfig.coerce(2).size == 2
    with pytest.raises(ValueError, match="placement must be one of"):
        ExpertParallelConfig(size=2, placement="random")
    with pytest.raises(ValueError, match="overlap"):
        ExpertParallelConfig(size=2, overlap="sometimes")
    with pytest.raises(TypeError, match="number of ranks"):
        ExpertParallelConfig.coerce(True)
