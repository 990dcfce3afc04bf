"""Argument checks shared by the overlapped ops, run on every rank before any collective.

A rank that raises while its peers already wait inside a collective is a hang, so
every rule that can be checked locally is checked here, first. Each error names the
argument, the value it got and the rule it broke. What cannot be checked locally
(that every rank passed the same shapes) is the caller's contract, as for any
``torch.distributed`` collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["GroupInfo", "check_group", "check_matmul_operands", "check_mode", "normalize_leading_dim"]

MODES = ("auto", "overlap", "sequential")
REDUCTIONS = ("fp32", "backend")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class GroupInfo:
    """The process group an op runs on, resolved once."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int


_GROUPS: dict[tuple[int, str], tuple[dist.ProcessGroup, GroupInfo]] = {}


def check_group(group: dist.ProcessGroup | None, device: torch.device) -> GroupInfo:
    """Resolve ``group`` (None = default group) and check it can move tensors on ``device``.

    Cached per group object and device type (the ops call this on every call; the
    cache holds the group itself, so an id is never reused for another group).
    """
    if dist.is_initialized():
        resolved = group if group is not None else dist.group.WORLD
        hit = _GROUPS.get((id(resolved), device.type))
        if hit is not None and hit[0] is resolved:
            return hit[1]
    info = _check_group(group, device)
    _GROUPS[(id(group if group is not None else dist.group.WORLD), device.type)] = (
        group if group is not None else dist.group.WORLD, info)
    return info


def _check_group(group: dist.ProcessGroup | None, device: torch.device) -> GroupInfo:
    if not dist.is_initialized():
        raise ValueError(
            "group: torch.distributed is not initialized; call commflow.dist.init_distributed() first "
            "(a world of one needs it too)"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group it was given")
    world_size = dist.get_world_size(group)
    backend = str(dist.get_backend(group)).lower()
    if device.type == "cuda" and "nccl" not in backend:
        raise ValueError(
            f"group: backend {backend!r} cannot serve CUDA tensors here; the rule is a group with NCCL "
            "(e.g. 'nccl' or 'cpu:gloo,cuda:nccl') for tensors on {device}"
        )
    if device.type == "cpu" and "gloo" not in backend:
        raise ValueError(f"group: backend {backend!r} cannot serve CPU tensors; the rule is a gloo group for CPU tensors")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"x: device {device} is not supported; the rule is a CPU (gloo) or CUDA (NCCL) tensor")
    return GroupInfo(group=group, rank=rank, world_size=world_size)


def check_mode(mode: str, reduction: str, n_chunks: int | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}; the rule is one of {MODES}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: got {reduction!r}; the rule is one of {REDUCTIONS}")
    if n_chunks is not None and (not isinstance(n_chunks, int) or isinstance(n_chunks, bool) or n_chunks < 1):
        raise ValueError(f"n_chunks: got {n_chunks!r}; the rule is None (the plan picks) or an int >= 1")


def check_matmul_operands(x_name: str, x: torch.Tensor, w: torch.Tensor) -> None:
    """``x [..., K]`` and ``w [K, N]``: same dtype and device, floating point, K matching."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{x_name}: got {type(x).__name__}; the rule is a torch.Tensor")
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"w: got {type(w).__name__}; the rule is a torch.Tensor")
    if x.dim() < 2:
        raise ValueError(f"{x_name}: got shape {tuple(x.shape)}; the rule is at least 2 dims [..., K]")
    if w.dim() != 2:
        raise ValueError(f"w: got shape {tuple(w.shape)}; the rule is a matrix [K, N]")
    if x.dtype != w.dtype:
        raise ValueError(f"w: dtype {w.dtype} differs from {x_name}.dtype {x.dtype}; the rule is one dtype for both")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{x_name}: dtype {x.dtype} is not supported; the rule is one of {FLOAT_DTYPES}")
    if x.device != w.device:
        raise ValueError(f"w: device {w.device} differs from {x_name}.device {x.device}; the rule is one device")
    if x.numel() == 0 or w.numel() == 0:
        raise ValueError(
            f"{x_name}/w: got shapes {tuple(x.shape)} and {tuple(w.shape)}; the rule is non-empty tensors"
        )
    if x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"w: shape {tuple(w.shape)} does not fit {x_name} {tuple(x.shape)}; the rule is "
            f"{x_name}.shape[-1] == w.shape[0] (the local reduction dim K)"
        )


def normalize_leading_dim(name: str, dim: int, x_name: str, x: torch.Tensor) -> int:
    """A scatter/gather dim must be one of x's leading dims (not the K dim); return it >= 0.

    Negative values count from the end of ``x.dim()`` as in torch, so ``-2`` is the
    last leading dim and ``-1`` (the K dim) is refused.
    """
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"{name}: got {dim!r}; the rule is an int")
    nd = x.dim()
    if not -nd <= dim < nd - 1 or dim == -1:
        raise ValueError(
            f"{name}: got {dim} for {x_name} of shape {tuple(x.shape)}; the rule is a leading dim "
            f"in [{-nd}, {nd - 2}] (the last dim is the reduction dim K and cannot be split)"
        )
    return dim % nd
