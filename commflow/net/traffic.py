"""Collectives as per-step flows.

A collective on ``n`` ranks placed on hosts ``hosts[0..n-1]`` becomes a sequence of
*steps*; each step is a set of flows (source host, destination host, bytes,
connection id) that start together. **Semantics: a step is a barrier.** Every flow of
step ``s`` of a job starts when the last flow of step ``s-1`` of that job has finished
(ring, halving-doubling and pairwise all-to-all are written this way in MPI/NCCL
terms; NCCL actually pipelines chunks, which in a fluid model with equal flows per
step gives the same time whenever all flows of a step see the same rate). Jobs are
independent: each advances through its own steps, all jobs start at time 0.

Sizes follow nccl-tests: ``size_bytes`` is the all-reduce buffer, the all-gather
*output*, the reduce-scatter *input* and the all-to-all send buffer of one rank.

Pipelined algorithms (NCCL's double binary tree) are one step whose flows all run at
once: in a fluid model a pipeline in steady state is every edge busy at the same time.

Connection ids name a (source rank, destination rank, channel) triple of a job and stay
the same across steps, like NCCL's persistent connections (queue pairs): ECMP hashes
and plans attach to connections, so a ring's path is the same in every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = ["Step", "Job", "Traffic", "collective", "concurrent", "flows", "BUS_FACTOR", "ALGORITHMS"]

BUS_FACTOR = {
    "allreduce": lambda n: 2 * (n - 1) / n,
    "allgather": lambda n: (n - 1) / n,
    "reducescatter": lambda n: (n - 1) / n,
    "alltoall": lambda n: (n - 1) / n,
}
"""nccl-tests bus-bandwidth factor: busbw = algbw * factor(n), comparable to a link's speed."""

ALGORITHMS = {
    "allreduce": ("ring", "tree", "halving_doubling", "hierarchical"),
    "allgather": ("ring", "halving_doubling", "hierarchical"),
    "reducescatter": ("ring", "halving_doubling", "hierarchical"),
    "alltoall": ("direct", "pairwise"),
}


@dataclass(frozen=True, eq=False)
class Step:
    """Flows that start together; ``repeat`` identical copies run back to back."""

    src: np.ndarray
    """``[F]`` int: source host index."""
    dst: np.ndarray
    """``[F]`` int: destination host index (never equal to ``src``)."""
    size: np.ndarray
    """``[F]`` float: bytes."""
    conn: np.ndarray
    """``[F]`` int64: connection id within the job (src rank, dst rank, channel)."""
    repeat: int = 1
    label: str = ""

    @property
    def num_flows(self) -> int:
        return len(self.src)


@dataclass(frozen=True, eq=False)
class Job:
    """One collective of one job: its ranks and its steps."""

    name: str
    collective: str
    algorithm: str
    ranks: np.ndarray
    """``[n]`` host index of each rank."""
    size_bytes: float
    steps: tuple[Step, ...]

    @property
    def num_steps(self) -> int:
        return sum(s.repeat for s in self.steps)

    @property
    def bus_factor(self) -> float:
        factor = BUS_FACTOR.get(self.collective)
        return factor(len(self.ranks)) if factor else 1.0


@dataclass(frozen=True, eq=False)
class Traffic:
    """Concurrent jobs sharing one fabric (``a + b`` runs both at once)."""

    jobs: tuple[Job, ...]

    def __add__(self, other: Traffic) -> Traffic:
        return concurrent(self, other)

    @property
    def num_flows(self) -> int:
        return sum(s.num_flows * s.repeat for j in self.jobs for s in j.steps)

    def max_host(self) -> int:
        return max(int(max(s.src.max(), s.dst.max())) for j in self.jobs for s in j.steps if s.num_flows)


def concurrent(*traffics: Traffic) -> Traffic:
    """Run several collectives at the same time on one fabric; job names are made unique."""
    jobs: list[Job] = []
    seen: set[str] = set()
    for t in traffics:
        if not isinstance(t, Traffic):
            raise ValueError(f"traffics: expected Traffic objects, got {type(t).__name__}")
        for j in t.jobs:
            name, i = j.name, 1
            while name in seen:
                name, i = f"{j.name}#{i}", i + 1
            seen.add(name)
            jobs.append(replace(j, name=name))
    return Traffic(tuple(jobs))


def _norm_op(op: str) -> str:
    key = str(op).lower().replace("_", "").replace("-", "")
    if key not in ALGORITHMS:
        raise ValueError(f"op: unknown collective {op!r} (choose from {sorted(ALGORITHMS)})")
    return key


def _step(src_r, dst_r, size, ranks, n, channels, repeat=1, label="") -> Step:
    """Flows rank ``src_r[i] -> dst_r[i]`` of ``size`` bytes, split evenly over ``channels``."""
    src_r = np.asarray(src_r, np.int64)
    dst_r = np.asarray(dst_r, np.int64)
    ch = np.repeat(np.arange(channels, dtype=np.int64)[None, :], len(src_r), 0).ravel()
    s = np.repeat(src_r, channels)
    d = np.repeat(dst_r, channels)
    sizes = np.broadcast_to(np.asarray(size, np.float64), src_r.shape)
    return Step(src=ranks[s], dst=ranks[d], size=np.repeat(sizes / channels, channels),
                conn=(s * n + d) * channels + ch, repeat=repeat, label=label)


def _ring(ranks: np.ndarray, n: int, chunk: float, steps: int, channels: int, label: str,
          group: np.ndarray | None = None) -> Step:
    """``steps`` ring steps: rank i -> next rank in its group, ``chunk`` bytes each.

    ``group`` lists rank index arrays (rows) that form separate rings run in parallel.
    """
    rows = group if group is not None else np.arange(n)[None, :]
    src = rows.ravel()
    dst = np.roll(rows, -1, axis=1).ravel()
    return _step(src, dst, chunk, ranks, n, channels, repeat=steps, label=label)


def _binary_tree(n: int) -> np.ndarray:
    """Parent of each rank in the in-order binary tree NCCL uses (root: -1).

    With positions ``p = rank + 1``, node ``p`` sits at height ``log2(lowbit(p))``: every
    even rank is a leaf. A node's parent is its nearest ancestor ``<= n`` in the infinite
    in-order tree (whose parent of ``p`` is ``p +- lowbit(p)``, the one with twice the lowbit).
    """
    parent = np.full(n, -1, np.int64)
    root = 1 << (n.bit_length() - 1)
    for p in range(1, n + 1):
        if p == root:
            continue
        q = p
        while True:
            lb = q & -q
            q = q + lb if ((q + lb) & -(q + lb)) == 2 * lb else q - lb
            if q <= n:
                break
        parent[p - 1] = q - 1
    return parent


def _double_tree(ranks: np.ndarray, n: int, size: float, channels: int) -> Step:
    """NCCL-style double binary tree all-reduce, pipelined: one step, both trees at once.

    Tree 0 is a balanced in-order binary tree; tree 1 is its mirror (``r -> n-1-r``) for
    even ``n`` and its shift (``r -> r+1``) for odd ``n``, so most leaves of one tree are
    inner nodes of the other. Each tree carries half the buffer up (reduce) and down
    (broadcast); every tree edge carries ``size/2`` bytes in each direction.
    """
    p0 = _binary_tree(n)
    perm = (n - 1 - np.arange(n)) if n % 2 == 0 else (np.arange(n) + 1) % n
    src, dst, tree = [], [], []
    for t, par_of in enumerate((p0, None)):
        if par_of is None:  # tree 1: relabel tree 0 through perm
            kids = perm[np.flatnonzero(p0 >= 0)]
            pars = perm[p0[p0 >= 0]]
        else:
            kids = np.flatnonzero(par_of >= 0)
            pars = par_of[kids]
        src += [kids, pars]
        dst += [pars, kids]
        tree += [np.full(2 * len(kids), t)]
    src_r, dst_r, tree_id = np.concatenate(src), np.concatenate(dst), np.concatenate(tree)
    st = _step(src_r, dst_r, size / 2, ranks, n, channels, label="double binary tree")
    # Keep the two trees' connections apart even where they share an edge.
    return replace(st, conn=st.conn + np.repeat(tree_id, channels) * (n * n * channels))


def collective(op: str, algorithm: str = "ring", *, hosts: Iterable[int], size_bytes: float,
               channels: int = 1, gpus_per_node: int = 8, name: str | None = None) -> Traffic:
    """Flows of one collective: rank ``i`` runs on host index ``hosts[i]``.

    op: ``allreduce`` | ``allgather`` | ``reducescatter`` | ``alltoall``.
    algorithm: ``ring`` | ``tree`` (all-reduce only) | ``halving_doubling`` (power-of-two rank
    counts) | ``hierarchical`` (ranks ``[g*k, g*k+k)`` with ``k = gpus_per_node`` are one node:
    intra-node ring, inter-node ring per local index, intra-node ring) for the reductions and
    gathers; ``direct`` (all pairs at once) | ``pairwise`` (``n-1`` shift steps) for all-to-all.
    channels: each flow of ring/tree is split into this many parallel connections.
    """
    op = _norm_op(op)
    if algorithm not in ALGORITHMS[op]:
        raise ValueError(f"algorithm: {algorithm!r} is not available for {op} (choose from {ALGORITHMS[op]})")
    ranks = np.asarray(list(hosts), dtype=np.int64)
    n = len(ranks)
    if n < 2:
        raise ValueError(f"hosts: a collective needs at least 2 ranks, got {n}")
    if (ranks < 0).any():
        raise ValueError(f"hosts: host indices must be >= 0, got {int(ranks.min())}")
    if len(np.unique(ranks)) != n:
        raise ValueError("hosts: each host may hold at most one rank of a job")
    if isinstance(size_bytes, bool) or not size_bytes > 0:
        raise ValueError(f"size_bytes: must be > 0, got {size_bytes!r}")
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
        raise ValueError(f"channels: must be a positive integer, got {channels!r}")
    M = float(size_bytes)
    if algorithm == "halving_doubling" and n & (n - 1):
        raise ValueError(f"hosts: halving_doubling needs a power-of-two rank count, got {n}")
    steps: list[Step]
    if algorithm == "ring":
        if op == "allreduce":
            steps = [_ring(ranks, n, M / n, n - 1, channels, "reduce-scatter"),
                     _ring(ranks, n, M / n, n - 1, channels, "all-gather")]
        else:
            steps = [_ring(ranks, n, M / n, n - 1, channels, op)]
    elif algorithm == "tree":
        steps = [_double_tree(ranks, n, M, channels)]
    elif algorithm == "halving_doubling":
        r = np.arange(n)
        logn = n.bit_length() - 1
        halving = [_step(r, r ^ (n >> (j + 1)), M / 2 ** (j + 1), ranks, n, 1, label=f"halving d={n >> (j + 1)}")
                   for j in range(logn)]
        doubling = [_step(r, r ^ (1 << j), M * 2 ** j / n, ranks, n, 1, label=f"doubling d={1 << j}")
                    for j in range(logn)]
        steps = {"reducescatter": halving, "allgather": doubling, "allreduce": halving + doubling}[op]
    elif algorithm == "hierarchical":
        g = int(gpus_per_node)
        if g < 1 or n % g:
            raise ValueError(f"gpus_per_node: must divide the rank count {n}, got {gpus_per_node!r}")
        nodes = n // g
        intra = np.arange(n).reshape(nodes, g)
        inter = intra.T.copy()  # row j: local rank j of every node (one rail)
        steps = []
        if op in ("allreduce", "reducescatter") and g > 1:
            steps.append(_ring(ranks, n, M / g, g - 1, channels, "intra reduce-scatter", intra))
        if nodes > 1:
            if op == "allreduce":
                steps += [_ring(ranks, n, M / n, nodes - 1, channels, "inter reduce-scatter", inter),
                          _ring(ranks, n, M / n, nodes - 1, channels, "inter all-gather", inter)]
            else:
                steps.append(_ring(ranks, n, M / n, nodes - 1, channels, f"inter {op}", inter))
        if op in ("allreduce", "allgather") and g > 1:
            steps.append(_ring(ranks, n, M / g, g - 1, channels, "intra all-gather", intra))
    elif algorithm == "direct":
        s, d = np.nonzero(~np.eye(n, dtype=bool))
        steps = [_step(s, d, M / n, ranks, n, 1, label="all-to-all")]
    else:  # pairwise
        r = np.arange(n)
        steps = [_step(r, (r + k) % n, M / n, ranks, n, 1, label=f"shift {k}") for k in range(1, n)]
    job = Job(name=name or f"{op}-{algorithm}", collective=op, algorithm=algorithm, ranks=ranks,
              size_bytes=M, steps=tuple(steps))
    return Traffic((job,))


def flows(src: Sequence[int], dst: Sequence[int], size_bytes: float | Sequence[float], *, name: str = "flows",
          steps: Sequence[int] | None = None) -> Traffic:
    """A hand-made job: flow ``i`` goes ``src[i] -> dst[i]`` (host indices) in step ``steps[i]`` (default 0)."""
    src_a = np.asarray(src, np.int64)
    dst_a = np.asarray(dst, np.int64)
    size = np.broadcast_to(np.asarray(size_bytes, np.float64), src_a.shape).copy()
    if src_a.shape != dst_a.shape or src_a.ndim != 1 or len(src_a) == 0:
        raise ValueError("src, dst: must be non-empty 1-D sequences of the same length")
    if (src_a == dst_a).any():
        raise ValueError(f"dst: flow {int(np.flatnonzero(src_a == dst_a)[0])} goes from a host to itself")
    if not (size > 0).all():
        raise ValueError("size_bytes: every flow needs > 0 bytes")
    st = np.zeros(len(src_a), np.int64) if steps is None else np.asarray(steps, np.int64)
    n = int(max(src_a.max(), dst_a.max())) + 1
    out = []
    for s in np.unique(st):
        m = st == s
        out.append(Step(src=src_a[m], dst=dst_a[m], size=size[m], conn=np.flatnonzero(m).astype(np.int64),
                        label=f"step {int(s)}"))
    ranks = np.arange(n)
    return Traffic((Job(name=name, collective="custom", algorithm="custom", ranks=ranks,
                        size_bytes=float(size.sum()), steps=tuple(out)),))
