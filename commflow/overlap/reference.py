"""Plain single-process references: the global computation each overlapped op shards.

Tests build the global ``X`` and ``W`` on every rank from one seed, cut each rank's
shards with the helpers below, run the distributed op, and compare with the global
product cut the same way. Nothing here communicates.
"""

from __future__ import annotations

import torch

__all__ = [
    "all_gather_matmul_reference",
    "column_parallel_shards",
    "matmul_all_reduce_reference",
    "matmul_reduce_scatter_reference",
    "row_parallel_shards",
]


def _block(t: torch.Tensor, dim: int, world_size: int, rank: int) -> torch.Tensor:
    return t.chunk(world_size, dim=dim)[rank]


def row_parallel_shards(x_full: torch.Tensor, w_full: torch.Tensor, world_size: int, rank: int):
    """``X [..., K]``, ``W [K, N]`` -> rank's ``x [..., K/R]`` and ``w [K/R, N]`` (K sharded)."""
    return _block(x_full, -1, world_size, rank).contiguous(), _block(w_full, 0, world_size, rank).contiguous()


def column_parallel_shards(x_full: torch.Tensor, w_full: torch.Tensor, world_size: int, rank: int, gather_dim: int = 0):
    """``X [..., S, ..., K]``, ``W [K, N]`` -> rank's ``x_shard`` (block of ``gather_dim``) and ``w [K, N/R]``."""
    return (_block(x_full, gather_dim, world_size, rank).contiguous(),
            _block(w_full, 1, world_size, rank).contiguous())


def matmul_reduce_scatter_reference(x_full, w_full, world_size: int, rank: int, scatter_dim: int = 0) -> torch.Tensor:
    """Block ``rank`` of ``X @ W`` along ``scatter_dim``."""
    return _block(torch.matmul(x_full, w_full), scatter_dim, world_size, rank)


def matmul_all_reduce_reference(x_full, w_full) -> torch.Tensor:
    """``X @ W``."""
    return torch.matmul(x_full, w_full)


def all_gather_matmul_reference(x_full, w_full, world_size: int, rank: int) -> torch.Tensor:
    """``X @ W[:, block rank]``."""
    return torch.matmul(x_full, _block(w_full, 1, world_size, rank))
