"""Tensor parallelism with the communication hidden behind the GEMM (T3 in software).

Public API::

    matmul_reduce_scatter(x, w, *, group, scatter_dim)   # row-parallel, sequence-parallel out
    all_gather_matmul(x_shard, w, *, group, gather_dim)  # column-parallel, sequence-parallel in
    matmul_all_reduce(x, w, *, group)                    # row-parallel, replicated out
    ColumnParallelLinear, RowParallelLinear              # Megatron layers, overlap on by default
    plan(op, m, n, k, world_size=...)                    # overlap or not for a shape, and why
    calibrate(group=...)                                 # measure the plan's constants here

See docs/overlap.md.
"""

from .calibration import (
    Calibration,
    CommCost,
    calibrate,
    default_calibration,
    get_calibration,
    set_calibration,
)
from .functional import all_gather_matmul, matmul_all_reduce, matmul_reduce_scatter
from .modules import ColumnParallelLinear, RowParallelLinear
from .plan import OverlapPlan, plan

__all__ = [
    "Calibration",
    "ColumnParallelLinear",
    "CommCost",
    "OverlapPlan",
    "all_gather_matmul",
    "calibrate",
    "default_calibration",
    "get_calibration",
    "matmul_all_reduce",
    "matmul_reduce_scatter",
    "RowParallelLinear",
    "plan",
    "set_calibration",
]
