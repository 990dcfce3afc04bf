"""The overlapped schedules and their plain fallbacks (forward only; autograd is in functional.py).

Sharding (torchtitan/Megatron naming; R ranks, this rank r; leading dims flattened to M rows):

* row-parallel GEMM: the global ``X [M, K] @ W [K, N]`` with K sharded, rank r holds
  ``x = X[:, rK/R:(r+1)K/R]`` ``[M, K/R]`` and ``w = W[rK/R:(r+1)K/R, :]`` ``[K/R, N]``,
  so ``X @ W = sum_r x_r @ w_r``.
  - :func:`matmul_reduce_scatter_forward` returns rank r's block of the sum along the
    scatter dim: ``y_shard_m [M/R, N]``.
  - :func:`matmul_all_reduce_forward` returns the whole sum ``[M, N]`` on every rank.
* column-parallel GEMM with a sequence-sharded input: ``x_shard_m [M/R, K]`` (block r of
  the rows), ``w = W[:, rN/R:(r+1)N/R]`` ``[K, N/R]``;
  :func:`all_gather_matmul_forward` returns ``all_gather(x_shard_m) @ w`` ``[M, N/R]``.

The overlapped schedules (chunk sizes come from the plan):

* GEMM + reduce-scatter: chunks are column blocks of ``w``. Chunk c's partial
  ``x @ w[:, cols_c]`` is ``[M, n_c]`` whose rows are already grouped by destination
  rank, so one all-to-all hands every rank the R partials of its own rows; those are
  summed in fp32 and rounded once, straight into the output's column block. Chunks
  are one GEMM each (full M, no strided copies of x) and leave in destination order.
* GEMM + all-reduce: chunks are row blocks (multiples of R rows). Chunk c's GEMM writes
  straight into its rows of the output; the all-to-all + fp32 sum reduces each rank's
  R-th of them, and an all-gather puts the reduced rows back in place.
* all-gather + GEMM: chunks are row blocks of the local shard; every chunk's all-gather
  is in flight from the start, the GEMM of the local shard (which needs nothing)
  runs meanwhile, then each landed chunk is multiplied peer by peer straight into its
  output rows (one GEMM per peer: no strided copy of the output).

On CUDA with ``reduction="fp32"`` the plan's transport is ``"symm"`` and the three
ops hand over to the copy-engine schedules of :mod:`commflow.overlap.symm` instead
(no NCCL kernel beside the GEMM); the NCCL schedules below serve ``reduction="backend"``
and CPU (gloo).

``reduction="backend"`` swaps the all-to-all + fp32 sum for the backend's own
reduce-scatter / all-reduce on each chunk: one collective instead of two for the
all-reduce, but NCCL sums bf16 in a ring and rounds at every hop.

Why NCCL collectives and not point-to-point sends in T3's per-destination order:
NCCL gives a single peer pair only a couple of channels (send/recv "are currently
optimized for alltoall", NVIDIA/nccl#1272; nccl-tests#268 saw 80-180 GB/s between two
H100s), so a staggered one-peer-at-a-time schedule would leave most links idle; an
all-to-all keeps every link busy and orders ranks identically, which NCCL needs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from commflow.dist import all_gather_tensor, reduce_scatter_tensor

from . import graphs, symm
from .pipeline import communicate_then_consume, is_async, produce_then_communicate
from .plan import OverlapPlan
from .validate import GroupInfo

__all__ = [
    "all_gather_matmul_forward",
    "matmul_all_reduce_forward",
    "matmul_reduce_scatter_forward",
    "rows_first",
    "restore_rows_first",
]


def rows_first(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Size]:
    """``t [..., d_dim, ..., C]`` -> 2-D ``[d_dim * rest, C]`` with ``dim`` outermost.

    Row block r of the result is block r of ``dim``. A view when the layout allows
    (``dim == 0``, or all other leading dims of size 1), else one copy.
    """
    moved = t.movedim(dim, 0)
    return moved.reshape(-1, moved.shape[-1]), moved.shape


def restore_rows_first(t2d: torch.Tensor, moved_shape: torch.Size, dim: int) -> torch.Tensor:
    """Inverse of :func:`rows_first` for a result with ``moved_shape`` (last dim replaced)."""
    return t2d.view(*moved_shape[:-1], t2d.shape[-1]).movedim(0, dim).contiguous()


def _bounds(sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


def _symm(op: str, schedule, x2d: torch.Tensor, w: torch.Tensor, g: GroupInfo, plan: OverlapPlan, *extra):
    """``schedule(x2d, w, g, plan.chunk_sizes, *extra)`` (a copy-engine schedule of symm.py),
    replayed as a CUDA graph where the plan says so (graphs.py); where the graphs of this shape
    cannot be kept, the plan's ``eager_fallback``."""
    sizes = plan.chunk_sizes
    if not plan.graphed:
        return schedule(x2d, w, g, sizes, *extra)
    ws = symm.workspace(g, op, x2d.device)
    rows, n = x2d.shape[0], w.shape[1]
    if op == "ag":  # the graph writes into its kind's buffers, copied out after each replay (graphs.py)
        m = rows * g.world_size
        out, full = graphs.kind_buffers(op, ws, ((m, n), (m, x2d.shape[1])), x2d.dtype, x2d.device)
        kw = {"out": out, "full": full}
    elif symm.splits(g.world_size, len(sizes)):
        kw = {"split": True}  # ends outside the graph, in new memory: the graph keeps no output
    else:
        shape = (rows // g.world_size if op == "rs" else rows, n)
        kw = {"out": graphs.kind_buffers(op, ws, (shape,), x2d.dtype, x2d.device)[0]}
    plain = (lambda a, b: _SEQUENTIAL[op](a, b, g, *extra)) if plan.eager_fallback == "sequential" else None
    return graphs.graphed_call(op, lambda a, b: schedule(a, b, g, sizes, *extra, **kw), (x2d.contiguous(),), (w,),
                               ws, (sizes, *extra), fallback=plain, shared_out="out" in kw)


# The plain paths (GEMM, then one collective; all-gather first for "ag") on rows-first 2-D
# operands, returning what the copy-engine schedules return: the sequential branch of each
# op below, and what a graphed plan falls back to where its graphs cannot be kept (_symm).


def _sequential_rs(x2d: torch.Tensor, w: torch.Tensor, g: GroupInfo) -> torch.Tensor:
    out = torch.empty(x2d.shape[0] // g.world_size, w.shape[1], dtype=x2d.dtype, device=x2d.device)
    reduce_scatter_tensor(out, torch.mm(x2d, w), group=g.group)
    return out


def _sequential_ar(x2d: torch.Tensor, w: torch.Tensor, g: GroupInfo, out: torch.Tensor | None = None) -> torch.Tensor:
    y = torch.mm(x2d, w) if out is None else torch.mm(x2d, w, out=out)
    dist.all_reduce(y, group=g.group)
    return y


def _sequential_ag(xs: torch.Tensor, w: torch.Tensor, g: GroupInfo, return_gathered: bool,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    x_full = torch.empty(xs.shape[0] * g.world_size, xs.shape[1], dtype=xs.dtype, device=xs.device)
    all_gather_tensor(x_full, xs.contiguous(), group=g.group)
    y = torch.mm(x_full, w) if out is None else torch.mm(x_full, w, out=out)
    return y, (x_full if return_gathered else None)


_SEQUENTIAL = {"rs": _sequential_rs, "ar": _sequential_ar, "ag": _sequential_ag}


def matmul_reduce_scatter_forward(
    x: torch.Tensor, w: torch.Tensor, g: GroupInfo, scatter_dim: int, plan: OverlapPlan
) -> torch.Tensor:
    """``x [..., K/R] @ w [K/R, N]`` summed over ranks, block ``g.rank`` of ``scatter_dim``."""
    x2d, moved = rows_first(x, scatter_dim)
    r_world, m, n = g.world_size, x2d.shape[0], w.shape[1]
    out_moved = torch.Size([moved[0] // r_world, *moved[1:]])
    if r_world == 1:
        return restore_rows_first(torch.mm(x2d, w), out_moved, scatter_dim)
    if not plan.overlap:
        return restore_rows_first(_sequential_rs(x2d, w, g), out_moved, scatter_dim)
    if plan.transport == "symm":
        return restore_rows_first(_symm("rs", symm.matmul_reduce_scatter, x2d, w, g, plan), out_moved, scatter_dim)
    out = torch.empty(m // r_world, n, dtype=x.dtype, device=x.device)
    cols = _bounds(plan.chunk_sizes)
    asynchronous = is_async(x.device)
    fp32 = plan.reduction == "fp32"

    def produce(c: int) -> torch.Tensor:
        a, b = cols[c]
        return torch.mm(x2d, w[:, a:b])  # [M, n_c]: rows grouped by destination rank

    def communicate(c: int, part: torch.Tensor):
        a, b = cols[c]
        if fp32:
            recv = torch.empty_like(part)  # [R sources x M/R rows, n_c]
            yield dist.all_to_all_single(recv, part, group=g.group, async_op=asynchronous)
            # bf16/fp16 sums accumulate in fp32 and round once when written.
            torch.sum(recv.view(r_world, m // r_world, b - a), dim=0, out=out[:, a:b])
        else:
            block = torch.empty(m // r_world, b - a, dtype=part.dtype, device=part.device)
            yield reduce_scatter_tensor(block, part, group=g.group, async_op=asynchronous)
            out[:, a:b].copy_(block)

    produce_then_communicate(x.device, len(cols), produce, communicate)
    return restore_rows_first(out, out_moved, scatter_dim)


def matmul_all_reduce_forward(x: torch.Tensor, w: torch.Tensor, g: GroupInfo, plan: OverlapPlan) -> torch.Tensor:
    """``x [..., K/R] @ w [K/R, N]`` summed over ranks, ``[..., N]`` on every rank."""
    x2d = x.reshape(-1, x.shape[-1])
    r_world, m, n = g.world_size, x2d.shape[0], w.shape[1]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    torch_shape = (*x.shape[:-1], n)
    if r_world == 1:
        return torch.mm(x2d, w, out=out).view(torch_shape)
    if not plan.overlap:
        return _sequential_ar(x2d, w, g, out).view(torch_shape)
    if plan.transport == "symm":
        return _symm("ar", symm.matmul_all_reduce, x2d, w, g, plan).view(torch_shape)
    rows = _bounds(plan.chunk_sizes)
    asynchronous = is_async(x.device)
    fp32 = plan.reduction == "fp32"

    def produce(c: int) -> torch.Tensor:
        a, b = rows[c]
        return torch.mm(x2d[a:b], w, out=out[a:b])  # contiguous rows of the output

    def communicate(c: int, block: torch.Tensor):
        if fp32:
            recv = torch.empty_like(block)
            yield dist.all_to_all_single(recv, block, group=g.group, async_op=asynchronous)
            reduced = recv.view(r_world, block.shape[0] // r_world, n).sum(dim=0)  # fp32 accumulate, round once
            yield all_gather_tensor(block, reduced, group=g.group, async_op=asynchronous)
        else:
            yield dist.all_reduce(block, group=g.group, async_op=asynchronous)

    produce_then_communicate(x.device, len(rows), produce, communicate)
    return out.view(torch_shape)


def all_gather_matmul_forward(
    x_shard: torch.Tensor, w: torch.Tensor, g: GroupInfo, gather_dim: int, plan: OverlapPlan, return_gathered: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``all_gather(x_shard, gather_dim) @ w``; with ``return_gathered`` also the gathered input."""
    xs, moved = rows_first(x_shard, gather_dim)
    r_world, rank, shard_rows, k, n = g.world_size, g.rank, xs.shape[0], xs.shape[1], w.shape[1]
    m = shard_rows * r_world
    full_moved = torch.Size([moved[0] * r_world, *moved[1:]])
    out = torch.empty(m, n, dtype=xs.dtype, device=xs.device)
    if r_world == 1:
        torch.mm(xs, w, out=out)
        gathered = restore_rows_first(xs, full_moved, gather_dim) if return_gathered else None
        return restore_rows_first(out, full_moved, gather_dim), gathered
    if not plan.overlap:
        out, x_full = _sequential_ag(xs, w, g, return_gathered, out)
        gathered = restore_rows_first(x_full, full_moved, gather_dim) if return_gathered else None
        return restore_rows_first(out, full_moved, gather_dim), gathered
    if plan.transport == "symm":
        out, x_full = _symm("ag", symm.all_gather_matmul, xs.contiguous(), w, g, plan, return_gathered)
        gathered = restore_rows_first(x_full, full_moved, gather_dim) if return_gathered else None
        return restore_rows_first(out, full_moved, gather_dim), gathered
    rows = _bounds(plan.chunk_sizes)
    asynchronous = is_async(xs.device)
    xs = xs.contiguous()
    # Landing buffers are allocated here, on the caller's stream, because the caller's
    # stream reads them (see pipeline.py on memory safety).
    landing = [torch.empty(r_world * (b - a), k, dtype=xs.dtype, device=xs.device) for a, b in rows]
    x_full = torch.empty(m, k, dtype=xs.dtype, device=xs.device) if return_gathered else None

    def communicate(c: int):
        a, b = rows[c]
        yield all_gather_tensor(landing[c], xs[a:b], group=g.group, async_op=asynchronous)
        if x_full is not None:
            x_full.view(r_world, shard_rows, k)[:, a:b].copy_(landing[c].view(r_world, b - a, k))

    def local_work() -> None:
        torch.mm(xs, w, out=out[rank * shard_rows:(rank + 1) * shard_rows])

    def consume(c: int) -> None:
        a, b = rows[c]
        per_peer = landing[c].view(r_world, b - a, k)
        for peer in range(r_world):
            if peer != rank:
                torch.mm(per_peer[peer], w, out=out[peer * shard_rows + a:peer * shard_rows + b])

    communicate_then_consume(xs.device, len(rows), communicate, local_work, consume)
    gathered = restore_rows_first(x_full, full_moved, gather_dim) if x_full is not None else None
    return restore_rows_first(out, full_moved, gather_dim), gathered
