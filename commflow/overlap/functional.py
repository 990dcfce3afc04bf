"""The public overlapped ops: checked, planned, and differentiable.

Each op checks its arguments on every rank before any collective, asks the plan
(:func:`commflow.overlap.plan`) whether to overlap for this shape, runs the schedule
of :mod:`commflow.overlap.ops`, and has a backward that overlaps too, because the
backward of each op is another of them:

==========================  ===============================  ======================
forward                     grad of the input                grad of the weight
==========================  ===============================  ======================
matmul_reduce_scatter       all_gather_matmul(dy, w^T)       x^T @ all_gather(dy)
all_gather_matmul           matmul_reduce_scatter(dy, w^T)   all_gather(x)^T @ dy
matmul_all_reduce           dy @ w^T (dy is replicated)      x^T @ dy
==========================  ===============================  ======================

The all-gathered ``dy`` / ``x`` needed for the weight gradient comes out of the same
overlapped all-gather (``return_gathered``), so it costs no second collective.
``all_gather_matmul`` keeps the gathered input for the weight gradient (Megatron
re-gathers it in backward instead, trading a second all-gather for memory).

``mode``: ``"auto"`` (the plan decides per shape, forward and backward),
``"overlap"`` (always the chunked schedule; chunk count from the plan unless
``n_chunks`` is given, which applies to the forward only), ``"sequential"`` (GEMM,
then the plain collective). Every rank must pass the same shapes and options.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from commflow.dist import all_gather_tensor, reduce_scatter_tensor

from . import ops, symm
from .autotune import autotune_enabled, measured_choice
from .calibration import get_calibration
from .plain import plain_all_gather, plain_all_reduce, plain_reduce_scatter
from .plan import OverlapPlan, plan
from .validate import GroupInfo, check_group, check_matmul_operands, check_mode, normalize_leading_dim

__all__ = ["all_gather_matmul", "clear_caches", "matmul_all_reduce", "matmul_reduce_scatter", "resolve_plan"]

_AGREED: dict[tuple, dist.ProcessGroup] = {}  # holds the group: its id is never reused


def _check_agreement(g: GroupInfo, fingerprint: str, device: torch.device, shape_key: tuple) -> None:
    """On the first call with a shape on a group, every rank must plan from the same
    constants, or one rank overlaps while another does not and their collectives never
    match. Keyed by shape, not by the local calibration, so that every rank enters this
    all-gather at the same call (ranks pass the same shapes, not necessarily the same
    calibration: that is what is being checked)."""
    group = g.group if g.group is not None else dist.group.WORLD
    key = (id(group), *shape_key)
    if _AGREED.get(key) is group:
        return
    mine = torch.tensor([int(fingerprint[:15], 16)], dtype=torch.int64, device=device)
    every = torch.empty(g.world_size, dtype=torch.int64, device=device)
    all_gather_tensor(every, mine, group=g.group)
    seen = every.tolist()
    if len(set(seen)) != 1:
        raise ValueError(
            f"calibration: the ranks of this group use different overlap calibrations (fingerprints {seen}); "
            "the rule is one calibration for the whole group (run commflow.overlap.calibrate on every rank, "
            "or give every rank the same file / set_calibration)"
        )
    _AGREED[key] = group


def resolve_plan(op: str, m: int, n: int, k: int, g: GroupInfo, x: torch.Tensor, mode: str,
                 n_chunks: int | None, reduction: str,
                 run: Callable[[OverlapPlan], object] | None = None) -> OverlapPlan:
    """The plan an op call will follow: the model's (calibration of ``x``'s device and
    group size), checked against the clock by ``run(plan)`` where autotune is on."""
    cal = get_calibration(x.device, g.world_size)
    if mode == "auto" and g.world_size > 1:
        _check_agreement(g, cal.fingerprint(), x.device, (op, m, n, k, x.dtype, n_chunks, reduction))
    transport = "symm" if reduction == "fp32" and symm.available(g, x.device) else "nccl"
    p = plan(op, m, n, k, world_size=g.world_size, dtype=x.dtype, calibration=cal, mode=mode,
             n_chunks=n_chunks, reduction=reduction, transport=transport)
    if mode == "auto" and g.world_size > 1 and run is not None and autotune_enabled(x.device):
        p = measured_choice(p, run, g, x.device, id(g.group if g.group is not None else dist.group.WORLD))
    return p


def _rows(t: torch.Tensor) -> int:
    return t.numel() // t.shape[-1]


def _gather_dim(t: torch.Tensor, g: GroupInfo, dim: int) -> torch.Tensor:
    """Plain all-gather along a leading dim (for gradients that need no GEMM)."""
    t2d, moved = ops.rows_first(t, dim)
    full = torch.empty(t2d.shape[0] * g.world_size, t2d.shape[1], dtype=t.dtype, device=t.device)
    all_gather_tensor(full, t2d.contiguous(), group=g.group)
    return ops.restore_rows_first(full, torch.Size([moved[0] * g.world_size, *moved[1:]]), dim)


def _scatter_dim(t: torch.Tensor, g: GroupInfo, dim: int) -> torch.Tensor:
    """Plain reduce-scatter along a leading dim."""
    t2d, moved = ops.rows_first(t, dim)
    out = torch.empty(t2d.shape[0] // g.world_size, t2d.shape[1], dtype=t.dtype, device=t.device)
    reduce_scatter_tensor(out, t2d.contiguous(), group=g.group)
    return ops.restore_rows_first(out, torch.Size([moved[0] // g.world_size, *moved[1:]]), dim)


def _weight_grad(inp: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """``inp [..., K]^T @ dy [..., N]`` -> ``[K, N]`` over all leading dims."""
    return torch.mm(inp.reshape(-1, inp.shape[-1]).t(), dy.reshape(-1, dy.shape[-1]))


# --- per-shape entries: checked and planned once, then a direct call ---------------------------
#
# Every call with a new signature (shapes, dtypes, devices, group, options) is checked
# and planned (and, in auto mode on CUDA, timed once); the result is an entry whose
# ``run`` is the chosen path with nothing left to decide. Later calls with the same
# signature look the entry up in a dict and call it: when the plan says sequential,
# ``run`` is exactly ``torch.mm`` + the NCCL collective (no copies, no syncs, no extra
# collective), the collective issued straight to the process group (plain.py). The autograd functions carry the entry too; the backward plans are
# resolved on the first backward and kept on the entry.


class _Entry:
    """One signature's resolved call: group, dims, forward plan and the direct forward."""

    __slots__ = ("g", "dim", "mode", "reduction", "plan", "run", "backward_plans")

    def __init__(self, g: GroupInfo, dim: int, mode: str, reduction: str, p: OverlapPlan, run: Callable):
        self.g, self.dim, self.mode, self.reduction, self.plan, self.run = g, dim, mode, reduction, p, run
        self.backward_plans: dict[tuple, OverlapPlan] = {}

    def backward_plan(self, op: str, m: int, n: int, k: int, t: torch.Tensor,
                      run: Callable[[OverlapPlan], object]) -> OverlapPlan:
        key = (op, m, n, k, t.dtype)
        p = self.backward_plans.get(key)
        if p is None:
            p = self.backward_plans[key] = resolve_plan(op, m, n, k, self.g, t, self.mode, None, self.reduction,
                                                        run=run)
        return p


_ENTRIES: dict[tuple, _Entry] = {}


def clear_caches() -> None:
    """Forget every resolved signature (called when the calibration or autotune setting changes)."""
    _ENTRIES.clear()


class _MatmulReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, e: _Entry):
        ctx.save_for_backward(x, w)
        ctx.e = e
        return e.run(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        e: _Entry = ctx.e
        g, dim = e.g, e.dim
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy = dy.contiguous()
        dx = dw = None
        if need_x:
            wt = w.t()
            p = e.backward_plan("all_gather_matmul", _rows(dy) * g.world_size, w.shape[0], w.shape[1], dy,
                                run=lambda q: ops.all_gather_matmul_forward(dy, wt, g, dim, q, False))
            dx, dy_full = ops.all_gather_matmul_forward(dy, wt, g, dim, p, return_gathered=need_w)
        elif need_w:
            dy_full = _gather_dim(dy, g, dim)
        if need_w:
            dw = _weight_grad(x, dy_full)
        return dx, dw, None


class _AllGatherMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_shard, w, e: _Entry, return_gathered: bool):
        ctx.set_materialize_grads(False)
        p = e.plan
        keep_input = return_gathered or ctx.needs_input_grad[1]
        out, x_full = ops.all_gather_matmul_forward(x_shard, w, e.g, e.dim, p, return_gathered=keep_input)
        ctx.save_for_backward(x_full if ctx.needs_input_grad[1] else None, w)
        ctx.e, ctx.return_gathered = e, return_gathered
        if return_gathered:
            return out, x_full
        return out

    @staticmethod
    def backward(ctx, dy, dx_full=None):
        x_full, w = ctx.saved_tensors
        e: _Entry = ctx.e
        g, dim = e.g, e.dim
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = dw = None
        if need_x:
            if dy is not None:
                dy = dy.contiguous()
                wt = w.t()
                p = e.backward_plan("matmul_reduce_scatter", _rows(dy), w.shape[0], w.shape[1], dy,
                                    run=lambda q: ops.matmul_reduce_scatter_forward(dy, wt, g, dim, q))
                dx = ops.matmul_reduce_scatter_forward(dy, wt, g, dim, p)
            if dx_full is not None:  # the gathered input was used downstream too
                part = _scatter_dim(dx_full.contiguous(), g, dim)
                dx = part if dx is None else dx + part
        if need_w and dy is not None:
            dw = _weight_grad(x_full, dy)
        return dx, dw, None, None


class _MatmulAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, e: _Entry):
        ctx.save_for_backward(x, w)
        return e.run(x, w)

    @staticmethod
    def backward(ctx, dy):
        # The output is replicated and so is its gradient (Megatron's "g": the backward
        # of the all-reduce is the identity on each rank).
        x, w = ctx.saved_tensors
        dx = torch.matmul(dy, w.t()) if ctx.needs_input_grad[0] else None
        dw = _weight_grad(x, dy) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def _checked(x_name: str, x, w, group, mode, n_chunks, reduction) -> GroupInfo:
    check_matmul_operands(x_name, x, w)
    check_mode(mode, reduction, n_chunks)
    return check_group(group, x.device)


def _entry_key(op: str, x, w, group, *options) -> tuple | None:
    """The ``_ENTRIES`` key of one call of ``op``, or None where ``x`` or ``w`` is no tensor
    (nothing to look up; building the entry then raises the operand check's ValueError).

    The public ops build this same tuple inline (a test holds them to it): the lookup is
    every call's cost on top of the plain path, and it measured 7-26 us of host time on the
    4xH100 host where the same lines take 1.4 us on the 2-core CI machine
    (``benchmarks/overlap_dispatch_probe.py``, docs/overlap.md, runs 11-12 and 18-19); this
    function call and its argument packing were a quarter of it (1.17 vs 0.82 us per lookup
    on the CI machine)."""
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)):
        return None
    # The group object itself (not None) so that a re-initialised default group is a new
    # signature; the dict keeps it alive, so its id cannot be reused meanwhile.
    pg = group if group is not None else c10d._world.default_pg  # one property call, not group.WORLD's two
    return (op, x.shape, w.shape, x.dtype, w.dtype, x.device, w.device, pg, *options)


def _rs_entry(key, x, w, group, scatter_dim, mode, n_chunks, reduction) -> _Entry:
    g = _checked("x", x, w, group, mode, n_chunks, reduction)
    dim = normalize_leading_dim("scatter_dim", scatter_dim, "x", x)
    if x.shape[dim] % g.world_size:
        raise ValueError(
            f"x: size {x.shape[dim]} of scatter_dim={scatter_dim} (shape {tuple(x.shape)}) is not divisible by "
            f"world_size={g.world_size}; the rule is x.shape[scatter_dim] % world_size == 0"
        )
    plain = _plain_rs(x, w, g, dim)
    with torch.no_grad():
        p = resolve_plan("matmul_reduce_scatter", _rows(x), w.shape[1], w.shape[0], g, x, mode, n_chunks, reduction,
                         run=_trial(plain, x, w, lambda q: ops.matmul_reduce_scatter_forward(x, w, g, dim, q)))
    if plain is None or p.overlap:
        def run(x, w):
            return ops.matmul_reduce_scatter_forward(x, w, g, dim, p)
    else:
        run = plain  # mm + NCCL, nothing else
    e = _Entry(g, dim, mode, reduction, p, run)
    if key is not None:
        _ENTRIES[key] = e
    return e


def _ag_entry(key, x_shard, w, group, gather_dim, mode, n_chunks, reduction) -> _Entry:
    g = _checked("x_shard", x_shard, w, group, mode, n_chunks, reduction)
    dim = normalize_leading_dim("gather_dim", gather_dim, "x_shard", x_shard)
    plain = _plain_ag(x_shard, g, dim)
    with torch.no_grad():
        p = resolve_plan("all_gather_matmul", _rows(x_shard) * g.world_size, w.shape[1], w.shape[0], g, x_shard,
                         mode, n_chunks, reduction,
                         run=_trial(plain, x_shard, w,
                                    lambda q: ops.all_gather_matmul_forward(x_shard, w, g, dim, q, False)))
    if plain is None or p.overlap:
        def run(x_shard, w):
            return ops.all_gather_matmul_forward(x_shard, w, g, dim, p, False)[0]
    else:
        run = plain  # NCCL + mm, nothing else
    e = _Entry(g, dim, mode, reduction, p, run)
    if key is not None:
        _ENTRIES[key] = e
    return e


def _ar_entry(key, x, w, group, mode, n_chunks, reduction) -> _Entry:
    g = _checked("x", x, w, group, mode, n_chunks, reduction)
    plain = _plain_ar(x, g)
    with torch.no_grad():
        p = resolve_plan("matmul_all_reduce", _rows(x), w.shape[1], w.shape[0], g, x, mode, n_chunks, reduction,
                         run=_trial(plain, x, w, lambda q: ops.matmul_all_reduce_forward(x, w, g, q)))
    if plain is None or p.overlap:
        def run(x, w):
            return ops.matmul_all_reduce_forward(x, w, g, p)
    else:
        run = plain  # mm + NCCL, nothing else
    e = _Entry(g, 0, mode, reduction, p, run)
    if key is not None:
        _ENTRIES[key] = e
    return e


# The plain paths (mm + one collective, nothing else) for 2-D operands sharded on dim 0,
# the shapes tensor-parallel layers pass; other layouts go through ops.py's sequential path.


def _plain_rs(x, w, g: GroupInfo, dim: int) -> Callable | None:
    if g.world_size == 1 or x.dim() != 2 or dim != 0:
        return None
    rows, n, collective = x.shape[0] // g.world_size, w.shape[1], plain_reduce_scatter(g.group)
    dtype, device = x.dtype, x.device  # part of the entry's signature: fixed for its calls

    def run(x, w):
        out = torch.empty(rows, n, dtype=dtype, device=device)
        collective(out, torch.mm(x, w))
        return out

    return run


def _plain_ag(x_shard, g: GroupInfo, dim: int) -> Callable | None:
    if g.world_size == 1 or x_shard.dim() != 2 or dim != 0:
        return None
    rows, k, collective = x_shard.shape[0] * g.world_size, x_shard.shape[1], plain_all_gather(g.group)
    dtype, device = x_shard.dtype, x_shard.device  # part of the entry's signature: fixed for its calls

    def run(x_shard, w):
        full = torch.empty(rows, k, dtype=dtype, device=device)
        collective(full, x_shard.contiguous())
        return torch.mm(full, w)

    return run


def _plain_ar(x, g: GroupInfo) -> Callable | None:
    if g.world_size == 1 or x.dim() != 2:
        return None
    collective = plain_all_reduce(g.group)

    def run(x, w):
        y = torch.mm(x, w)
        collective(y)
        return y

    return run


def _trial(plain: Callable | None, x, w, schedule: Callable[[OverlapPlan], object]) -> Callable[[OverlapPlan], object]:
    """What the autotune times for a candidate plan: the exact plain path the entry would
    run for a sequential plan (so overlap is held against the real alternative, not the
    slower general sequential path of ops.py), else the schedule."""
    return lambda q: plain(x, w) if plain is not None and not q.overlap else schedule(q)


def matmul_reduce_scatter(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    scatter_dim: int = 0,
    mode: str = "auto",
    n_chunks: int | None = None,
    reduction: str = "fp32",
) -> torch.Tensor:
    """Row-parallel GEMM + reduce-scatter: ``reduce_scatter(x @ w, scatter_dim)``.

    Args:
        x: ``[..., S, ..., K/R]`` this rank's K-shard of the activations (global
            ``[..., S, ..., K]``, sharded over the last dim).
        w: ``[K/R, N]`` this rank's row-shard of the weight (global ``[K, N]``).
        scatter_dim: leading dim of ``x`` to scatter (size divisible by R).
        mode, n_chunks, reduction: see the module doc and :func:`commflow.overlap.plan`.

    Returns:
        ``[..., S/R, ..., N]``: block ``rank`` of ``sum_r x_r @ w_r`` along ``scatter_dim``.
    """
    try:  # _entry_key's tuple, inline (see there)
        key = ("rs", x.shape, w.shape, x.dtype, w.dtype, x.device, w.device,
               group if group is not None else c10d._world.default_pg, scatter_dim, mode, n_chunks, reduction)
        e = _ENTRIES.get(key)
    except (AttributeError, TypeError):  # no tensors, or unhashable options: the entry's checks say what is wrong
        key = e = None
    if e is None:
        e = _rs_entry(key, x, w, group, scatter_dim, mode, n_chunks, reduction)
    if (x.requires_grad or w.requires_grad) and torch.is_grad_enabled():
        return _MatmulReduceScatter.apply(x, w, e)
    return e.run(x, w)


def all_gather_matmul(
    x_shard: torch.Tensor,
    w: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    gather_dim: int = 0,
    mode: str = "auto",
    n_chunks: int | None = None,
    return_gathered: bool = False,
    reduction: str = "fp32",
):
    """All-gather + column-parallel GEMM: ``all_gather(x_shard, gather_dim) @ w``.

    Args:
        x_shard: ``[..., S/R, ..., K]`` block ``rank`` of the activations along
            ``gather_dim`` (global ``[..., S, ..., K]``).
        w: ``[K, N/R]`` this rank's column-shard of the weight (global ``[K, N]``).
        gather_dim: leading dim of ``x_shard`` to gather.
        return_gathered: also return the gathered input ``[..., S, ..., K]``
            (differentiable), which the schedule assembles anyway.
        reduction: of the backward's reduce-scatter (the forward reduces nothing).

    Returns:
        ``[..., S, ..., N/R]`` (and the gathered input with ``return_gathered``).
    """
    try:  # _entry_key's tuple, inline (see there)
        key = ("ag", x_shard.shape, w.shape, x_shard.dtype, w.dtype, x_shard.device, w.device,
               group if group is not None else c10d._world.default_pg, gather_dim, mode, n_chunks, reduction)
        e = _ENTRIES.get(key)
    except (AttributeError, TypeError):  # no tensors, or unhashable options: the entry's checks say what is wrong
        key = e = None
    if e is None:
        e = _ag_entry(key, x_shard, w, group, gather_dim, mode, n_chunks, reduction)
    if return_gathered or ((x_shard.requires_grad or w.requires_grad) and torch.is_grad_enabled()):
        return _AllGatherMatmul.apply(x_shard, w, e, bool(return_gathered))
    return e.run(x_shard, w)


def matmul_all_reduce(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    mode: str = "auto",
    n_chunks: int | None = None,
    reduction: str = "fp32",
) -> torch.Tensor:
    """Row-parallel GEMM + all-reduce: ``all_reduce(x @ w)``.

    Args:
        x: ``[..., K/R]`` this rank's K-shard of the activations (global ``[..., K]``).
        w: ``[K/R, N]`` this rank's row-shard of the weight.

    Returns:
        ``[..., N]`` = ``sum_r x_r @ w_r``, identical on every rank.
    """
    try:  # _entry_key's tuple, inline (see there)
        key = ("ar", x.shape, w.shape, x.dtype, w.dtype, x.device, w.device,
               group if group is not None else c10d._world.default_pg, mode, n_chunks, reduction)
        e = _ENTRIES.get(key)
    except (AttributeError, TypeError):  # no tensors, or unhashable options: the entry's checks say what is wrong
        key = e = None
    if e is None:
        e = _ar_entry(key, x, w, group, mode, n_chunks, reduction)
    if (x.requires_grad or w.requires_grad) and torch.is_grad_enabled():
        return _MatmulAllReduce.apply(x, w, e)
    return e.run(x, w)
