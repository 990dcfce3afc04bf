"""Megatron's tensor-parallel linear layers, with the overlapped ops inside.

Semantics follow Megatron-LM (``ColumnParallelLinear`` / ``RowParallelLinear``, with
and without sequence parallelism) so the layers pair the usual way: an attention or
MLP block is a column-parallel layer followed by a row-parallel one, and activations
between them stay sharded over the feature dim with no communication.

Shapes (R ranks, weights in ``torch.nn.Linear`` layout ``[out, in]``; ``S`` is the
sequence dim, ``sequence_dim`` of the input, default 1 for commflow's
``[batch, seq, ...]`` layout; Megatron's ``[seq, batch, hidden]`` is ``sequence_dim=0``):

=========================  =====================  ==========================  ======================
layer                      input                  output                      forward / backward comm
=========================  =====================  ==========================  ======================
Column                     ``[.., S, .., in]``    ``[.., S, .., out/R]``      none / all-reduce of dx
Column, sequence_parallel  ``[.., S/R, .., in]``  ``[.., S, .., out/R]``      all-gather / reduce-scatter
Row                        ``[.., S, .., in/R]``  ``[.., S, .., out]``        all-reduce / none
Row, sequence_parallel     ``[.., S, .., in/R]``  ``[.., S/R, .., out]``      reduce-scatter / all-gather
=========================  =====================  ==========================  ======================

Every communication above is fused with the GEMM next to it through
:func:`all_gather_matmul`, :func:`matmul_reduce_scatter` or :func:`matmul_all_reduce`
(``overlap="auto"`` by default: the plan decides per shape; ``"overlap"`` always
chunks; ``"sequential"`` never does). Performance note: with ``sequence_dim`` not the
outermost dim and a batch > 1, each call transposes its input and output once; use
``sequence_dim=0`` layouts (or batch 1) where it matters.

Bias: the column layer's bias is sharded like its output; the row layer's bias is
replicated and added after the reduction. With sequence parallelism each rank adds
it to its own rows only, so its gradient is all-reduced in backward (Megatron defers
that to the optimizer step; here the layer is self-contained).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from commflow.dist import all_gather_tensor

from . import ops
from .functional import all_gather_matmul, matmul_all_reduce, matmul_reduce_scatter, resolve_plan
from .validate import MODES, REDUCTIONS, GroupInfo, check_group, check_matmul_operands, check_mode

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]


def _gather_last_dim(t: torch.Tensor, g: GroupInfo) -> torch.Tensor:
    moved = t.movedim(-1, 0).contiguous()
    full = torch.empty(moved.shape[0] * g.world_size, *moved.shape[1:], dtype=t.dtype, device=t.device)
    all_gather_tensor(full, moved, group=g.group)
    return full.movedim(0, -1).contiguous()


def _local_last_dim(t: torch.Tensor, g: GroupInfo) -> torch.Tensor:
    return t.chunk(g.world_size, dim=-1)[g.rank].contiguous()


class _GatherLastDim(torch.autograd.Function):
    """Forward: all-gather feature blocks; backward: keep this rank's block."""

    @staticmethod
    def forward(ctx, t, g: GroupInfo):
        ctx.g = g
        return _gather_last_dim(t, g)

    @staticmethod
    def backward(ctx, dy):
        return _local_last_dim(dy, ctx.g), None


class _ScatterLastDim(torch.autograd.Function):
    """Forward: keep this rank's feature block; backward: all-gather the blocks' grads."""

    @staticmethod
    def forward(ctx, t, g: GroupInfo):
        ctx.g = g
        return _local_last_dim(t, g)

    @staticmethod
    def backward(ctx, dy):
        return _gather_last_dim(dy.contiguous(), ctx.g), None


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ranks."""

    @staticmethod
    def forward(ctx, t, g: GroupInfo):
        ctx.g = g
        return t.view_as(t)

    @staticmethod
    def backward(ctx, dy):
        dy = dy.contiguous()
        dist.all_reduce(dy, group=ctx.g.group)
        return dy, None


class _ReplicatedInputMatmul(torch.autograd.Function):
    """``x @ w`` with a replicated ``x``: no forward communication; the input gradient
    sums every rank's column block, as one overlapped GEMM + all-reduce."""

    @staticmethod
    def forward(ctx, x, w, g: GroupInfo, mode: str, reduction: str):
        ctx.save_for_backward(x, w)
        ctx.g, ctx.mode, ctx.reduction = g, mode, reduction
        return torch.matmul(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = dw = None
        dy = dy.contiguous()
        if ctx.needs_input_grad[0]:
            rows = dy.numel() // dy.shape[-1]
            wt = w.t()
            p = resolve_plan("matmul_all_reduce", rows, w.shape[0], w.shape[1], ctx.g, dy, ctx.mode, None,
                             ctx.reduction, run=lambda q: ops.matmul_all_reduce_forward(dy, wt, ctx.g, q))
            dx = ops.matmul_all_reduce_forward(dy, w.t(), ctx.g, p)
        if ctx.needs_input_grad[1]:
            dw = torch.mm(x.reshape(-1, x.shape[-1]).t(), dy.reshape(-1, dy.shape[-1]))
        return dx, dw, None, None, None


def _check_layer_options(overlap: str, reduction: str, n_chunks, sequence_dim: int) -> None:
    if overlap not in MODES:
        raise ValueError(f"overlap: got {overlap!r}; the rule is one of {MODES}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: got {reduction!r}; the rule is one of {REDUCTIONS}")
    if n_chunks is not None and (not isinstance(n_chunks, int) or n_chunks < 1):
        raise ValueError(f"n_chunks: got {n_chunks!r}; the rule is None or an int >= 1")
    if not isinstance(sequence_dim, int) or sequence_dim < 0:
        raise ValueError(f"sequence_dim: got {sequence_dim!r}; the rule is a non-negative leading dim index")


def _world(group) -> tuple[int, int]:
    if not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized; call commflow.dist.init_distributed() first")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the group it was given")
    return rank, dist.get_world_size(group)


def _init_linear_(weight: nn.Parameter, bias: nn.Parameter | None, fan_in: int) -> None:
    # nn.Linear's init with the *global* fan-in, so a sharded layer starts with the
    # scale of the layer it shards.
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        if bias is not None:
            bias.uniform_(-bound, bound)


class ColumnParallelLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W [out, in]`` split over ranks by output features.

    Args:
        in_features, out_features: of the whole (unsharded) layer; ``out_features``
            must be divisible by the group size.
        bias: add a bias (sharded like the output).
        group: tensor-parallel group (default: the default group).
        sequence_parallel: the input is sharded along ``sequence_dim`` and
            all-gathered (overlapped with the GEMM); else the input is replicated.
        sequence_dim: the sequence dim of the input (a leading dim).
        gather_output: all-gather the output features (only without sequence parallelism).
        overlap: ``"auto"`` | ``"overlap"`` | ``"sequential"``.
        n_chunks: force the forward's chunk count (else the plan picks).
        reduction: ``"fp32"`` | ``"backend"``, for the backward's reductions.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, group=None,
                 sequence_parallel: bool = False, sequence_dim: int = 1, gather_output: bool = False,
                 overlap: str = "auto", n_chunks: int | None = None, reduction: str = "fp32",
                 device=None, dtype=None):
        super().__init__()
        rank, world = _world(group)
        _check_layer_options(overlap, reduction, n_chunks, sequence_dim)
        if out_features % world:
            raise ValueError(f"out_features: {out_features} is not divisible by the group size {world}; "
                             "the rule is out_features % world_size == 0")
        if gather_output and sequence_parallel:
            raise ValueError("gather_output: True with sequence_parallel=True; the rule is gather_output only "
                             "without sequence parallelism (the output of a sequence-parallel column layer is "
                             "feature-sharded for the row layer that follows)")
        self.in_features, self.out_features = in_features, out_features
        self.group, self.rank, self.world_size = group, rank, world
        self.sequence_parallel, self.sequence_dim, self.gather_output = sequence_parallel, sequence_dim, gather_output
        self.overlap, self.n_chunks, self.reduction = overlap, n_chunks, reduction
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features // world, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features // world, **kw)) if bias else None
        _init_linear_(self.weight, self.bias, in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> ColumnParallelLinear:
        """This rank's shard of an existing ``nn.Linear`` (same on every rank)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(linear.weight.chunk(layer.world_size, 0)[layer.rank])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.chunk(layer.world_size, 0)[layer.rank])
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t()  # [in, out/R]
        if self.sequence_parallel:
            y = all_gather_matmul(x, w, group=self.group, gather_dim=self.sequence_dim, mode=self.overlap,
                                  n_chunks=self.n_chunks, reduction=self.reduction)
        else:
            check_matmul_operands("x", x, w)
            check_mode(self.overlap, self.reduction, self.n_chunks)
            g = check_group(self.group, x.device)
            y = _ReplicatedInputMatmul.apply(x, w, g, self.overlap, self.reduction)
        if self.bias is not None:
            y = y + self.bias
        if self.gather_output:
            y = _GatherLastDim.apply(y, check_group(self.group, x.device))
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (local {self.weight.shape[0]}), "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}, "
                f"gather_output={self.gather_output}, overlap={self.overlap!r}")


class RowParallelLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W [out, in]`` split over ranks by input features.

    Args:
        in_features, out_features: of the whole layer; ``in_features`` must be
            divisible by the group size.
        bias: add a (replicated) bias after the reduction.
        group: tensor-parallel group (default: the default group).
        input_is_parallel: the input is already feature-sharded ``[..., in/R]`` (the
            output of a column-parallel layer); else it is replicated and split here.
        sequence_parallel: reduce-scatter the output along ``sequence_dim``
            (overlapped with the GEMM) instead of all-reducing it.
        sequence_dim: the sequence dim of the input (a leading dim).
        overlap, n_chunks, reduction: as for :class:`ColumnParallelLinear`.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, group=None,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, sequence_dim: int = 1,
                 overlap: str = "auto", n_chunks: int | None = None, reduction: str = "fp32",
                 device=None, dtype=None):
        super().__init__()
        rank, world = _world(group)
        _check_layer_options(overlap, reduction, n_chunks, sequence_dim)
        if in_features % world:
            raise ValueError(f"in_features: {in_features} is not divisible by the group size {world}; "
                             "the rule is in_features % world_size == 0")
        if sequence_parallel and not input_is_parallel:
            raise ValueError("input_is_parallel: False with sequence_parallel=True; the rule is a "
                             "feature-sharded input for a sequence-parallel row layer")
        self.in_features, self.out_features = in_features, out_features
        self.group, self.rank, self.world_size = group, rank, world
        self.input_is_parallel, self.sequence_parallel, self.sequence_dim = (input_is_parallel, sequence_parallel,
                                                                             sequence_dim)
        self.overlap, self.n_chunks, self.reduction = overlap, n_chunks, reduction
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features // world, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        _init_linear_(self.weight, self.bias, in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> RowParallelLinear:
        """This rank's shard of an existing ``nn.Linear`` (same on every rank)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(linear.weight.chunk(layer.world_size, 1)[layer.rank])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"x: last dim {x.shape[-1]} != in_features {self.in_features}; the rule for "
                                 "input_is_parallel=False is the full (replicated) input")
            x = _ScatterLastDim.apply(x, check_group(self.group, x.device))
        w = self.weight.t()  # [in/R, out]
        if self.sequence_parallel:
            y = matmul_reduce_scatter(x, w, group=self.group, scatter_dim=self.sequence_dim, mode=self.overlap,
                                      n_chunks=self.n_chunks, reduction=self.reduction)
            if self.bias is not None:
                y = y + _AllReduceGrad.apply(self.bias, check_group(self.group, x.device))
            return y
        y = matmul_all_reduce(x, w, group=self.group, mode=self.overlap, n_chunks=self.n_chunks,
                              reduction=self.reduction)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.weight.shape[1]}), out_features={self.out_features}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}, overlap={self.overlap!r}")
