"""How a sequence is split across the ranks of a sequence-parallel group.

Two layouts, for a global sequence of length ``S`` over ``W`` ranks:

``contiguous``
    rank ``r`` holds tokens ``[r*S/W, (r+1)*S/W)``. What state passing (LASP-2)
    needs: rank ``r``'s incoming state is the sum over ranks before it.

``zigzag``
    the sequence is cut into ``2W`` chunks of ``S/(2W)``; rank ``r`` holds chunk
    ``r`` followed by chunk ``2W-1-r``. Under a causal mask every rank then owns the
    same amount of attention work (ring-flash-attention's zigzag, Megatron/TE's
    DualChunkSwap, torch CP's head-tail balancer).

Every function here takes the *global* length or tensor where the name says so,
and a *local* shard otherwise; the sharded dimension is ``dim`` (1 for the
``[batch, seq, heads, head_dim]`` layout used across commflow.sp).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

__all__ = ["Layout", "LAYOUTS", "check_layout", "check_seq_divisible", "positions", "shard", "unshard"]

Layout = Literal["contiguous", "zigzag"]
LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def check_seq_divisible(seq_len: int, world_size: int, layout: str, *, name: str = "sequence length") -> None:
    """Raise a ValueError naming the rule if ``seq_len`` cannot be split evenly."""
    check_layout(layout)
    parts = world_size * (2 if layout == "zigzag" else 1)
    if seq_len % parts:
        rule = "2 x group size" if layout == "zigzag" else "group size"
        raise ValueError(
            f"{name} {seq_len} is not divisible by {rule} ({parts}) for layout {layout!r}; "
            f"pad the sequence to a multiple of {parts}"
        )


def _world(group) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def positions(
    global_len: int, rank: int, world_size: int, layout: Layout = "contiguous", device=None
) -> torch.Tensor:
    """Global token positions held by ``rank``, shape ``[global_len // world_size]``."""
    check_seq_divisible(global_len, world_size, layout)
    if layout == "contiguous":
        n = global_len // world_size
        return torch.arange(rank * n, (rank + 1) * n, device=device)
    c = global_len // (2 * world_size)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second_start = (2 * world_size - 1 - rank) * c
    return torch.cat([first, torch.arange(second_start, second_start + c, device=device)])


def shard(x: torch.Tensor, *, group=None, dim: int = 1, layout: Layout = "contiguous") -> torch.Tensor:
    """This rank's shard of a full tensor that every rank holds.

    Args:
        x: the global tensor, e.g. ``[B, S, H, D]``; ``S = x.shape[dim]``.
    Returns:
        ``[B, S/W, H, D]`` (contiguous memory), the tokens :func:`positions` lists.
    """
    rank, world = _world(group)
    seq = x.shape[dim]
    check_seq_divisible(seq, world, layout, name=f"x.shape[{dim}]")
    if layout == "contiguous":
        return x.chunk(world, dim=dim)[rank].contiguous()
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim).contiguous()


def _reorder_to_global(gathered: list[torch.Tensor], dim: int, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return torch.cat(gathered, dim=dim)
    world = len(gathered)
    halves = [g.chunk(2, dim=dim) for g in gathered]
    order = [halves[r][0] for r in range(world)] + [halves[r][1] for r in reversed(range(world))]
    return torch.cat(order, dim=dim)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, dim: int, layout: str) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.layout = group, dim, layout
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(gathered, x.contiguous(), group=group)
        return _reorder_to_global(gathered, dim, layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The gathered tensor is replicated, so every rank's loss may depend on every
        # shard: a shard's gradient is the sum over ranks of its slice. Zigzag slices
        # are not contiguous, so sum everything and keep our own slice.
        summed = grad.contiguous()
        dist.all_reduce(summed, group=ctx.group)
        return shard(summed, group=ctx.group, dim=ctx.dim, layout=ctx.layout), None, None, None


def unshard(x: torch.Tensor, *, group=None, dim: int = 1, layout: Layout = "contiguous") -> torch.Tensor:
    """Gather the shards of all ranks back into the global tensor (differentiable).

    Args:
        x: this rank's shard ``[B, S/W, H, D]`` in ``layout``.
    Returns:
        ``[B, S, H, D]`` in global token order, on every rank. The backward sums the
        gradient over ranks and returns each rank its own slice.
    """
    check_layout(layout)
    rank, world = _world(group)
    if world == 1:
        return x
    if layout == "zigzag" and x.shape[dim] % 2:
        raise ValueError(f"x.shape[{dim}]={x.shape[dim]} must be even for layout 'zigzag' (two chunks per rank)")
    return _Unshard.apply(x, group, dim, layout)
