"""commflow.dist: init from the environment, spawn, failure propagation."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from commflow.dist import RankFailure, init_distributed, spawn


def _allreduce_rank() -> tuple[int, int, float]:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def _self_init() -> tuple[int, str]:
    info = init_distributed()  # reads the torchrun-style environment spawn set
    t = torch.ones(1)
    dist.all_reduce(t)
    out = (info.rank, info.backend, t.item())
    dist.destroy_process_group()
    return out


def _fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank one is broken on purpose")
    dist.barrier()  # rank 0 would wait here forever without the launcher's kill


def _sleep_forever() -> None:
    time.sleep(3600)


def _hard_exit() -> None:
    if dist.get_rank() == 0:
        os._exit(7)
    dist.barrier()


def test_spawn_returns_results_in_rank_order():
    assert spawn(_allreduce_rank, 3) == [(0, 3, 6.0), (1, 3, 6.0), (2, 3, 6.0)]


def test_spawn_without_init_lets_worker_use_env():
    out = spawn(_self_init, 2, init=False)
    assert [r for r, _, _ in out] == [0, 1]
    assert all(b == "gloo" and s == 2.0 for _, b, s in out)


def test_failing_rank_fails_caller_with_its_traceback_without_hanging():
    start = time.monotonic()
    with pytest.raises(RankFailure) as err:
        spawn(_fail_on_rank_one, 2, timeout_s=60)
    assert time.monotonic() - start < 30
    assert "rank 1 failed" in str(err.value)
    assert "rank one is broken on purpose" in str(err.value)
    assert 1 in err.value.failures


def test_timeout_names_the_stuck_ranks():
    with pytest.raises(RankFailure, match="timed out") as err:
        spawn(_sleep_forever, 2, init=False, timeout_s=3)
    assert set(err.value.failures) == {0, 1}


def test_rank_that_dies_without_traceback_is_reported():
    with pytest.raises(RankFailure, match="exited with code 7"):
        spawn(_hard_exit, 2, timeout_s=60)


def test_world_of_one_in_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    if dist.is_initialized():
        dist.destroy_process_group()
    try:
        info = init_distributed(device="cpu")
        assert (info.rank, info.world_size, info.backend) == (0, 1, "gloo")
        assert init_distributed(device="cpu").world_size == 1  # idempotent
    finally:
        dist.destroy_process_group()


def test_cuda_device_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    with pytest.raises(ValueError, match="device='cuda'"):
        init_distributed(device="cuda")


def _pool_raise_on_rank_zero() -> int:
    if dist.get_rank() == 0:
        raise KeyError("boom")
    dist.barrier()
    return 1


def test_pool_recovers_after_a_stuck_failure(dist_pool):
    pool = dist_pool(2)
    with pytest.raises(RankFailure, match="boom"):
        pool.run(_pool_raise_on_rank_zero, timeout_s=30)
    # The stuck peer was killed and the pool rebuilt: the next task runs normally.
    assert [r[2] for r in pool.run(_allreduce_rank)] == [3.0, 3.0]
