"""Checks and small helpers shared by the sp strategies (Ulysses, ring, all-gather, LASP-2).

Every check here is local: it runs on every rank before the first collective, so
bad input fails the same way everywhere instead of leaving peers waiting in a
collective. The one cross-rank check, :func:`check_shards_agree`, is opt-in
(``COMMFLOW_SP_CHECK_SHARDS=1``) because it costs a collective and a host sync.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.distributed as dist

from .layout import LAYOUTS

__all__ = [
    "GroupInfo",
    "autocast_off",
    "check_head_chunks",
    "check_inputs",
    "check_shards_agree",
    "default_scale",
    "group_info",
    "wait_all",
    "zigzag_to_global",
    "global_to_zigzag",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def autocast_off(fn):
    """Run ``fn`` with autocast off on the device of its first tensor argument.

    sp's kernels and autograd functions choose their dtypes themselves (fp32 state chains
    and accumulations); a caller's bf16 autocast region (the trainer's) would recast their
    einsums, which once ran LASP-2's state chain in bf16 on all ranks but the first.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return run


class GroupInfo:
    """Rank, size and ring neighbours (as global ranks, which P2POp wants) of a group."""

    def __init__(self, group):
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.world = dist.get_world_size(group)
        else:
            self.rank, self.world = 0, 1

    def global_rank(self, group_rank: int) -> int:
        if self.group is None or self.world == 1:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    @property
    def next_rank(self) -> int:
        return self.global_rank((self.rank + 1) % self.world)

    @property
    def prev_rank(self) -> int:
        return self.global_rank((self.rank - 1) % self.world)


def group_info(group) -> GroupInfo:
    return GroupInfo(group)


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def check_inputs(fn: str, q, k, v, *, causal, scale, layout: str, world: int) -> None:
    """Validate local shards ``q [B, S/W, Hq, D]``, ``k, v [B, S/W, Hkv, D]`` and options.

    Raises a ValueError that names the function, the argument, its value and the rule.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{fn}: {name} must be 4-D [batch, seq, heads, head_dim], got shape {tuple(t.shape)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{fn}: {name}.dtype must be one of {_FLOAT_DTYPES}, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{fn}: q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{fn}: q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}"
        )
    if k.shape != v.shape:
        raise ValueError(f"{fn}: k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"{fn}: q and k must have the same batch and local sequence length (self-attention over the "
            f"same shards), got q.shape[:2]={tuple(q.shape[:2])}, k.shape[:2]={tuple(k.shape[:2])}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{fn}: q and k must have the same head_dim, got q {q.shape[3]}, k {k.shape[3]}")
    if q.shape[1] == 0 or q.shape[0] == 0:
        raise ValueError(f"{fn}: q.shape={tuple(q.shape)} is empty; batch and sequence must be >= 1")
    hq, hkv = q.shape[2], k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"{fn}: query heads ({hq}) must be a multiple of key/value heads ({hkv}) (GQA/MQA groups)"
        )
    if not isinstance(causal, bool):
        raise ValueError(f"{fn}: causal must be a bool, got {causal!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{fn}: scale must be None or a positive finite number, got {scale!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(
            f"{fn}: layout 'zigzag' needs the global sequence divisible by 2 x group size ({2 * world}); "
            f"this rank's shard has q.shape[1]={q.shape[1]} tokens, which must be even (two chunks per rank)"
        )


def check_head_chunks(fn: str, head_chunks, heads: int, heads_name: str) -> None:
    """``head_chunks`` (the pipeline depth over heads) must be a positive int dividing ``heads``
    (``heads_name`` says which heads, in the message)."""
    if not isinstance(head_chunks, int) or head_chunks < 1 or heads % head_chunks:
        raise ValueError(
            f"{fn}: head_chunks must be a positive divisor of the {heads_name} ({heads}), got {head_chunks!r}"
        )


def check_shards_agree(fn: str, q, k, info: GroupInfo) -> None:
    """Opt-in (``COMMFLOW_SP_CHECK_SHARDS=1``): every rank holds shards of one shape.

    A sequence split unevenly (global length not divisible by the group size) shows
    up as ranks with different ``q.shape``; collectives on such shards hang or
    corrupt memory. This check gathers the shapes (one small collective and a host
    sync, hence opt-in) and raises the same ValueError on every rank.
    """
    if info.world == 1 or os.environ.get("COMMFLOW_SP_CHECK_SHARDS", "0") in ("", "0"):
        return
    mine = torch.tensor([*q.shape, *k.shape], dtype=torch.int64, device=q.device)
    everyone = [torch.empty_like(mine) for _ in range(info.world)]
    dist.all_gather(everyone, mine, group=info.group)
    shapes = [tuple(t.tolist()) for t in everyone]
    if len(set(shapes)) > 1:
        per_rank = ", ".join(f"rank {r}: q{s[:4]} k{s[4:]}" for r, s in enumerate(shapes))
        raise ValueError(
            f"{fn}: ranks hold shards of different shapes ({per_rank}); the global sequence must be "
            f"divisible by the group size ({info.world}) and split evenly, e.g. with commflow.sp.shard"
        )


def wait_all(works) -> None:
    """Wait for every work handle of ``works`` (async collectives or point-to-point ops)."""
    for work in works:
        work.wait()


def zigzag_to_global(x: torch.Tensor, world: int, dim: int = 1) -> torch.Tensor:
    """Reorder rank-ordered zigzag shards (as all-to-all/all-gather deliver them) to token order.

    ``x`` holds along ``dim`` the concatenation over ranks ``r`` of
    ``[chunk r, chunk 2W-1-r]``; returns the chunks ``0 .. 2W-1`` in order (a copy).
    """
    halves = x.unflatten(dim, (world, 2, -1))
    first = halves.select(dim + 1, 0)  # chunks 0..W-1
    second = halves.select(dim + 1, 1).flip(dim)  # chunks W..2W-1
    return torch.cat([first.flatten(dim, dim + 1), second.flatten(dim, dim + 1)], dim=dim)


def global_to_zigzag(x: torch.Tensor, world: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`zigzag_to_global`: token order -> rank-ordered zigzag shards (a copy)."""
    chunks = x.unflatten(dim, (2 * world, -1))
    first = chunks.narrow(dim, 0, world)
    second = chunks.narrow(dim, world, world).flip(dim)
    return torch.stack([first, second], dim=dim + 1).flatten(dim, dim + 2)
