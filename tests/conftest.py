"""Shared fixtures: a per-session pool of gloo worlds, and the GPU marker."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import DistPool


@pytest.fixture(scope="session")
def dist_pool():
    """``dist_pool(world_size)`` -> a :class:`DistPool` kept for the whole session."""
    pools: dict[int, DistPool] = {}

    def get(world_size: int) -> DistPool:
        if world_size not in pools:
            pools[world_size] = DistPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
