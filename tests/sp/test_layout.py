"""commflow.sp.layout: shard/unshard round trips and the zigzag order."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from commflow.sp import positions, shard, unshard
from commflow.sp.layout import check_seq_divisible


def _roundtrip(layout: str) -> tuple[bool, list[int], bool]:
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.arange(2 * 8 * world * 3, dtype=torch.float64).reshape(2, 8 * world, 3, 1)
    local = shard(x, layout=layout)
    pos = positions(x.shape[1], rank, world, layout)
    same_tokens = torch.equal(local, x[:, pos])
    local.requires_grad_(True)
    full = unshard(local, layout=layout)
    # Every rank weights the global tensor by position: each shard's gradient is then
    # world * position, summed over ranks.
    w = torch.arange(full.shape[1], dtype=full.dtype).view(1, -1, 1, 1)
    (full * w).sum().backward()
    grad_ok = torch.equal(local.grad, (world * pos.to(full.dtype)).view(1, -1, 1, 1).expand_as(local))
    return torch.equal(full, x) and same_tokens, pos.tolist(), grad_ok


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_unshard_roundtrip(dist_pool, world, layout):
    out = dist_pool(world).run(_roundtrip, layout)
    assert all(ok and grad_ok for ok, _, grad_ok in out)
    covered = sorted(p for _, pos, _ in out for p in pos)
    assert covered == list(range(8 * world))


def test_zigzag_positions_pair_head_and_tail():
    # S=16 over 2 ranks: chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert positions(16, 0, 2, "zigzag").tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert positions(16, 1, 2, "zigzag").tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


def test_divisibility_errors_name_the_rule():
    with pytest.raises(ValueError, match=r"not divisible by group size \(4\)"):
        check_seq_divisible(10, 4, "contiguous")
    with pytest.raises(ValueError, match=r"2 x group size \(8\)"):
        check_seq_divisible(12, 4, "zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        positions(8, 0, 2, "striped")
