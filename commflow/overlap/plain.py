"""The plain path (GEMM, then one collective) at the lowest host cost.

Where the plan says *sequential*, an op call is a ``torch.mm`` and one NCCL
collective, exactly Megatron's mappings, and on small shapes the host sets the pace:
on the 2x H100 host of session 6, ``torch.mm`` + ``dist.reduce_scatter_tensor``
took 107-192 us of host time per call, about the whole 0.12-0.20 ms of the small
shapes (``overlap_2xH100_20261126-s6-iters20.json``, ``host_us_per_call``), so any
Python on top of it showed up 1:1 in the step time (``docs/overlap.md``, run 4). ``torch.distributed``'s
functions re-check every argument, look up the group's membership and coalescing
state and build an options object on every call; everything they check was checked
when the op's signature was resolved. So the plain path calls the process group's
own method with options built once, then waits on the returned work as the blocking
functions do (since torch 2.7 a blocking NCCL collective runs on the caller's stream
and returns none).

It stays visible to :mod:`commflow.monitor`: the tracer works by replacing the
``torch.distributed`` / ``commflow.dist`` functions, and while any of them is
replaced (or a ``_coalescing_manager`` is open) the call goes through the public
function instead, so every collective is still recorded.

Each builder takes the process group (``None``: the default group) and returns
``fn(out, inp)`` (``fn(t)`` for the in-place all-reduce).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

import commflow.dist as cdist

__all__ = ["plain_all_gather", "plain_all_reduce", "plain_reduce_scatter"]

# The functions as imported, before any tracer could replace them, by their name in
# commflow.dist / torch.distributed. Kept in a dict so that the tracer (which swaps module
# attributes equal to these functions) leaves them be.
# Each run below goes the direct way only while the public function it stands for is still
# the one in place (no tracer has replaced it) and no coalescing block is open. They spell
# that test out inline (one attribute and one identity test: the three-function tuple
# compared here before cost 2-3 times that),
# as they wait inline on the work a collective returns (a blocking NCCL collective, asyncOp
# False, torch >= 2.7, ran on the caller's stream and returns none; gloo returns one): the
# 4xH100 host runs Python several times slower than the CI machine (the op's lookup: 9-26 us
# there, 1.4 us here), and the plain path of a 0.13 ms guard shape has no microsecond to
# spare (docs/overlap.md, runs 11-12). This collective itself measured within -2 to +4 us of
# the process group's method there; with the lines inline the whole plain all-gather call came
# within -1 to +5 us of the benchmark's bare sequential (lookup 7-12 us; session 11,
# benchmarks/results/overlap_dispatch_probe_4xH100_20261127-s11.json), and -1.5 to +0.7 us
# after the lookup was inlined (session 13, overlap_dispatch_probe_4xH100_20261127-s13.json).
_ORIGINAL = {"all_reduce": dist.all_reduce, "reduce_scatter_tensor": cdist.reduce_scatter_tensor,
             "all_gather_tensor": cdist.all_gather_tensor}
# torch's per-group coalescing state (private); when it is missing, never coalescing.
_COALESCING: dict = getattr(getattr(c10d, "_world", None), "pg_coalesce_state", {})


def _pg(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return group if group is not None else dist.group.WORLD


def _blocking(opts):
    if hasattr(opts, "asyncOp"):
        opts.asyncOp = False
    return opts


def _out_of_in(method, opts, public: str, group) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``fn(out, inp)`` calling ``method(out, inp, opts)`` untraced, else ``commflow.dist``'s
    function ``public`` (looked up at call time: the tracer replaces it) with ``group``."""
    original = _ORIGINAL[public]

    def run(out: torch.Tensor, inp: torch.Tensor) -> None:
        if getattr(cdist, public) is original and not _COALESCING:
            work = method(out, inp, opts)
            if work is not None:
                work.wait()
        else:
            getattr(cdist, public)(out, inp, group=group)

    return run


def plain_reduce_scatter(group: dist.ProcessGroup | None) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``fn(out [M/R, N], inp [M, N])``: sum-reduce-scatter along dim 0 (contiguous tensors)."""
    pg = _pg(group)
    opts = _blocking(c10d.ReduceScatterOptions())
    opts.reduceOp = dist.ReduceOp.SUM
    return _out_of_in(getattr(pg, "reduce_scatter_single", None) or pg._reduce_scatter_base, opts,
                      "reduce_scatter_tensor", group)


def plain_all_gather(group: dist.ProcessGroup | None) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``fn(out [M, K], inp [M/R, K])``: all-gather along dim 0 (contiguous tensors)."""
    pg = _pg(group)
    return _out_of_in(getattr(pg, "all_gather_single", None) or pg._allgather_base,
                      _blocking(c10d.AllgatherOptions()), "all_gather_tensor", group)


def plain_all_reduce(group: dist.ProcessGroup | None) -> Callable[[torch.Tensor], None]:
    """``fn(t)``: sum-all-reduce in place."""
    pg = _pg(group)
    opts = _blocking(c10d.AllreduceOptions())
    opts.reduceOp = dist.ReduceOp.SUM
    original = _ORIGINAL["all_reduce"]

    def run(t: torch.Tensor) -> None:
        if dist.all_reduce is original and not _COALESCING:
            work = pg.allreduce([t], opts)
            if work is not None:
                work.wait()
        else:
            dist.all_reduce(t, group=group)

    return run
